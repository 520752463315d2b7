"""Per-token values (reference log-probs, token scores) computed once per example and cached on
disk, keyed by what produced them and by the exact tokenized data, so a changed model (name, revision,
dtype, loading arguments, files), tokenizer, data set or max_length never reuses a stale cache. Values are stored PER TOKEN (masks need tokens,
not sums), per response of each example."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from amrlhf.errors import AmrlhfError

log = logging.getLogger(__name__)

# fn(batch) -> {"name": [N, T-1] per-token tensor or [N] per-sequence tensor}
ComputeFn = Callable[[dict], dict[str, Tensor]]


@dataclass
class RunData:
    """The run's data as a cache sees it (instead of the LightningModule and its trainer): the encoded examples of
    each split (None when absent), their collator, the tokenizer and max_length they were encoded with, the
    trainer's precision and its forward context (the autocast of `bf16-mixed`), and whether this process writes
    cache files (rank 0)."""

    splits: dict[str, list | None]
    collate: Callable[[list], dict[str, Tensor]]
    tokenizer: Any
    max_length: int
    precision: str = "32-true"
    forward_context: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext)
    write: bool = True


def model_fingerprint(spec) -> dict:
    """Identity of a frozen model (a ModelSpec) for cache keys: what its outputs depend on (name, revision,
    the dtype its weights load in, extra loading arguments), and size + mtime of its files if local."""
    from amrlhf.models.loading import resolve_model, torch_dtype

    path, gguf = resolve_model(spec.name)
    p = Path(path)
    files = {}
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.is_file() and f.suffix in {".safetensors", ".bin", ".gguf", ".json"}:
                st = f.stat()
                files[f.name] = [st.st_size, int(st.st_mtime)]
    return {"name": spec.name, "revision": spec.revision, "dtype": str(torch_dtype(spec.dtype)),
            "extra": spec.extra, "path": path, "gguf": gguf, "files": files}


def cache_key(meta: dict, data) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    for ex in data:
        h.update(json.dumps([ex.index, ex.prompt_ids, ex.responses]).encode())
    return h.hexdigest()[:24]


class PerTokenCache:
    """{split: {example index: [ {name: tensor} per response ]}}, filled by `build`, read by `lookup`."""

    def __init__(self, root: Path | None):
        self.root = root
        self.tables: dict[str, dict[int, list[dict[str, Tensor]]]] = {}

    def has(self, split: str) -> bool:
        return split in self.tables

    def build(self, split: str, key: str, data, collate, compute: ComputeFn, *, device, batch_size: int,
              desc: str, write: bool) -> None:
        path = self.root / f"{key}.pt"
        if path.exists():
            self.tables[split] = torch.load(path)
            log.info("%s (%s): cache hit %s", desc, split, path)
            return
        table: dict[int, list[dict[str, Tensor]]] = {}
        for start in tqdm(range(0, len(data), batch_size), desc=f"{desc} ({split})"):
            items = data[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate(items).items()}
            out = {k: v.float().cpu() for k, v in compute(batch).items()}
            B = len(items)
            for row in range(batch["input_ids"].shape[0]):
                k, j = divmod(row, B)
                length = int(batch["attention_mask"][row].sum()) - 1
                entry = {name: (v[row, :length].clone() if v.dim() == 2 else v[row].clone()) for name, v in out.items()}
                table.setdefault(items[j].index, []).append(entry)
                assert len(table[items[j].index]) == k + 1
        self.tables[split] = table
        if write:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(table, tmp)
            tmp.replace(path)  # atomic: a crash never leaves a partial cache that looks complete
        log.info("%s (%s): computed %d examples, cached at %s", desc, split, len(data), path)

    def fill(self, data: RunData, meta: dict, prepare: Callable[[], None],
             compute: Callable[[dict, str], dict[str, Tensor]], *, device, batch_size: int, desc: str) -> None:
        """Cache every split of the run's data; `prepare` (load the producing model) runs only when some split
        misses the cache. Values are computed under the run's precision (the autocast of `bf16-mixed`, as the
        training step's own forward passes are), part of the key."""
        meta = {**meta, "tokenizer": [data.tokenizer.name_or_path, len(data.tokenizer)], "max_length": data.max_length,
                "precision": data.precision}
        for split, examples in data.splits.items():
            if examples is None or self.has(split):
                continue
            key = cache_key({**meta, "split": split}, examples)
            if not (self.root / f"{key}.pt").exists():
                prepare()
            with data.forward_context():
                self.build(split, key, examples, data.collate, lambda b, s=split: compute(b, s), device=device,
                           batch_size=batch_size, desc=desc, write=data.write)

    def lookup(self, batch: dict, split: str, name: str) -> Tensor:
        table = self.tables.get(split)
        if table is None:
            raise AmrlhfError(f"no cached values for split '{split}'")
        idx = batch["index"].tolist()
        n_resp = batch["input_ids"].shape[0] // len(idx)
        first = table[idx[0]][0][name]
        if first.dim() == 0:
            out = torch.zeros(batch["input_ids"].shape[0])
            for k in range(n_resp):
                for j, i in enumerate(idx):
                    out[k * len(idx) + j] = table[i][k][name]
        else:
            out = torch.zeros(batch["response_mask"].shape, dtype=torch.float32)
            for k in range(n_resp):
                for j, i in enumerate(idx):
                    row = table[i][k][name]
                    out[k * len(idx) + j, : row.shape[0]] = row
        return out.to(batch["input_ids"].device)
