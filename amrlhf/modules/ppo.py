"""PPO (and, with a segmenter, AM-PPO) with Lightning manual optimisation.

One training batch of prompts = one rollout: sample responses (KV cache), score them, shape the
rewards with a per-token KL penalty, GAE, whiten the advantages over every valid token, then
`ppo_epochs` passes over shuffled mini-batches, one optimizer step each. With a segmenter the
actor loss is averaged over response_mask * m_t (docs/method.md, AM-PPO); the critic and GAE use every
response token. With the sample-wise segmenter it is bit-identical to PPO.

The rollout, reference, KL controller, optimisation loop, validation and exact resume are the
on-policy module's (amrlhf/modules/onpolicy.py), shared with GRPO; this file adds the critic and GAE.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor

from amrlhf.errors import ConfigError
from amrlhf.losses import masked_mean
from amrlhf.losses.kl_control import KLController
from amrlhf.losses.ppo import gae, kl_estimate, policy_loss, shape_rewards, value_loss, whiten
from amrlhf.losses.reductions import first_response_index
from amrlhf.models import ModelSpec
from amrlhf.models.forward import DEFAULT_LOGITS_CHUNK, lean_forward
from amrlhf.modules.critic import SharedValueHead, ValueModel, gather_rows
from amrlhf.modules.onpolicy import VAL, OnPolicyModule
from amrlhf.modules.reference import ReferenceModel
from amrlhf.sampling import Sampling
from amrlhf.scorers import TokenScorer
from amrlhf.segmenters import PivotSegmenter, Side, segment_stats

log = logging.getLogger(__name__)


class PPOModule(OnPolicyModule):
    """PPO / AM-PPO for a causal LM policy against a reward (a TokenScorer: its score at the last
    response token is the sequence score)."""

    checkpoint_key = "ppo"
    progress_keys = ("objective/scores", "objective/kl")
    best_metric = ("eval/objective/scores", "max")

    def __init__(
        self,
        policy: ModelSpec,
        reward: TokenScorer,
        critic: SharedValueHead | ValueModel | None = None,
        reference: ReferenceModel | None = None,
        segmenter: PivotSegmenter | None = None,
        scorer: TokenScorer | None = None,
        sampling: Sampling | None = None,
        missing_eos_penalty: float | None = None,
        kl: KLController | None = None,
        kl_estimator: Literal["k1", "k3"] = "k1",
        gamma: float = 1.0,
        lam: float = 0.95,
        cliprange: float = 0.2,
        cliprange_value: float = 0.2,
        vf_coef: float = 0.1,
        ppo_epochs: int = 4,
        mini_batch_size: int | None = None,
        max_grad_norm: float | None = 1.0,
        label_momentum: float = 0.9,
        segment_warmup_rollouts: int = 0,
        mask_side: Side = "both",
        seed: int | None = None,
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        betas: tuple[float, float] = (0.9, 0.999),
        logits_chunk: int | None = DEFAULT_LOGITS_CHUNK,
        mask_normalization: Literal["response", "kept"] = "response",
        optimizer_in_backward: bool = False,
        fused_adamw: bool = False,
    ):
        """
        Args:
            policy: the model trained (hub id, folder, gguf, `local:` id; LoRA optional).
            reward: the reward: RewardModelScorer (a trained reward model) or a programmatic one
                (TargetTokenReward); sequence score = its token score at the last response token.
            critic: SharedValueHead (default: a head on the policy's backbone) or ValueModel
                (its own backbone, e.g. initialised from the reward model).
            reference: FrozenReference (default) or AdapterReference (LoRA policy, adapters off).
            segmenter: None or SampleWiseSegmenter = PPO; AdaptivePivotSegmenter = AM-PPO (fallback
                `ones`); the mask applies to the actor loss only.
            scorer: where sigma's token scores come from: None = the reward's own token scores
                (reward-model prefix scores, the default), CriticScorer = the rollout's old values.
            sampling: generation settings (max_new_tokens, temperature, top_p, top_k). Log-probs are
                the model's own (temperature 1): keep temperature 1 for on-policy ratios.
            missing_eos_penalty: subtracted from the score of a response cut before its EOS.
            kl: FixedKL (default beta 0.05) or AdaptiveKL; kl_estimator: k1 or k3 per token.
            gamma, lam: GAE discount and lambda.
            cliprange, cliprange_value: PPO ratio and value clipping.
            vf_coef: weight of the value loss.
            ppo_epochs: passes over each rollout batch; mini_batch_size: rows per optimizer step
                (default: the whole rollout batch; must divide it).
            max_grad_norm: gradient norm clipping (None: off).
            label_momentum: momentum of the running mean of raw sequence scores (before
                `missing_eos_penalty`) that sets each response's label l = sign(score - mean) (AM-PPO).
            segment_warmup_rollouts: rollouts trained sample-wise before segmenting (useful with
                CriticScorer: an untrained critic gives random masks).
            mask_side: where the segmenter decides: `both`, or the responses with label -1 (`rejected`) or +1
                (`chosen`) only; every token of the others is trained.
            seed: sampling seed (default: the run's seed_everything).
            warmup_steps: linear learning-rate warm-up, in rollouts.
            logits_chunk: predicted tokens per vocabulary-projection chunk (docs/performance.md; None:
                the whole logits tensor at once).
            mask_normalization: `response` (default): the AM mask multiplies the advantages and the actor
                loss is the mean over every response token, so the mask removes gradient and never amplifies
                it (as GRPO's, docs/rl.md); `kept`: the mean over the kept tokens only (the rule before 0.2).
            optimizer_in_backward: update each weight with AdamW inside the backward pass, as soon as its
                gradient exists (amrlhf.optimizers; docs/performance.md): the same weights bit for bit, without
                the trainable weights' gradients ever held at once. One device, no gradient clipping
                (max_grad_norm: null), no gradient accumulation.
            fused_adamw: AdamW's fused kernel (torch's `fused=True`, the transformers Trainer's default): one pass
                over each weight; the AdamW step about 4x faster on CPU, a few per cent of a training step
                (docs/performance.md). The weights agree with the default's to float32 rounding, not bit for bit.
        """
        if mask_normalization not in ("response", "kept"):
            raise ConfigError(f"PPOModule: mask_normalization must be response or kept, got {mask_normalization!r}")
        super().__init__(policy, reward, reference, segmenter, scorer, sampling, missing_eos_penalty, kl, ppo_epochs,
                         mini_batch_size, max_grad_norm, label_momentum, segment_warmup_rollouts, seed, lr,
                         weight_decay, warmup_steps, betas, logits_chunk, mask_side, optimizer_in_backward,
                         fused_adamw)
        self.critic = critic if critic is not None else SharedValueHead()
        self.kl_estimator = kl_estimator
        self.gamma, self.lam = gamma, lam
        self.cliprange, self.cliprange_value, self.vf_coef = cliprange, cliprange_value, vf_coef
        self.mask_normalization = mask_normalization

    @property
    def ppo_epochs(self) -> int:
        return self.epochs

    # ------------------------------------------------------------------ set-up and checks
    def configure_model(self) -> None:
        super().configure_model()
        self.critic.build(self.policy)

    # ------------------------------------------------------------------ forward passes
    def forward_all(self, batch: dict, entropy: bool = False) -> tuple[Tensor, Tensor | None, Tensor]:
        """-> (policy log-probs [N, T-1], per-token entropy [N, T-1] when asked, critic values at every
        position [N, T]); the vocabulary projection a chunk at a time (no full logits are kept)."""
        shared = self.critic.shares_policy
        out = lean_forward(self.policy, batch, hidden=shared, entropy=entropy, chunk_size=self.logits_chunk)
        return out.logps, out.entropy, self.critic.values(batch, out.hidden)

    @torch.no_grad()
    def make_rollout(self, prompt_batch: dict) -> tuple[dict, dict]:
        """Sample, score, shape, GAE, whiten, segment. -> (rollout tensors [N, ...], stats)."""
        roll, ended, rows = self.sample(prompt_batch, self.step_seed(self.rollouts_done))
        resp = roll["response_mask"]
        logps, values = self.old_outputs(roll)
        ref = self.reference.logps(self, roll, "train")
        raw, scores, ts = self.sequence_scores(roll, ended, rows, "train")
        kl = kl_estimate(logps * resp, ref * resp, self.kl_estimator) * resp  # masked: no k3 overflow outside
        rewards, non_score = shape_rewards(scores, kl, resp, self.kl_ctl.value)
        old_values = values[:, :-1] * resp
        adv, returns = gae(rewards, old_values, resp, self.gamma, self.lam)
        roll.update(old_logps=logps * resp, old_values=old_values, returns=returns, advantages=whiten(adv, resp),
                    values=values[:, 1:] * resp, prompt_values=gather_rows(values, first_response_index(resp)))
        # AM-PPO's label: the raw score against the running mean of raw scores (the penalty is the reward's only)
        roll["labels"], baseline = self.labels_from(raw)
        roll["actor_mask"], seg = self.actor_mask(roll, ts, rows)
        stats = {
            "objective/kl": kl.sum(-1).mean(), "objective/entropy": (-logps * resp).sum(-1).mean(),
            "objective/non_score_reward": non_score.sum(-1).mean(),
            "objective/rlhf_reward": non_score.sum(-1).mean() + scores.mean(), "objective/scores": scores.mean(),
            "objective/kl_coef": torch.tensor(self.kl_ctl.value), "rollout/eos_frac": ended.float().mean(),
            "rollout/response_len": resp.sum(-1).mean(),
            "rollout/label_baseline": torch.tensor(baseline),
        }
        stats["_sequence_kl"] = stats["objective/kl"]
        if seg is not None:
            stats.update(segment_stats(seg, resp, roll["labels"]))
        stats["segments/actor_token_frac"] = roll["actor_mask"].sum() / resp.sum().clamp(min=1)
        return roll, stats

    @torch.no_grad()
    def old_outputs(self, roll: dict) -> tuple[Tensor, Tensor]:
        """The old policy's log-probs and values, in eval mode, a mini-batch of rows at a time."""
        parts = self.in_eval_by_minibatch(roll, self.forward_all)
        return torch.cat([p[0] for p in parts]), torch.cat([p[2] for p in parts])

    # ------------------------------------------------------------------ optimisation
    def minibatch_loss(self, mb: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped policy loss of m A (mean over response tokens) + vf_coef x clipped value loss."""
        parts = list(self.minibatch_parts(mb))
        return sum(loss for loss, _ in parts), {k: v for _, stats in parts for k, v in stats.items()}

    def minibatch_parts(self, mb: dict) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """The policy loss and vf_coef x the value loss: one part with the shared value head (one backbone,
        one backward), else two on a single process, the policy's backpropagated before the critic's forward
        runs. No parameter is in both, so the gradients are those of the sum; the peak holds one backbone's
        activations. Under DDP the sum is backpropagated once: DDP's reducer expects every parameter's
        gradient from each backward pass before the next one starts."""
        shared = self.critic.shares_policy
        split = not shared and getattr(self._trainer, "world_size", 1) == 1
        out = lean_forward(self.policy, mb, hidden=shared, entropy=True, chunk_size=self.logits_chunk)
        resp = mb["response_mask"]
        if self.mask_normalization == "kept":
            pg, pstats = policy_loss(out.logps, mb["old_logps"], mb["advantages"], mb["actor_mask"], self.cliprange)
        else:  # the mask weighs the advantages; the mean runs over every response token
            pg, pstats = policy_loss(out.logps, mb["old_logps"], mb["advantages"] * mb["actor_mask"], resp,
                                     self.cliprange)
        stats = {"policy/entropy_avg": masked_mean(out.entropy.detach(), resp), "loss/policy_avg": pg.detach()}
        if split:
            yield pg, self._averaged(stats, pstats)
            stats = {}
        values = self.critic.values(mb, out.hidden)
        vf, vstats = value_loss(values[:, :-1], mb["old_values"], mb["returns"], resp, self.cliprange_value)
        stats["loss/value_avg"] = vf.detach()
        if split:
            yield self.vf_coef * vf, self._averaged(stats, vstats)
        else:
            yield pg + self.vf_coef * vf, self._averaged(stats, {**pstats, **vstats})

    @staticmethod
    def _averaged(stats: dict[str, Tensor], parts: dict[str, Tensor]) -> dict[str, Tensor]:
        """TRL's names: the loss functions' statistics with `_avg` (the ratio's is `val/ratio`)."""
        for key, value in parts.items():
            stats[key if key == "val/ratio" else f"{key}_avg"] = value
        return stats

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int):
        """Held-out prompts: one seeded sample each, its score and KL (same weights, same numbers)."""
        roll, ended, rows = self.sample(batch, self.step_seed(VAL + batch_idx))
        resp = roll["response_mask"]
        logps = lean_forward(self.policy, roll, chunk_size=self.logits_chunk).logps
        kl = kl_estimate(logps * resp, self.reference.logps(self, roll, "val") * resp, self.kl_estimator) * resp
        _, scores, _ = self.sequence_scores(roll, ended, rows, "val")
        self.log_stats({"objective/scores": scores.mean(), "objective/kl": kl.sum(-1).mean(),
                        "rollout/eos_frac": ended.float().mean(), "rollout/response_len": resp.sum(-1).mean()},
                       "val", resp.shape[0])
