"""What PPO and the critic-free family (GRPO, RLOO, REINFORCE++) share: one on-policy module.

One training batch of prompts = one rollout: sample responses (KV cache; `samples_per_prompt` of
each), score them, build advantages (the subclass: GAE with a critic, or a group estimator), the
adaptive mask for the policy loss (AM variants), then `epochs` passes over shuffled mini-batches,
one optimizer step each (Lightning manual optimisation; the subclass gives each mini-batch's loss).

Shared here: the rollout (seeded from (seed, rollout number, rank), or per prompt from (seed, rollout
number, prompt index) for GRPO's groups, so a resumed run draws the same samples), the frozen reference, the KL controller and its update (pooled over DDP ranks), the label
baseline and the segmenter's mask, the optimisation loop, validation (one seeded sample per held-out
prompt) and exact resume (rollout counter, KL, baseline, scale, seed in the checkpoint).

Step counting: `trainer.global_step` (max_steps, checkpoint_every, CrashAtStep) counts optimizer
steps = rollouts x epochs x mini-batches per rollout; logged metrics are indexed by rollout.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import defaultdict
from collections.abc import Iterator

import torch
from torch import Tensor

from amrlhf.distributed import mean_and_count
from amrlhf.errors import AmrlhfError, ConfigError
from amrlhf.losses.kl_control import FixedKL, KLController
from amrlhf.losses.ppo import eos_penalised
from amrlhf.losses.reductions import last_response_index
from amrlhf.memory import heap_allocations, release_freed_memory
from amrlhf.models import ModelSpec
from amrlhf.models.forward import check_logits_chunk
from amrlhf.modules.base import AlignmentModule
from amrlhf.modules.context import scoring_context
from amrlhf.modules.critic import gather_rows
from amrlhf.modules.masking import log_scale, setup_segmentation
from amrlhf.modules.reference import CachedReference, FrozenReference, ReferenceModel
from amrlhf.sampling import Sampling, left_padded_prompts, sample_groups, sample_responses, seeded
from amrlhf.scorers import TokenScorer, TokenScores
from amrlhf.segmenters import PivotSegmenter, RunningMeanBaseline, Side

log = logging.getLogger(__name__)

VAL = 1 << 40  # validation samples never share a seed with a training rollout
BY_LABEL = ("segments/kept_frac_chosen", "segments/kept_frac_rejected")  # absent when no response has the label
# Checkpoints are written after a rollout's last optimizer step, which is the state a resume needs.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


def clip_threshold(max_norm: float, precision_plugin) -> float:
    """The norm to clip this module's gradients at, where they are clipped: before the optimizer step. Under a
    gradient scaler (16-mixed) manual optimization's gradients are unscaled only inside that step, so they are still
    scaled then; clipping them at `max_norm` x the scale clips the true gradients at `max_norm`."""
    scaler = getattr(precision_plugin, "scaler", None)
    return max_norm * float(scaler.get_scale()) if scaler is not None else max_norm


def refuse_per_example_caches(module: str, *components) -> None:
    """A rollout's responses are new samples: what is cached or shipped per dataset example (a cached
    reference, cached or dataset token scores) describes other responses, so it cannot serve them."""
    from amrlhf.scorers import CachedScorer, DatasetScorer

    for c in components:
        if isinstance(c, CachedReference | CachedScorer | DatasetScorer):
            raise ConfigError(f"{module}: {type(c).__name__} holds values per dataset example, and a rollout's "
                              "responses are new samples: use FrozenReference / AdapterReference, or a scorer that "
                              "reads the responses (RewardModelScorer, ImplicitRewardScorer, ...)")


class OnPolicyModule(AlignmentModule):
    """Base of PPOModule and GRPOModule. Subclasses set `checkpoint_key` and implement
    `samples_per_prompt`, `make_rollout(prompt_batch) -> (roll, stats)` and
    `minibatch_loss(mb) -> (loss, stats)`."""

    checkpoint_key = "onpolicy"

    def __init__(
        self,
        policy: ModelSpec,
        reward: TokenScorer,
        reference: ReferenceModel | None,
        segmenter: PivotSegmenter | None,
        scorer: TokenScorer | None,
        sampling: Sampling | None,
        missing_eos_penalty: float | None,
        kl: KLController | None,
        epochs: int,
        mini_batch_size: int | None,
        max_grad_norm: float | None,
        label_momentum: float,
        segment_warmup_rollouts: int,
        seed: int | None,
        lr: float,
        weight_decay: float,
        warmup_steps: int,
        betas: tuple[float, float],
        logits_chunk: int | None,
        mask_side: Side = "both",
        optimizer_in_backward: bool = False,
        fused_adamw: bool = False,
    ):
        super().__init__(policy, segmenter, scorer, 0, lr, weight_decay, warmup_steps, betas, mask_side=mask_side,
                         optimizer_in_backward=optimizer_in_backward, fused_adamw=fused_adamw)
        if optimizer_in_backward and max_grad_norm:
            raise ConfigError(f"{type(self).__name__}: optimizer_in_backward updates each weight as soon as its "
                              f"gradient exists, before the global norm that max_grad_norm ({max_grad_norm}) clips "
                              "by is known: set max_grad_norm: null")
        check_logits_chunk(logits_chunk)
        refuse_per_example_caches(type(self).__name__, reference, scorer, reward)
        self.logits_chunk = logits_chunk  # predicted tokens per vocabulary projection (models/forward.lean_forward)
        self.automatic_optimization = False
        self.reward = reward
        self.reference = reference or FrozenReference()
        self.sampling = sampling or Sampling()
        self.missing_eos_penalty = missing_eos_penalty
        self.kl_ctl = kl if kl is not None else FixedKL()
        if epochs < 1:
            raise ConfigError(f"{type(self).__name__}: epochs over a rollout must be >= 1, got {epochs}")
        if mini_batch_size is not None and mini_batch_size < 1:
            raise ConfigError(f"{type(self).__name__}: mini_batch_size must be >= 1, got {mini_batch_size}")
        self.epochs, self.mini_batch_size, self.max_grad_norm = epochs, mini_batch_size, max_grad_norm
        self.label_baseline = RunningMeanBaseline(momentum=label_momentum)
        self.segment_warmup_rollouts = segment_warmup_rollouts
        self.seed = seed
        self.rollouts_done = 0

    samples_per_prompt = 1

    # ------------------------------------------------------------------ set-up and checks
    def rows_per_rollout(self, prompts: int) -> int:
        return prompts * self.samples_per_prompt

    def steps_per_rollout(self, rows: int) -> int:
        """Optimizer steps per rollout of `rows` responses."""
        return self.epochs * (rows // (self.mini_batch_size or rows))

    @property
    def uses_reference(self) -> bool:
        return True

    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        name = type(self).__name__.removesuffix("Module")
        if getattr(dm, "kind", None) != "prompt":
            raise AmrlhfError(f"{name} trains on prompts: use data.class_path: amrlhf.data.PromptDataModule")
        limit = getattr(self.policy.config, "max_position_embeddings", None)
        if limit is not None and dm.max_length + self.sampling.max_new_tokens > limit:
            raise AmrlhfError(
                f"data.max_length ({dm.max_length} prompt tokens) + sampling.max_new_tokens "
                f"({self.sampling.max_new_tokens}) exceeds the policy's maximum of {limit} positions")
        s = self.sampling
        if s.temperature != 1.0 or s.top_p < 1.0 or s.top_k:
            log.warning("sampling at temperature %s, top_p %s, top_k %s: the log-probs are the model's own (temperature 1, "
                        "no truncation), so the ratios and KL are those of another distribution than the one sampled",
                        s.temperature, s.top_p, s.top_k)
        rows = self.rows_per_rollout(dm.batch_size)
        if self.mini_batch_size and rows % self.mini_batch_size:
            what = f"data.batch_size x num_generations ({dm.batch_size} x {self.samples_per_prompt} = {rows} " \
                   "responses)" if self.samples_per_prompt > 1 else f"data.batch_size ({rows})"
            raise AmrlhfError(f"mini_batch_size ({self.mini_batch_size}) must divide {what}")
        if self.trainer.accumulate_grad_batches != 1:
            raise AmrlhfError(f"{name} steps its optimizer itself: use mini_batch_size, not accumulate_grad_batches")
        per = self.steps_per_rollout(rows)
        for cb in self.trainer.checkpoint_callbacks:
            every = getattr(cb, "_every_n_train_steps", 0)
            if every and every % per:
                raise AmrlhfError(f"checkpoint_every={every} counts optimizer steps, and each rollout makes {per} "
                                  f"(epochs x mini-batches): use a multiple of {per}")
        if self.segmenter is not None and self.scorer is None and not getattr(self.reward, "token_scores", True):
            raise AmrlhfError(f"{type(self.reward).__name__} gives one score per response, no token scores for the "
                              "segmenter: set model.init_args.scorer (RewardModelScorer, ImplicitRewardScorer, "
                              "ArithmeticStepScorer, ...)")
        self.reward.setup(scoring_context(self))
        self._setup_frozen()

    def on_validation_start(self) -> None:
        if self.trainer.state.fn != "fit":
            self.reward.setup(scoring_context(self))
            self._setup_frozen()

    def _setup_frozen(self) -> None:
        if self.uses_reference:
            self.reference.setup(self)
        setup_segmentation(self)  # scorer and segmenter set-up; the scale is measured on the first rollout
        if self.seed is None:
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0))

    def step_seed(self, step: int) -> int:
        """The seed of rollout `step` (or of validation batch VAL + i) on this rank: a function of
        (seed, step, rank) only, so sampling resumes exactly and ranks draw different samples."""
        return ((self.seed * 1_000_003 + step) * 1024 + self.global_rank) % (1 << 62)

    def rollout_seed(self, step: int) -> int:
        """The seed of rollout `step` before the prompt: (seed, step), no rank (a group's stream is
        (seed, step, prompt index): the same prompt on any rank, in any batch, draws the same group)."""
        return (self.seed * 1_000_003 + step) % (1 << 62)

    # ------------------------------------------------------------------ rollout pieces
    @torch.no_grad()
    def sample(self, prompt_batch: dict, seed: int, n: int = 1, per_prompt: bool = False
               ) -> tuple[dict, Tensor, list[dict]]:
        """n responses per prompt (prompt-major). `per_prompt`: each prompt's group from its own seed,
        a function of (`seed`, the prompt's dataset index) (GRPO); else one stream for the batch.
        -> (rollout tensors with `index`, ended_with_eos [N], each row's prompt record (source, line,
        fields) for verifiable rewards)."""
        tok = self.trainer.datamodule.tokenizer
        prompts = left_padded_prompts(prompt_batch)
        with heap_allocations():  # the KV cache's many medium buffers: from the heap, trimmed after
            if per_prompt:
                seeds = [(seed * 1_000_033 + int(i)) % (1 << 62) for i in prompt_batch["index"]]
                batch, ended = sample_groups(self.policy, prompts, seeds, self.sampling, eos_id=tok.eos_token_id,
                                             pad_id=tok.pad_token_id, n=n, device=self.device)
            else:
                with seeded(seed, self.device):
                    batch, ended = sample_responses(self.policy, prompts, self.sampling, eos_id=tok.eos_token_id,
                                                    pad_id=tok.pad_token_id, n=n)
        batch["index"] = prompt_batch["index"].cpu().repeat_interleave(n)
        records = prompt_batch.get("rows") or [{}] * len(prompt_batch["index"])
        rows = [r for r in records for _ in range(n)]
        release_freed_memory()  # generation's KV cache and logits are freed: give them back to the OS
        return {k: v.to(self.device) for k, v in batch.items()}, ended.to(self.device), rows

    @torch.no_grad()
    def sequence_scores(self, batch: dict, ended: Tensor, rows: list[dict], split: str
                        ) -> tuple[Tensor, Tensor, TokenScores]:
        """-> (raw sequence scores [N], scores after `missing_eos_penalty` [N], the reward's token scores).
        The sequence score is the reward's token score at the last response token."""
        ts = self.reward.score({**batch, "rows": rows}, split)
        raw = gather_rows(ts.scores, last_response_index(batch["response_mask"], empty=0)).float()
        return raw, eos_penalised(raw, ended, self.missing_eos_penalty), ts

    @torch.no_grad()
    def in_eval_by_minibatch(self, roll: dict, forward) -> list:
        """`forward(mini-batch)` on the rollout's rows a mini-batch at a time, in eval mode (no dropout), so the
        vocabulary-sized work of the whole rollout never coexists. -> the outputs, in row order."""
        was_training = self.training
        self.eval()
        n = roll["input_ids"].shape[0]
        size = self.mini_batch_size or n
        parts = [forward({k: v[s:s + size] for k, v in roll.items()}) for s in range(0, n, size)]
        self.train(was_training)
        return parts

    def labels_from(self, signal: Tensor) -> tuple[Tensor, float]:
        """AM label l = sign(signal - b), ties +1; b = the running mean of `signal` (the first rollout's
        own mean over every rank), updated after use and checkpointed. -> (labels [N], the b used)."""
        baseline = self.label_baseline.mean if self.label_baseline.count else mean_and_count(signal)[0]
        self.label_baseline.update(signal[:, None], torch.ones_like(signal)[:, None])
        return torch.where(signal >= baseline, 1, -1).long(), baseline

    def actor_mask(self, roll: dict, reward_scores: TokenScores | None, rows: list[dict]):
        """The policy loss's mask response_mask * m_t and the Segmentation (None without a segmenter
        or during `segment_warmup_rollouts`)."""
        resp = roll["response_mask"]
        if self.segmenter is None or self.rollouts_done < self.segment_warmup_rollouts:
            return resp, None
        batch = {**roll, "rows": rows}
        if self.scorer is not None:
            ts = self.masker.signals(batch, "train")
        elif reward_scores is not None:
            ts = reward_scores
        else:
            raise AmrlhfError("the adaptive mask needs token scores: set model.init_args.scorer")
        if self.segmenter.calibrated_by_scale and not self.masker.calibrated:  # once, on the first segmented rollout
            log_scale(self, self.masker.calibrate(ts.scores[resp.bool()].float(), pooled=True, device=self.device))
        masked = self.masker.mask(batch, "train", signals=ts)
        return masked.mask, masked.segmentation

    # ------------------------------------------------------------------ optimisation
    def minibatch_loss(self, mb: dict) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def minibatch_parts(self, mb: dict) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """The mini-batch's loss as parts, each backpropagated before the next is computed (their sum is the
        loss; their gradients add up). One part by default; PPO with a critic on its own backbone yields the
        policy's and the critic's, so that the two backbones' activations never coexist."""
        yield self.minibatch_loss(mb)

    def optimise(self, roll: dict) -> dict[str, Tensor]:
        """`epochs` passes over the rollout in shuffled mini-batches (order seeded from the rollout
        number), one optimizer step each. -> the mean of each mini-batch statistic."""
        opt = self.optimizers()
        n = roll["input_ids"].shape[0]
        size = self.mini_batch_size or n
        order = torch.Generator().manual_seed(self.step_seed(self.rollouts_done))
        acc: dict[str, list[Tensor]] = defaultdict(list)
        for _ in range(self.epochs):
            perm = torch.randperm(n, generator=order)
            for start in range(0, n, size):
                idx = perm[start:start + size].to(self.device)
                stats = {}
                for loss, part_stats in self.minibatch_parts({k: v[idx] for k, v in roll.items()}):
                    self.manual_backward(loss)
                    stats.update(part_stats)
                if self.max_grad_norm:
                    self.clip_gradients(opt, gradient_clip_val=clip_threshold(self.max_grad_norm,
                                                                              self.trainer.precision_plugin),
                                        gradient_clip_algorithm="norm")
                opt.step()
                # freed at once: not kept through the next mini-batch's forward or the next rollout (the freed
                # memory is not trimmed here: a trim after every step cost 12-26% of a DPO step on a CPU and
                # lowered no peak; docs/performance.md)
                opt.zero_grad(set_to_none=True)
                for key, value in stats.items():
                    acc[key].append(value.detach())
        return {k: torch.stack(v).mean() for k, v in acc.items()}

    def training_step(self, batch: dict, batch_idx: int):
        roll, stats = self.make_rollout(batch)
        stats.update(self.optimise(roll))
        sequence_kl = stats.pop("_sequence_kl", None)  # absent when the KL is off or needs no old log-probs
        if sequence_kl is not None:
            # the mean sequence KL and the number of sequences of every rank's rollout (equal shares per rank)
            kl, sequences = mean_and_count(sequence_kl.expand(roll["input_ids"].shape[0]))
            self.kl_ctl.update(kl, sequences)
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        self.rollouts_done += 1
        self.log_sometimes({k: stats.pop(k) for k in BY_LABEL if k in stats})
        self.log_stats(stats, "train", roll["input_ids"].shape[0])

    # ------------------------------------------------------------------ exact resume
    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        return None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["amrlhf"][self.checkpoint_key] = {
            "rollouts_done": self.rollouts_done, "kl": self.kl_ctl.state_dict(),
            "label_baseline": self.label_baseline.state_dict(), "calibrated": self.masker.calibrated, "seed": self.seed,
            **self.extra_state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("amrlhf", {}).get(self.checkpoint_key)
        if state:
            self.rollouts_done = state["rollouts_done"]
            self.kl_ctl.load_state_dict(state["kl"])
            self.label_baseline.load_state_dict(state["label_baseline"])
            self.masker.calibrated = state["calibrated"]
            self.seed = state["seed"]
            self.load_extra_state(state)
