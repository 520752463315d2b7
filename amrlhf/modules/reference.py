"""Where the DPO reference log-probs come from: components injected by `class_path`.

- `FrozenReference`: a frozen copy (of the policy's model, or another one).
- `AdapterReference`: the LoRA policy with its adapters disabled (no second model in memory).
  The reference is then whatever the adapters sit on: train LoRA on top of the SFT model's
  weights, not the raw base, if the reference must be the SFT model.
- `CachedReference`: per-token log-probs computed once with another reference and cached on
  disk PER TOKEN (masks need tokens, not sums), keyed by model, tokenizer, data and max_length.
The reference model is never a registered submodule, so it is never in a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from amrlhf.errors import AmrlhfError
from amrlhf.models import ModelSpec, load_causal_lm
from amrlhf.models.forward import response_logps
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


def forward_logps(model, batch: dict) -> Tensor:
    return response_logps(model, batch)[0]


class FrozenReference:
    """A frozen model in eval mode. model=None: a fresh copy of the policy's ModelSpec, without LoRA."""

    def __init__(self, model: ModelSpec | None = None):
        self.spec = model
        self._model: list = []  # a list, so the model is not registered (not checkpointed)

    def setup(self, module) -> None:
        if self._model:
            return
        spec = self.spec or ModelSpec(name=module.policy_spec.name, dtype=module.policy_spec.dtype)
        model = load_causal_lm(spec).eval().requires_grad_(False)
        self._model.append(model.to(module.device))

    @torch.no_grad()
    def logps(self, module, batch: dict, split: str) -> Tensor:
        model = self._model[0]
        if next(model.parameters()).device != module.device:
            model.to(module.device)
        return forward_logps(model, batch)


class AdapterReference:
    """The policy with its LoRA adapters disabled."""

    def setup(self, module) -> None:
        if not hasattr(module.policy, "disable_adapter"):
            raise AmrlhfError("AdapterReference needs a LoRA policy: set model.policy.lora in the recipe")

    @torch.no_grad()
    def logps(self, module, batch: dict, split: str) -> Tensor:
        with module.policy.disable_adapter():
            return forward_logps(module.policy, batch)


def _fingerprint(name: str) -> dict:
    """Identity of a model for cache keys: its name, and size+mtime of its files if local."""
    from amrlhf.models.loading import resolve_model

    path, gguf = resolve_model(name)
    p = Path(path)
    files = {}
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.is_file() and f.suffix in {".safetensors", ".bin", ".gguf", ".json"}:
                st = f.stat()
                files[f.name] = [st.st_size, int(st.st_mtime)]
    return {"name": name, "path": path, "gguf": gguf, "files": files}


class CachedReference:
    """Reference log-probs computed once per example with `source` and cached per token on disk."""

    def __init__(self, source: ReferenceModel | None = None, cache: str | None = None, batch_size: int = 4):
        self.source = source or FrozenReference()
        self.cache_root = Path(cache) if cache else None
        self.batch_size = batch_size
        self._table: dict[str, dict[int, Tensor]] = {}

    def _key(self, module, split: str, data) -> str:
        h = hashlib.sha256()
        ref_name = getattr(self.source, "spec", None)
        ref_name = ref_name.name if ref_name else module.policy_spec.name
        dm = module.trainer.datamodule
        meta = {
            "source": type(self.source).__name__,
            "model": _fingerprint(ref_name),
            "tokenizer": [dm.tokenizer.name_or_path, len(dm.tokenizer)],
            "max_length": dm.max_length,
            "split": split,
        }
        h.update(json.dumps(meta, sort_keys=True).encode())
        for ex in data:
            h.update(json.dumps([ex.index, ex.prompt_ids, ex.responses]).encode())
        return h.hexdigest()[:24]

    def setup(self, module) -> None:
        dm = module.trainer.datamodule
        for split, data in (("train", dm.train_data), ("val", dm.val_data)):
            if data is None or split in self._table:
                continue
            root = self.cache_root or cache_dir("reflogps")
            root.mkdir(parents=True, exist_ok=True)
            path = root / f"{self._key(module, split, data)}.pt"
            if path.exists():
                self._table[split] = torch.load(path)
                log.info("reference log-probs (%s): cache hit %s", split, path)
                continue
            self.source.setup(module)
            self._table[split] = self._compute(module, dm, data, split)
            if module.trainer.is_global_zero:
                tmp = path.with_suffix(".tmp")
                torch.save(self._table[split], tmp)
                tmp.replace(path)
            log.info("reference log-probs (%s): computed %d examples, cached at %s", split, len(data), path)
        self._release_source()

    def _release_source(self) -> None:
        if isinstance(self.source, FrozenReference):
            self.source._model.clear()  # free the reference model: the cache is all we need

    def _compute(self, module, dm, data, split: str) -> dict[int, Tensor]:
        collate = dm._collator()
        table = {}
        for start in tqdm(range(0, len(data), self.batch_size), desc=f"reference log-probs ({split})"):
            items = data[start : start + self.batch_size]
            batch = {k: v.to(module.device) for k, v in collate(items).items()}
            lp = self.source.logps(module, batch, split).float().cpu()
            n_resp, B = len(items[0].responses), len(items)
            for k in range(n_resp):
                for j, it in enumerate(items):
                    row = k * B + j
                    length = int(batch["attention_mask"][row].sum()) - 1
                    table.setdefault(it.index, []).append(lp[row, :length].clone())
        return table

    def logps(self, module, batch: dict, split: str) -> Tensor:
        table = self._table.get(split)
        if table is None:
            raise AmrlhfError(f"CachedReference has no cache for split '{split}'")
        idx = batch["index"].tolist()
        n_resp = batch["input_ids"].shape[0] // len(idx)
        out = torch.zeros(batch["response_mask"].shape, dtype=torch.float32)
        for k in range(n_resp):
            for j, i in enumerate(idx):
                row = table[i][k]
                out[k * len(idx) + j, : row.shape[0]] = row
        return out.to(batch["input_ids"].device)
