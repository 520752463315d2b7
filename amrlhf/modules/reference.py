"""Where the DPO reference log-probs come from: components injected by `class_path`.

- `FrozenReference`: a frozen copy (of the policy's model, loaded as the policy is: the same name,
  revision, dtype and extra loading arguments, without LoRA; or another model).
- `AdapterReference`: the LoRA policy with its adapters disabled (no second model in memory).
  The reference is then whatever the adapters sit on: train LoRA on top of the SFT model's
  weights, not the raw base, if the reference must be the SFT model.
- `CachedReference`: per-token log-probs computed once with another reference and cached on
  disk PER TOKEN (masks need tokens, not sums), keyed by model (name, revision, dtype, extra, files),
  tokenizer, data and max_length.
The reference model is never a registered submodule, so it is never in a checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from amrlhf.cache import PerTokenCache, model_fingerprint
from amrlhf.errors import AmrlhfError
from amrlhf.models import ModelSpec, load_causal_lm
from amrlhf.models.forward import DEFAULT_LOGITS_CHUNK, lean_forward
from amrlhf.modules.context import run_data
from amrlhf.paths import cache_dir

log = logging.getLogger(__name__)


@runtime_checkable
class ReferenceModel(Protocol):
    def setup(self, module) -> None:
        """Called once at the start of fit/validate, with the LightningModule (policy loaded)."""
        ...

    def logps(self, module, batch: dict, split: str) -> Tensor:
        """Per-token reference log-probs [N, T-1] for `batch` (aligned with input_ids[:, 1:])."""
        ...


def logps_as_policy(model, module, batch: dict) -> Tensor:
    """Per-token log-probs [N, T-1] of a frozen `model` computed as the module's policy computes its own (its
    `forward_options()`, else its `logits_chunk`): on the same batch (DPO) the two agree bit for bit at
    step 0. GRPO's reference reads the whole rollout and its policy mini-batches, packed in other runs, so
    there they agree to float32 rounding."""
    if hasattr(module, "forward_options"):
        return lean_forward(model, batch, **module.forward_options()).logps
    return lean_forward(model, batch, chunk_size=getattr(module, "logits_chunk", DEFAULT_LOGITS_CHUNK)).logps


class FrozenReference:
    """A frozen model in eval mode. model=None: a fresh copy of the policy's ModelSpec, without LoRA."""

    def __init__(self, model: ModelSpec | None = None):
        self.spec = model
        self._model: list = []  # a list, so the model is not registered (not checkpointed)

    def reference_spec(self, module) -> ModelSpec:
        """What this reference loads: `model`, else the policy's spec (name, revision, dtype, extra) without
        LoRA or gradient checkpointing, so that it computes what the initial policy computes."""
        return self.spec or replace(module.policy_spec, lora=None, gradient_checkpointing=False)

    def setup(self, module) -> None:
        if self._model:
            return
        spec = self.reference_spec(module)
        model = load_causal_lm(spec, trainable=False).eval().requires_grad_(False)
        self._model.append(model.to(module.device))

    @torch.no_grad()
    def logps(self, module, batch: dict, split: str) -> Tensor:
        model = self._model[0]
        if next(model.parameters()).device != module.device:
            model.to(module.device)
        return logps_as_policy(model, module, batch)


class AdapterReference:
    """The policy with its LoRA adapters disabled."""

    def setup(self, module) -> None:
        if not hasattr(module.policy, "disable_adapter"):
            raise AmrlhfError("AdapterReference needs a LoRA policy: set model.policy.lora in the recipe")

    @torch.no_grad()
    def logps(self, module, batch: dict, split: str) -> Tensor:
        with module.policy.disable_adapter():
            return logps_as_policy(module.policy, module, batch)


class CachedReference:
    """Reference log-probs computed once per example with `source` and cached per token on disk."""

    def __init__(self, source: ReferenceModel | None = None, cache: str | None = None, batch_size: int = 4):
        self.source = source or FrozenReference()
        self.cache = PerTokenCache(Path(cache) if cache else None)
        self.batch_size = batch_size

    def setup(self, module) -> None:
        self.cache.root = self.cache.root or cache_dir("reflogps")
        # AdapterReference: the policy's own base model
        spec = self.source.reference_spec(module) if hasattr(self.source, "reference_spec") else module.policy_spec
        meta = {"source": type(self.source).__name__, "model": model_fingerprint(spec)}
        self.cache.fill(run_data(module), meta, lambda: self.source.setup(module),
                        lambda b, split: {"logps": self.source.logps(module, b, split)},
                        device=module.device, batch_size=self.batch_size, desc="reference log-probs")
        if isinstance(self.source, FrozenReference):
            self.source._model.clear()  # free the reference model: the cache is all we need

    def logps(self, module, batch: dict, split: str) -> Tensor:
        return self.cache.lookup(batch, split, "logps")
