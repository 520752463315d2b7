"""What every module shares: the policy slot, the segmenter slot, the optimizer, and logging.

A module's step is: forward -> segmenter -> pure loss function -> log (docs/method.md, conventions).
"""

from __future__ import annotations

import dataclasses
import logging

import lightning as L
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import Tensor

from amrlhf.errors import AmrlhfError, ConfigError
from amrlhf.models import ModelSpec
from amrlhf.modules.masking import Masker, setup_segmentation
from amrlhf.optimizers import AdamWInBackward
from amrlhf.scorers import TokenScorer
from amrlhf.segmenters import PivotSegmenter, Segmentation, Side

log = logging.getLogger(__name__)


def _writes_logs_now(trainer) -> bool:
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


def check_optimizer(lr: float, weight_decay: float, warmup_steps: int, betas: tuple[float, float]) -> None:
    """Refuse optimizer settings AdamW would refuse only at the first step (or never, for warm-up)."""
    if lr < 0:
        raise ConfigError(f"lr must be >= 0, got {lr}")
    if weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}")
    if warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"betas must be two numbers in [0, 1), got {tuple(betas)}")


class PackedForward:
    """For a module whose policy reads response tokens only and has `logits_chunk` and `share_prefix`
    (DPOModule, GRPOModule): the options of its policy's forward, which its reference reuses
    (`amrlhf.modules.reference.logps_as_policy`), so the two are computed alike."""

    logits_chunk: int | None
    share_prefix: bool

    def forward_options(self) -> dict:
        """The vocabulary projection `logits_chunk` tokens at a time and for response tokens only (nothing
        else is read), the rows of one item (a pair, a prompt's responses) packed when `share_prefix`."""
        return {"chunk_size": self.logits_chunk, "share_prefix": self.share_prefix, "responses_only": True}


class _DetachOnException(L.Callback):
    """A fit that fails skips the module's teardown: its in-backward hooks are removed here."""

    def on_exception(self, trainer, pl_module, exception) -> None:
        pl_module._detach_in_backward()


def _as_configured(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """`opt`, run with the kernel it was built with (`fused`, `foreach`) whatever a checkpoint says: torch takes a
    loaded state dict's kernel, and places its `step` counters by it, so a fit resumed from another kernel's
    checkpoint would run that kernel. The fused kernel also declares that it can unscale gradients itself, and
    Lightning's mixed-precision plugin then refuses to clip; here it takes gradients already unscaled, as the
    default kernel does: Lightning unscales (16-mixed), clips, then steps, through its own plugins."""
    kernel = {k: opt.defaults[k] for k in ("fused", "foreach") if k in opt.defaults}

    def keep_kernel(optimizer: torch.optim.Optimizer, state: dict) -> dict:
        return {**state, "param_groups": [{**group, **kernel} for group in state["param_groups"]]}

    opt.register_load_state_dict_pre_hook(keep_kernel)
    if opt.defaults.get("fused"):
        opt._step_supports_amp_scaling = False
    return opt


class AlignmentModule(L.LightningModule):
    """Base for SFT / reward / DPO modules: loads `policy` in `configure_model`, owns AdamW with
    linear warm-up, and logs metric dicts (`eval/` prefix for validation, reduced across devices)."""

    def __init__(
        self,
        policy: ModelSpec,
        segmenter: PivotSegmenter | None = None,
        scorer: TokenScorer | None = None,
        score_calibration_batches: int = 8,
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        betas: tuple[float, float] = (0.9, 0.999),
        mask_side: Side = "both",
        optimizer_in_backward: bool = False,
        fused_adamw: bool = False,
    ):
        super().__init__()
        check_optimizer(lr, weight_decay, warmup_steps, betas)
        self.optimizer_in_backward, self.fused_adamw = optimizer_in_backward, fused_adamw
        self.policy_spec = policy
        # segmenter None = the unmasked path (m = response mask): the reference for parity tests.
        self.masker = Masker(segmenter, scorer, score_calibration_batches, mask_side)
        self.lr, self.weight_decay, self.warmup_steps, self.betas = lr, weight_decay, warmup_steps, betas
        self.policy = None

    # The masker's parts, as the recipe names them (model.init_args.segmenter / scorer); read-only, so that the
    # masker's checks at construction (a side needs a segmenter) cannot be undone through the module.
    @property
    def segmenter(self) -> PivotSegmenter | None:
        return self.masker.segmenter

    @property
    def scorer(self) -> TokenScorer | None:
        return self.masker.scorer

    def load_policy(self):
        from amrlhf.models import load_causal_lm

        return load_causal_lm(self.policy_spec)

    def configure_model(self) -> None:
        if self.policy is None:
            self.policy = self.load_policy()

    def configure_optimizers(self):
        opt = self.adamw([p for p in self.parameters() if p.requires_grad])
        if not self.warmup_steps:
            return opt
        warm = self.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def adamw(self, params: list, **kernel) -> torch.optim.Optimizer:
        """AdamW over `params` with the module's settings (`kernel`: foreach / fused; `fused_adamw` sets fused),
        stepped inside the backward pass when `optimizer_in_backward` (the trainer's settings were checked in
        `setup`)."""
        self._detach_in_backward()  # an earlier fit's hooks (one that failed: teardown runs on success only)
        kw = dict(lr=self.lr, weight_decay=self.weight_decay, betas=self.betas,
                  **({"fused": True} if self.fused_adamw else {}) | kernel)
        if not self.optimizer_in_backward:
            return _as_configured(torch.optim.AdamW(params, **kw))
        self._in_backward = _as_configured(AdamWInBackward(params, **kw))
        return self._in_backward

    def check_optimizer_in_backward(self) -> None:
        """Refuse the trainer settings under which updating each weight inside the backward pass (amrlhf.optimizers)
        would train something else than the plain AdamW step: each needs every gradient before any update."""
        t = self.trainer
        why = []
        if t.gradient_clip_val:
            why.append(f"trainer.gradient_clip_val ({t.gradient_clip_val}): the global norm needs every gradient "
                       "(set trainer.gradient_clip_val: null)")
        if t.accumulate_grad_batches != 1:
            why.append(f"trainer.accumulate_grad_batches ({t.accumulate_grad_batches}): every backward pass would "
                       "step; use a larger data.batch_size")
        if t.world_size > 1 or not isinstance(t.strategy, SingleDeviceStrategy):
            why.append(f"the {type(t.strategy).__name__} strategy: a weight would be updated before its gradient is "
                       "reduced across devices; optimizer_in_backward runs on one device")
        if t.precision == "16-mixed":
            why.append("precision 16-mixed: its gradient scaler unscales and checks every gradient before the step; "
                       "use bf16-mixed")
        if why:
            raise AmrlhfError(f"{type(self).__name__}: optimizer_in_backward updates each weight as soon as its "
                              f"gradient exists, which rules out {'; '.join(why)}")

    _in_backward: AdamWInBackward | None = None

    def _detach_in_backward(self) -> None:
        """The hooks of an optimizer stepped in the backward pass leave with the fit: a later backward through this
        module keeps its gradients and leaves the weights alone."""
        if self._in_backward is not None:
            self._in_backward.detach()
            self._in_backward = None

    def configure_callbacks(self):
        return [_DetachOnException()] if self.optimizer_in_backward else []

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.optimizer_in_backward:  # before the model loads
            self.check_optimizer_in_backward()

    def on_train_epoch_start(self) -> None:
        if self.optimizer_in_backward:  # again: a GradientAccumulationScheduler sets the accumulation per epoch
            self.check_optimizer_in_backward()

    def teardown(self, stage: str) -> None:
        self._detach_in_backward()

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Lightning's step, then the gradients freed at once. Lightning zeroes them inside the next
        step's closure, after the forward pass, so the last step's gradients (one float32 copy of the
        trainable weights) would otherwise stay allocated through the next forward, on top of its
        activations (docs/performance.md, "Gradients")."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    def mask_for(self, batch: dict, split: str) -> tuple[Tensor, Segmentation | None]:
        """The loss mask [N, T-1] and the Segmentation (None on the unmasked path)."""
        masked = self.masker.mask(batch, split)
        return masked.mask, masked.segmentation

    def on_fit_start(self) -> None:
        self.check_positions()
        self._setup_frozen()
        setup_segmentation(self)

    def _setup_frozen(self) -> None:
        """Frozen components set up before training (DPO's reference): after the checks, before segmentation."""

    def check_positions(self) -> None:
        """Every encoded row within the policy's positions, before anything runs on the data (a longer row
        fails deep inside the model's embeddings): a max_length above the limit is fine while no row reaches it."""
        limit = getattr(getattr(self.policy, "config", None), "max_position_embeddings", None)
        dm = self.trainer.datamodule
        if limit is None or dm is None:
            return
        for split in ("train", "val"):
            for e in getattr(dm, f"{split}_data", None) or []:
                n = len(e.prompt_ids) + max((len(r) for r in e.responses), default=0)
                if n > limit:
                    skip = getattr(dm, "skip_train", 0) if split == "train" else 0
                    raise ConfigError(
                        f"{split} row {e.index + 1 + skip}: {n} tokens under data.max_length "
                        f"({getattr(dm, 'max_length', None)}), more than the policy's maximum of {limit} positions "
                        f"({self.policy_spec.name}): set data.init_args.max_length to {limit} or less")

    def on_validation_start(self) -> None:
        if self.trainer.state.fn != "fit":
            setup_segmentation(self)

    def log_stats(self, stats: dict[str, Tensor], split: str, batch_size: int) -> None:
        prefix = "" if split == "train" else "eval/"
        on_step = split == "train"
        if on_step and self._trainer is not None and not _writes_logs_now(self.trainer):
            return  # Lightning writes step metrics every log_every_n_steps: skip the work in between
        for key, value in stats.items():
            v = value.float().mean() if value.dim() else value.float()
            self.log(prefix + key, v, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step,
                     batch_size=batch_size, prog_bar=key in self.progress_keys)

    def log_sometimes(self, stats: dict[str, Tensor]) -> None:
        """Training metrics that a step may lack (no response labelled -1 in a PPO rollout): sent to the
        logger directly at this step, since Lightning would repeat a metric's last value at every later
        step that did not log it. Rank 0's values."""
        if self._trainer is None or self.logger is None or not stats or not _writes_logs_now(self.trainer):
            return
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped  # the step Lightning logs this batch at
        self.logger.log_metrics({k: float(v) for k, v in stats.items()}, step=step)

    progress_keys: tuple[str, ...] = ()
    best_metric: tuple[str, str] = ("eval/loss", "min")  # what the "best" checkpoint monitors

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What `amrlhf export` needs to rebuild the policy without the recipe.
        checkpoint["amrlhf"] = {"module": f"{type(self).__module__}.{type(self).__qualname__}",
                                "policy": dataclasses.asdict(self.policy_spec)}
        state = self.masker.state_dict()  # measured scale, running-mean baseline
        if state:
            checkpoint["amrlhf"]["segmenter"] = state
        # Keep only trainable weights when the policy is LoRA: the frozen base is reloaded by name.
        if self.policy_spec.lora is not None:
            trainable = {n for n, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.configure_model()
        state = checkpoint.get("amrlhf", {}).get("segmenter")
        if state:
            self.masker.load_state_dict(state)
        if self.policy_spec.lora is not None:
            missing = self.state_dict()
            missing.update(checkpoint["state_dict"])
            checkpoint["state_dict"] = missing
