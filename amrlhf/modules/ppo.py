"""PPO (and, with a segmenter, AM-PPO) with Lightning manual optimisation.

One training batch of prompts = one rollout: sample responses (KV cache), score them, shape the
rewards with a per-token KL penalty, GAE, whiten the advantages over every valid token, then
`ppo_epochs` passes over shuffled mini-batches, one optimizer step each. With a segmenter the
actor loss is averaged over response_mask * m_t (docs/method.md, AM-PPO); the critic and GAE use every
response token. With the sample-wise segmenter it is bit-identical to PPO.

Under DDP each rank samples its own rollout; what updates state every rank keeps (the KL controller,
the first label baseline, the score scale) is pooled over the ranks first (amrlhf/distributed.py).

Step counting: `trainer.global_step` (max_steps, checkpoint_every, CrashAtStep) counts optimizer
steps = rollouts x ppo_epochs x mini-batches per rollout; logged metrics are indexed by rollout.
Sampling and mini-batch order are seeded from (seed, rollout number), so a resumed run draws the
same samples as an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import defaultdict
from typing import Literal

import torch
from torch import Tensor

from amrlhf.distributed import mean_and_count
from amrlhf.errors import AmrlhfError, ConfigError
from amrlhf.losses import masked_mean
from amrlhf.losses.kl_control import FixedKL, KLController
from amrlhf.losses.logprobs import entropy_from_logits
from amrlhf.losses.ppo import (
    eos_penalised,
    gae,
    kl_estimate,
    last_index,
    policy_loss,
    shape_rewards,
    value_loss,
    whiten,
)
from amrlhf.models import ModelSpec
from amrlhf.models.forward import policy_forward, token_layout
from amrlhf.modules.base import AlignmentModule
from amrlhf.modules.critic import SharedValueHead, ValueModel, gather_rows
from amrlhf.modules.masking import record_scale, setup_segmentation
from amrlhf.modules.reference import FrozenReference, ReferenceModel
from amrlhf.rollout import Sampling, left_padded_prompts, sample_responses, seeded
from amrlhf.scorers import TokenScorer, TokenScores
from amrlhf.segmenters import PivotSegmenter, RunningMeanBaseline, segment_stats
from amrlhf.segmenters.rules import first_response_index

log = logging.getLogger(__name__)

_VAL = 1 << 40  # validation samples never share a seed with a training rollout
_BY_LABEL = ("segments/kept_frac_chosen", "segments/kept_frac_rejected")  # absent when no response has the label
# Checkpoints are written after a rollout's last optimizer step, which is the state a resume needs.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


class PPOModule(AlignmentModule):
    """PPO / AM-PPO for a causal LM policy against a reward (a TokenScorer: its score at the last
    response token is the sequence score)."""

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
        seed: int | None = None,
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        betas: tuple[float, float] = (0.9, 0.999),
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
            seed: sampling seed (default: the run's seed_everything).
            warmup_steps: linear learning-rate warm-up, in rollouts.
        """
        super().__init__(policy, segmenter, scorer, 0, lr, weight_decay, warmup_steps, betas)
        self.automatic_optimization = False
        self.reward = reward
        self.critic = critic if critic is not None else SharedValueHead()
        self.reference = reference or FrozenReference()
        self.sampling = sampling or Sampling()
        self.missing_eos_penalty = missing_eos_penalty
        self.kl_ctl = kl or FixedKL()
        self.kl_estimator = kl_estimator
        self.gamma, self.lam = gamma, lam
        self.cliprange, self.cliprange_value, self.vf_coef = cliprange, cliprange_value, vf_coef
        if ppo_epochs < 1:
            raise ConfigError(f"PPOModule: ppo_epochs must be >= 1, got {ppo_epochs}")
        self.ppo_epochs, self.mini_batch_size, self.max_grad_norm = ppo_epochs, mini_batch_size, max_grad_norm
        self.label_baseline = RunningMeanBaseline(momentum=label_momentum)
        self.segment_warmup_rollouts = segment_warmup_rollouts
        self.seed = seed
        self.rollouts_done = 0

    # ------------------------------------------------------------------ set-up and checks
    def configure_model(self) -> None:
        super().configure_model()
        self.critic.build(self.policy)

    def steps_per_rollout(self, rows: int) -> int:
        return self.ppo_epochs * (rows // (self.mini_batch_size or rows))

    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        if getattr(dm, "kind", None) != "prompt":
            raise AmrlhfError("PPO trains on prompts: use data.class_path: amrlhf.data.PromptDataModule")
        limit = getattr(self.policy.config, "max_position_embeddings", None)
        if limit is not None and dm.max_length + self.sampling.max_new_tokens > limit:
            raise AmrlhfError(
                f"data.max_length ({dm.max_length} prompt tokens) + sampling.max_new_tokens "
                f"({self.sampling.max_new_tokens}) exceeds the policy's maximum of {limit} positions")
        rows = dm.batch_size
        if self.mini_batch_size and rows % self.mini_batch_size:
            raise AmrlhfError(f"mini_batch_size ({self.mini_batch_size}) must divide data.batch_size ({rows})")
        if self.trainer.accumulate_grad_batches != 1:
            raise AmrlhfError("PPO steps its optimizer itself: use mini_batch_size, not accumulate_grad_batches")
        per = self.steps_per_rollout(rows)
        for cb in self.trainer.checkpoint_callbacks:
            every = getattr(cb, "_every_n_train_steps", 0)
            if every and every % per:
                raise AmrlhfError(f"checkpoint_every={every} counts optimizer steps, and each rollout makes {per} "
                                  f"(ppo_epochs x mini-batches): use a multiple of {per}")
        self.reward.setup(self)
        self._setup_frozen()

    def on_validation_start(self) -> None:
        if self.trainer.state.fn != "fit":
            self.reward.setup(self)
            self._setup_frozen()

    def _setup_frozen(self) -> None:
        self.reference.setup(self)
        setup_segmentation(self)  # scorer and segmenter set-up; the scale is measured on the first rollout
        if self.seed is None:
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0))

    def step_seed(self, step: int) -> int:
        """The seed of rollout `step` (or of validation batch _VAL + i) on this rank: a function of
        (seed, step, rank) only, so sampling resumes exactly and ranks draw different samples."""
        return ((self.seed * 1_000_003 + step) * 1024 + self.global_rank) % (1 << 62)

    # ------------------------------------------------------------------ forward passes
    def forward_all(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """-> (policy log-probs [N, T-1], kept logits, critic values at every position [N, T])."""
        shared = self.critic.shares_policy
        logps, logits, hidden = policy_forward(self.policy, batch, hidden=shared)
        return logps, logits, self.critic.values(batch, hidden)

    @torch.no_grad()
    def sample(self, prompt_batch: dict, seed: int) -> tuple[dict, Tensor]:
        tok = self.trainer.datamodule.tokenizer
        with seeded(seed, self.device):
            batch, ended = sample_responses(self.policy, left_padded_prompts(prompt_batch), self.sampling,
                                            eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
        return {k: v.to(self.device) for k, v in batch.items()}, ended.to(self.device)

    @torch.no_grad()
    def sequence_scores(self, batch: dict, ended: Tensor, split: str) -> tuple[Tensor, Tensor, TokenScores]:
        """-> (raw sequence scores [N], scores after `missing_eos_penalty` [N], the reward's token scores)."""
        ts = self.reward.score(self, batch, split)
        raw = gather_rows(ts.scores, last_index(batch["response_mask"])).float()
        return raw, eos_penalised(raw, ended, self.missing_eos_penalty), ts

    @torch.no_grad()
    def make_rollout(self, prompt_batch: dict) -> tuple[dict, dict]:
        """Sample, score, shape, GAE, whiten, segment. -> (rollout tensors [N, ...], stats)."""
        roll, ended = self.sample(prompt_batch, self.step_seed(self.rollouts_done))
        resp = roll["response_mask"]
        logps, values = self.old_outputs(roll)
        ref = self.reference.logps(self, roll, "train")
        raw, scores, ts = self.sequence_scores(roll, ended, "train")
        kl = kl_estimate(logps, ref, self.kl_estimator) * resp
        rewards, non_score = shape_rewards(scores, kl, resp, self.kl_ctl.value)
        old_values = values[:, :-1] * resp
        adv, returns = gae(rewards, old_values, resp, self.gamma, self.lam)
        roll.update(old_logps=logps * resp, old_values=old_values, returns=returns, advantages=whiten(adv, resp),
                    values=values[:, 1:] * resp, prompt_values=gather_rows(values, first_response_index(resp)))
        # AM-PPO's label: the raw score against the running mean of raw scores (the penalty is the reward's only);
        # the first rollout's own mean is every rank's rollouts' mean (the running mean's update is reduced too)
        baseline = self.label_baseline.mean if self.label_baseline.count else mean_and_count(raw)[0]
        roll["labels"] = torch.where(raw >= baseline, 1, -1).long()
        self.label_baseline.update(raw[:, None], torch.ones_like(raw)[:, None])
        roll["actor_mask"], seg = self.actor_mask(roll, ts)
        stats = {
            "objective/kl": kl.sum(-1).mean(), "objective/entropy": (-logps * resp).sum(-1).mean(),
            "objective/non_score_reward": non_score.sum(-1).mean(),
            "objective/rlhf_reward": non_score.sum(-1).mean() + scores.mean(), "objective/scores": scores.mean(),
            "objective/kl_coef": torch.tensor(self.kl_ctl.value), "rollout/eos_frac": ended.float().mean(),
            "rollout/response_len": resp.sum(-1).mean(), "rollout/label_baseline": torch.tensor(baseline),
        }
        if seg is not None:
            stats.update(segment_stats(seg, resp, roll["labels"]))
        stats["segments/actor_token_frac"] = roll["actor_mask"].sum() / resp.sum().clamp(min=1)
        return roll, stats

    @torch.no_grad()
    def old_outputs(self, roll: dict) -> tuple[Tensor, Tensor]:
        """The old policy's log-probs and values, in eval mode (no dropout), a mini-batch of rows at a
        time (the vocabulary-sized logits of the whole rollout never coexist)."""
        was_training = self.training
        self.eval()
        n = roll["input_ids"].shape[0]
        size = self.mini_batch_size or n
        parts = []
        for start in range(0, n, size):
            logps, _, values = self.forward_all({k: v[start:start + size] for k, v in roll.items()})
            parts.append((logps, values))
        self.train(was_training)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def actor_mask(self, roll: dict, reward_scores: TokenScores):
        resp = roll["response_mask"]
        if self.segmenter is None or self.rollouts_done < self.segment_warmup_rollouts:
            return resp, None
        ts = self.scorer.score(self, roll, "train") if self.scorer is not None else reward_scores
        if hasattr(self.segmenter, "calibrate") and not self._calibrated:
            record_scale(self, ts.scores[resp.bool()].float(), pooled=True)  # once, on the first segmented rollout
        seg = self.segmenter.segment(response_mask=resp, labels=roll["labels"], input_ids=roll["input_ids"],
                                     **ts.as_kwargs())
        if hasattr(self.segmenter, "observe"):
            self.segmenter.observe(ts.scores, resp)
        return seg.mask.to(resp.dtype) * resp, seg

    # ------------------------------------------------------------------ optimisation
    def ppo_update(self, roll: dict) -> dict[str, Tensor]:
        opt = self.optimizers()
        n = roll["input_ids"].shape[0]
        size = self.mini_batch_size or n
        order = torch.Generator().manual_seed(self.step_seed(self.rollouts_done))
        acc: dict[str, list[Tensor]] = defaultdict(list)
        for _ in range(self.ppo_epochs):
            perm = torch.randperm(n, generator=order)
            for start in range(0, n, size):
                idx = perm[start:start + size].to(self.device)
                mb = {k: v[idx] for k, v in roll.items()}
                logps, logits, values = self.forward_all(mb)
                resp = mb["response_mask"]
                pg, pstats = policy_loss(logps, mb["old_logps"], mb["advantages"], mb["actor_mask"], self.cliprange)
                vf, vstats = value_loss(values[:, :-1], mb["old_values"], mb["returns"], resp, self.cliprange_value)
                loss = pg + self.vf_coef * vf
                opt.zero_grad()
                self.manual_backward(loss)
                if self.max_grad_norm:
                    self.clip_gradients(opt, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
                with torch.no_grad():
                    entropy = token_layout(entropy_from_logits(logits)[:, :-1], resp.shape[1] + 1)
                    acc["policy/entropy_avg"].append(masked_mean(entropy, resp))
                acc["loss/policy_avg"].append(pg.detach())
                acc["loss/value_avg"].append(vf.detach())
                for key, value in {**pstats, **vstats}.items():
                    acc[key if key == "val/ratio" else f"{key}_avg"].append(value)
        return {k: torch.stack(v).mean() for k, v in acc.items()}

    def training_step(self, batch: dict, batch_idx: int):
        roll, stats = self.make_rollout(batch)
        stats.update(self.ppo_update(roll))
        # the mean sequence KL and the number of sequences of every rank's rollout (equal shares per rank)
        kl, sequences = mean_and_count(stats["objective/kl"].expand(roll["input_ids"].shape[0]))
        self.kl_ctl.update(kl, sequences)
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        self.rollouts_done += 1
        self.log_sometimes({k: stats.pop(k) for k in _BY_LABEL if k in stats})
        self.log_stats(stats, "train", roll["input_ids"].shape[0])

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int):
        """Held-out prompts: one seeded sample each, its score and KL (same weights, same numbers)."""
        roll, ended = self.sample(batch, self.step_seed(_VAL + batch_idx))
        resp = roll["response_mask"]
        logps = policy_forward(self.policy, roll)[0]
        kl = kl_estimate(logps, self.reference.logps(self, roll, "val"), self.kl_estimator) * resp
        _, scores, _ = self.sequence_scores(roll, ended, "val")
        self.log_stats({"objective/scores": scores.mean(), "objective/kl": kl.sum(-1).mean(),
                        "rollout/eos_frac": ended.float().mean(), "rollout/response_len": resp.sum(-1).mean()},
                       "val", resp.shape[0])

    # ------------------------------------------------------------------ exact resume
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["amrlhf"]["ppo"] = {"rollouts_done": self.rollouts_done, "kl": self.kl_ctl.state_dict(),
                                       "label_baseline": self.label_baseline.state_dict(),
                                       "calibrated": self._calibrated, "seed": self.seed}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("amrlhf", {}).get("ppo")
        if state:
            self.rollouts_done = state["rollouts_done"]
            self.kl_ctl.load_state_dict(state["kl"])
            self.label_baseline.load_state_dict(state["label_baseline"])
            self._calibrated = state["calibrated"]
            self.seed = state["seed"]
