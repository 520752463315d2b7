"""The critic-free family: GRPO, DAPO, Dr. GRPO, RLOO, REINFORCE++ (and, with a segmenter, AM-GRPO /
AM-RLOO), on the on-policy module's rollout, reference, KL, epochs and exact resume (onpolicy.py).

One rollout: `data.batch_size` prompts x `num_generations` samples each (a group per prompt), the
reward of every response (a reward model, or verifiable checks: amrlhf.rewards), advantages from the
injected estimator (group-relative, leave-one-out, REINFORCE++), optionally a dense per-token term,
then `epochs` passes of clipped-ratio updates (separate low / high clip) whose per-token losses are
reduced by the injected aggregation (token mean = DAPO, sequence mean = GRPO, constant = Dr. GRPO).
The KL to the reference goes in the loss (k3 by default, as TRL) or in the reward (k1 per token).

AM variants: each response's label is the sign of its advantage (ties +1); sigma's token scores
come from `scorer`. The mask m_t multiplies the sequence advantage only, A_t = m_t A_seq + d_t (d the
dense term, if any, which the mask never removes), and it removes gradient without amplifying it: the
aggregation's denominators count every response token (`mask_normalization: response`), so a kept
token's gradient is what it would be without the mask (docs/rl.md). The KL term keeps every token. With
the sample-wise segmenter it is bit-identical to plain GRPO (tested).

Metrics carry TRL GRPOTrainer's names and definitions (reward, reward_std, frac_reward_zero_std,
rewards/<name>/mean|std, kl, entropy, clip_ratio/*, completions/*); the rest are ours.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import Tensor

from amrlhf.errors import ConfigError
from amrlhf.losses import masked_mean
from amrlhf.losses.advantages import AdvantageEstimator, GroupRelative
from amrlhf.losses.aggregation import LossAggregation, TokenMean
from amrlhf.losses.kl_control import FixedKL, KLController
from amrlhf.losses.ppo import clip_fractions, clipped_surrogate, kl_estimate
from amrlhf.losses.reductions import first_response_index
from amrlhf.losses.shaping import SoftOverlongPunishment, zero_std_groups
from amrlhf.models import ModelSpec
from amrlhf.models.forward import DEFAULT_LOGITS_CHUNK, lean_forward
from amrlhf.modules.base import PackedForward
from amrlhf.modules.context import scoring_context
from amrlhf.modules.dense import DenseAdvantage
from amrlhf.modules.onpolicy import VAL, OnPolicyModule, refuse_per_example_caches
from amrlhf.modules.reference import ReferenceModel
from amrlhf.sampling import Sampling
from amrlhf.scorers import CriticScorer, TokenScorer
from amrlhf.segmenters import PivotSegmenter, Side, segment_stats

log = logging.getLogger(__name__)


def completion_stats(resp: Tensor, ended: Tensor) -> dict[str, Tensor]:
    """TRL's `completions/*`: lengths (response tokens, EOS included) over every response, the share cut
    by max_new_tokens (`clipped_ratio`), and the lengths of those that ended (0 when none did)."""
    lengths = resp.sum(-1).float()
    done = lengths[ended] if bool(ended.any()) else lengths.new_zeros(1)
    return {"completions/mean_length": lengths.mean(), "completions/min_length": lengths.min(),
            "completions/max_length": lengths.max(), "completions/clipped_ratio": (~ended).float().mean(),
            "completions/mean_terminated_length": done.mean()}


def reward_stats(rewards: Tensor, group_size: int, components: dict[str, Tensor] | None,
                 seen: Tensor | None = None) -> dict[str, Tensor]:
    """TRL's reward metrics: `reward` (mean of the raw rewards), `reward_std` (std over the rollout, unbiased)
    and `frac_reward_zero_std` (share of responses whose group's rewards are all equal: no signal), both
    computed on `seen`, the rewards the advantage estimator sees (after the missing-EOS penalty and length
    shaping; default: `rewards`), and `rewards/<name>/mean|std` per component."""
    seen = rewards if seen is None else seen
    stats = {"reward": rewards.mean(), "reward_std": seen.std() if seen.numel() > 1 else seen.new_zeros(()),
             "frac_reward_zero_std": zero_std_groups(seen, group_size).float().mean()}
    for name, values in (components or {}).items():
        values = values.float()
        stats[f"rewards/{name}/mean"] = values.mean()
        stats[f"rewards/{name}/std"] = values.std() if values.numel() > 1 else values.new_zeros(())
    return stats


class GRPOModule(PackedForward, OnPolicyModule):
    """GRPO and its relatives for a causal LM policy; the variation points are injected classes."""

    checkpoint_key = "grpo"
    progress_keys = ("reward", "kl")
    best_metric = ("eval/reward", "max")

    def __init__(
        self,
        policy: ModelSpec,
        reward: TokenScorer,
        num_generations: int = 8,
        group_seeds: bool = True,
        advantage: AdvantageEstimator | None = None,
        aggregation: LossAggregation | None = None,
        dense: DenseAdvantage | None = None,
        reference: ReferenceModel | None = None,
        segmenter: PivotSegmenter | None = None,
        scorer: TokenScorer | None = None,
        sampling: Sampling | None = None,
        missing_eos_penalty: float | None = None,
        mask_truncated: bool = False,
        overlong: SoftOverlongPunishment | None = None,
        drop_zero_std_groups: bool = False,
        mask_normalization: Literal["response", "kept"] = "response",
        kl: KLController | None = None,
        kl_estimator: Literal["k1", "k3"] = "k3",
        kl_in: Literal["loss", "reward"] = "loss",
        clip_low: float = 0.2,
        clip_high: float | None = None,
        epochs: int = 1,
        mini_batch_size: int | None = None,
        max_grad_norm: float | None = 1.0,
        segment_warmup_rollouts: int = 0,
        mask_side: Side = "both",
        seed: int | None = None,
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        betas: tuple[float, float] = (0.9, 0.999),
        logits_chunk: int | None = DEFAULT_LOGITS_CHUNK,
        share_prefix: bool = True,
        optimizer_in_backward: bool = False,
        fused_adamw: bool = False,
    ):
        """
        Args:
            policy: the model trained (hub id, folder, gguf, `local:` id; LoRA optional).
            reward: a TokenScorer whose score at the last response token is the reward:
                `amrlhf.rewards.VerifiableReward` (programmatic checks), `RewardModelScorer`, ...
            num_generations: G, responses sampled per prompt (a group); data.batch_size counts prompts.
            group_seeds: each prompt's group from its own stream, seeded from (seed, rollout, prompt index),
                all prompts in one batched decode (a group depends on nothing else); false: one stream
                (seed, rollout, rank) for the whole rollout (batch-dependent samples).
            advantage: GroupRelative (default: GRPO, std-scaled), LeaveOneOut (RLOO), ReinforcePlusPlus.
            aggregation: TokenMean (default: DAPO's token mean; TRL's `bnpo`), SequenceMean (GRPO),
                ConstantNormalizer (Dr. GRPO).
            dense: DenseAdvantage: a token scorer's per-token increments or levels, normalised per
                group, added to (or replacing) the uniform advantage.
            reference: FrozenReference (default) or AdapterReference; not loaded when the KL is off.
            segmenter: None / SampleWiseSegmenter = plain; AdaptivePivotSegmenter = AM-GRPO (label = sign
                of the advantage); the mask applies to the policy loss only.
            scorer: sigma's token scores (RewardModelScorer prefix scores, ImplicitRewardScorer,
                ArithmeticStepScorer...); None = the reward's own token scores (a reward model's).
            sampling: max_new_tokens, temperature, top_p, top_k (log-probs are the model's own: keep
                temperature 1 for on-policy ratios).
            missing_eos_penalty: subtracted from the reward of a response cut before its EOS.
            mask_truncated: a response cut before its EOS is left out of the loss (DAPO's overlong mask).
            overlong: SoftOverlongPunishment: DAPO's length penalty near the sampling budget, added to the
                reward the estimator sees.
            drop_zero_std_groups: groups whose rewards (as the estimator sees them) are all equal leave the
                loss, the KL term included (DAPO's dynamic-sampling filter, without refilling the batch):
                they no longer dilute TokenMean's denominator. Use it with TokenMean (DAPO's): SequenceMean still
                counts a dropped response as a 0 in its mean over responses (as it counts any fully masked one).
            mask_normalization: `response` (default): the AM mask removes gradient and never amplifies it
                (the aggregation's denominators count every response token); `kept`: they count the kept
                tokens only (the behaviour before 0.2: a mask keeping a quarter of the tokens quadruples
                TokenMean's step). `kept` cannot be combined with `dense`.
            kl: beta: FixedKL (default 0.0: no reference, as TRL's default) or AdaptiveKL.
            kl_estimator: k3 (default, as TRL) or k1, per token.
            kl_in: `loss` (beta x aggregated per-token KL added to the loss, over every response token)
                or `reward` (-beta x KL_t as a per-token reward before the advantages).
            clip_low, clip_high: ratio clipped to [1 - clip_low, 1 + clip_high]; clip_high defaults to
                clip_low (DAPO's clip-higher: 0.2 / 0.28).
            epochs: passes over each rollout (TRL's num_iterations); mini_batch_size: responses per
                optimizer step (default: the whole rollout; must divide batch_size x num_generations).
            max_grad_norm: gradient norm clipping (None: off).
            segment_warmup_rollouts: rollouts trained without the mask first.
            mask_side: where the segmenter decides: `both`, or the responses with label -1 (`rejected`: a
                negative advantage) or +1 (`chosen`: the others) only; every token of the rest is trained.
            seed: sampling seed (default: the run's seed_everything).
            warmup_steps: linear learning-rate warm-up, in rollouts.
            logits_chunk: predicted tokens per vocabulary-projection chunk (docs/performance.md; None:
                the whole logits tensor at once).
            share_prefix: the responses to one prompt in a (mini-)batch run as packed sequences, the prompt
                once (amrlhf.models.shared_prefix; docs/performance.md), for the policy and the reference;
                false: the padded batch. The values agree to float32 rounding.
            optimizer_in_backward: update each weight with AdamW inside the backward pass, as soon as its
                gradient exists (amrlhf.optimizers; docs/performance.md): the same weights bit for bit, without
                the trainable weights' gradients ever held at once. One device, no gradient clipping
                (max_grad_norm: null), no gradient accumulation.
            fused_adamw: AdamW's fused kernel (torch's `fused=True`, the transformers Trainer's default): one pass
                over each weight; the AdamW step about 4x faster on CPU, a few per cent of a training step
                (docs/performance.md). The weights agree with the default's to float32 rounding, not bit for bit.
        """
        super().__init__(policy, reward, reference, segmenter, scorer, sampling, missing_eos_penalty,
                         kl if kl is not None else FixedKL(0.0), epochs, mini_batch_size, max_grad_norm, 0.9,
                         segment_warmup_rollouts, seed, lr, weight_decay, warmup_steps, betas, logits_chunk, mask_side,
                         optimizer_in_backward, fused_adamw)
        self.share_prefix = share_prefix
        self.advantage = advantage if advantage is not None else GroupRelative()
        if num_generations < 1 or (num_generations < 2 and getattr(self.advantage, "needs_groups", True)):
            raise ConfigError(f"GRPOModule: num_generations={num_generations}: {type(self.advantage).__name__} "
                              "compares the responses to one prompt, so it needs at least 2")
        if clip_low < 0 or (clip_high is not None and clip_high < 0):
            raise ConfigError(f"GRPOModule: clip_low / clip_high must be >= 0, got {clip_low} / {clip_high}")
        if kl_in not in ("loss", "reward"):
            raise ConfigError(f"GRPOModule: kl_in must be loss or reward, got {kl_in!r}")
        if kl_estimator not in ("k1", "k3"):
            raise ConfigError(f"GRPOModule: kl_estimator must be k1 or k3, got {kl_estimator!r}")
        if isinstance(scorer, CriticScorer):
            raise ConfigError("GRPOModule has no critic: CriticScorer reads PPO's value estimates")
        if dense is not None:
            refuse_per_example_caches("GRPOModule", dense.scorer)
        if mask_normalization not in ("response", "kept"):
            raise ConfigError(f"GRPOModule: mask_normalization must be response or kept, got {mask_normalization!r}")
        if mask_normalization == "kept" and dense is not None:
            raise ConfigError("GRPOModule: mask_normalization 'kept' divides by the kept tokens only, but the dense "
                              "term trains every token: use 'response' with dense")
        if overlong is not None and sampling is not None:
            overlong.penalty(torch.zeros(1), sampling.max_new_tokens)  # a cache longer than the budget: now
        self.num_generations = num_generations
        self.group_seeds = group_seeds
        self.aggregation = aggregation if aggregation is not None else TokenMean()
        self.dense = dense
        self.mask_truncated = mask_truncated
        self.overlong, self.drop_zero_std_groups = overlong, drop_zero_std_groups
        self.mask_normalization = mask_normalization
        self.kl_estimator, self.kl_in = kl_estimator, kl_in
        self.clip_low = clip_low
        self.clip_high = clip_low if clip_high is None else clip_high

    @property
    def samples_per_prompt(self) -> int:
        return self.num_generations

    @property
    def uses_reference(self) -> bool:
        return not (isinstance(self.kl_ctl, FixedKL) and self.kl_ctl.value == 0.0)

    def _setup_frozen(self) -> None:
        super()._setup_frozen()
        if self.dense is not None:
            self.dense.setup(scoring_context(self))

    def needs_old_logps(self, rows: int) -> bool:
        """Old log-probs need their own pass unless the single update is on-policy (one epoch, one
        mini-batch: the ratio is 1, as in TRL) and nothing at rollout time needs them."""
        several = self.epochs > 1 or (self.mini_batch_size or rows) < rows
        return several or (self.uses_reference and (self.kl_in == "reward" or not isinstance(self.kl_ctl, FixedKL)))

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def logps_in_eval(self, roll: dict) -> Tensor:
        """The rollout policy's log-probs [N, T-1], eval mode, a mini-batch of rows at a time."""
        return torch.cat(self.in_eval_by_minibatch(
            roll, lambda mb: lean_forward(self.policy, mb, **self.forward_options()).logps))

    @torch.no_grad()
    def make_rollout(self, prompt_batch: dict) -> tuple[dict, dict]:
        """Sample G per prompt, reward, (KL), advantages, (dense), label, mask. -> (rollout, stats)."""
        G = self.num_generations
        if self.group_seeds:
            roll, ended, rows = self.sample(prompt_batch, self.rollout_seed(self.rollouts_done), n=G, per_prompt=True)
        else:
            roll, ended, rows = self.sample(prompt_batch, self.step_seed(self.rollouts_done), n=G)
        resp = roll["response_mask"]
        n = resp.shape[0]
        raw, scores, ts = self.sequence_scores(roll, ended, rows, "train")
        if self.overlong is not None:
            scores = scores + self.overlong.penalty(resp.sum(-1), self.sampling.max_new_tokens).to(scores.dtype)
        loss_mask = resp * ended[:, None].to(resp.dtype) if self.mask_truncated else resp
        stats = {**reward_stats(raw, G, ts.components, seen=scores), **completion_stats(resp, ended)}
        roll["rewards"] = scores  # what the estimator sees
        if self.drop_zero_std_groups:
            loss_mask = loss_mask * (~zero_std_groups(scores, G))[:, None].to(resp.dtype)
        non_score = torch.zeros(resp.shape, dtype=torch.float32, device=resp.device)
        if self.needs_old_logps(n):
            roll["old_logps"] = self.logps_in_eval(roll) * resp
        if self.uses_reference:
            roll["ref_logps"] = self.reference.logps(self, roll, "train") * resp
            if "old_logps" in roll:
                kl = kl_estimate(roll["old_logps"], roll["ref_logps"], self.kl_estimator) * resp
                stats["_sequence_kl"] = kl.sum(-1).mean()
                if self.kl_in == "reward":
                    non_score = -self.kl_ctl.value * kl
                    stats["kl"] = masked_mean(kl, loss_mask)
        adv = self.advantage.estimate(scores, non_score, resp, G) * resp
        # AM label: the sign of the estimator's advantage at the response's first token (the whole response's),
        # before any dense term (a per-token signal says nothing about the sequence's preference)
        first = adv[torch.arange(n, device=adv.device), first_response_index(resp)]
        roll["labels"] = torch.where(first >= 0, 1, -1).long()
        dense = torch.zeros_like(adv)
        if self.dense is not None:
            total, dense = self.dense.apply({**roll, "rows": rows}, adv, G)
            adv = total - dense  # the sequence part: 0 with `replace`
            stats["advantages/dense_abs_mean"] = masked_mean(dense.abs(), resp)
        roll["loss_mask"] = loss_mask
        mask, seg = self.actor_mask(roll, ts, rows)
        roll["actor_mask"] = mask * loss_mask
        # the mask weighs the sequence part only, A_t = m_t A_seq + d_t: a masked token keeps its dense signal;
        # under `kept` the aggregation applies it (as numerator weights and denominators), so only once
        fold = seg is not None and self.mask_normalization == "response"
        roll["advantages"] = mask.to(adv.dtype) * adv + dense if fold else adv + dense
        if seg is not None:
            stats.update(segment_stats(seg, resp, roll["labels"]))
        stats["segments/actor_token_frac"] = roll["actor_mask"].sum() / resp.sum().clamp(min=1)
        stats["objective/kl_coef"] = torch.tensor(self.kl_ctl.value)
        return roll, stats

    # ------------------------------------------------------------------ optimisation
    def minibatch_loss(self, mb: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """aggregate(clipped surrogate of m A_seq + d, loss_mask) [+ beta x aggregate(KL_t, loss_mask)]; the
        surrogate is 0 where the advantage is, so the mask removes gradient without changing denominators
        (`mask_normalization: kept`: the surrogate's denominators count the kept tokens only)."""
        out = lean_forward(self.policy, mb, entropy=True, **self.forward_options())
        logps = out.logps
        old = mb["old_logps"] if "old_logps" in mb else logps.detach()
        per_token, ratio = clipped_surrogate(logps, old, mb["advantages"], self.clip_low, self.clip_high)
        max_len = self.sampling.max_new_tokens
        mask = mb["loss_mask"]
        loss = self.aggregation.reduce(per_token, mb["actor_mask"] if self.mask_normalization == "kept" else mask,
                                       max_len)
        stats = clip_fractions(ratio, mb["advantages"], mask, self.clip_low, self.clip_high)
        if self.uses_reference and self.kl_in == "loss":
            # both sides masked: outside the response k3 of unrelated log-probs could overflow (inf x 0 = NaN)
            kl = kl_estimate(logps * mb["response_mask"], mb["ref_logps"], self.kl_estimator)
            loss = loss + self.kl_ctl.value * self.aggregation.reduce(kl, mask, max_len)
            stats["kl"] = masked_mean(kl.detach(), mask)
        with torch.no_grad():
            stats["entropy"] = masked_mean(out.entropy.detach(), mask)
            stats["loss"] = loss.detach()
        return loss, stats

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int):
        """Held-out prompts: one seeded sample each, its reward and length (same weights, same numbers)."""
        roll, ended, rows = self.sample(batch, self.step_seed(VAL + batch_idx))
        raw, _, ts = self.sequence_scores(roll, ended, rows, "val")
        stats = {"reward": raw.mean(), **{f"rewards/{k}/mean": v.float().mean() for k, v in (ts.components or {}).items()},
                 "completions/mean_length": roll["response_mask"].sum(-1).float().mean(),
                 "completions/clipped_ratio": (~ended).float().mean()}
        self.log_stats(stats, "val", raw.shape[0])
