"""Helpers of benchmarks/gpu_dpo.py: model shapes built from their configs, synthetic pairs, the step clock,
peak FLOP/s and MFU, where TRL comes from, and the result table."""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time

import torch

SHAPES = {  # name: (transformers model family, config fields); random init, no weights carried
    "qwen05b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                              num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6)),
    "smollm2": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                              num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)),
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)),
}
PEAK_BF16 = (  # dense bf16 tensor-core FLOP/s by device-name fragment, first match wins
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200", 989e12), ("H100", 989e12), ("A100", 312e12),
    ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12),
)
TRL_VERSION = "1.16.0"
CUDA = torch.cuda.is_available()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def peak_flops(device_name: str, override: float | None = None) -> tuple[float | None, str]:
    """(peak dense bf16 FLOP/s, where it came from) for a device name; (None, why) when unknown."""
    if override:
        return override, "--peak-flops"
    for fragment, flops in PEAK_BF16:
        if fragment in device_name:
            return flops, f"table ({fragment})"
    return None, f"unknown device '{device_name}': pass --peak-flops"


def mfu(params: int, tokens: float, s_per_step: float, peak: float | None) -> float | None:
    """Model-FLOPs utilisation of a DPO step: 8 x params x tokens (policy forward + backward = 6, frozen
    reference forward = 2; recomputation and attention not counted) / step time / peak FLOP/s."""
    if not peak or not s_per_step:
        return None
    return 8 * params * tokens / s_per_step / peak


def build_policy(shape: str, root: str, device: str) -> tuple[str, int]:
    """A random-init causal LM of `shape` and a word-level tokenizer over its vocabulary (ids `t0`..), saved
    to root/policy -> (folder, parameter count, tied embeddings counted once). The reward model of the AM-DPO
    rows loads the same folder with a fresh scalar head."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    family, fields = SHAPES[shape]
    cfg = AutoConfig.for_model(family, max_position_embeddings=4096, **fields)
    torch.manual_seed(0)
    with torch.device(device):  # initialised on the GPU: seconds, not a minute of CPU init
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    folder = os.path.join(root, "policy")
    model.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    vocab = {f"t{i}": i for i in range(fields["vocab_size"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="t0", eos_token="t1").save_pretrained(folder)
    return folder, params


def synthetic_pairs(n: int, prompt: int, response: int, vocab: int, seed: int = 0) -> list:
    """n preference pairs (amrlhf.data Encoded) of random ids >= 3: a `prompt`-token prompt, two `response`-token
    responses (every row the same length: no padding, the same tokens for both implementations)."""
    from amrlhf.data.tokenize import Encoded

    g = torch.Generator().manual_seed(seed)

    def ids(k: int) -> list[int]:
        return torch.randint(3, vocab, (k,), generator=g).tolist()

    return [Encoded(index=i, prompt_ids=ids(prompt), responses=[ids(response), ids(response)]) for i in range(n)]


def bench_data(examples: list, tokenizer, batch_size: int):
    """A LightningDataModule over `examples` in order, with what DPOModule's components read from one
    (tokenizer, train_data, val_data, max_length, batch_size, collator)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from amrlhf.data.collate import Collator

    class BenchData(L.LightningDataModule):
        def __init__(self):
            super().__init__()
            self.tokenizer, self.train_data, self.val_data, self.batch_size = tokenizer, examples, None, batch_size
            self.max_length = max(len(e.prompt_ids) + max(map(len, e.responses)) for e in examples)

        def collator(self) -> Collator:
            return Collator(self.tokenizer.pad_token_id)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(self.train_data, batch_size=self.batch_size, shuffle=False, collate_fn=self.collator(),
                              drop_last=True)

    return BenchData()


def compile_layers(model) -> None:
    """torch.compile each decoder layer in place (the model keeps its class, so amrlhf's lean forward still
    recognises it; one compiled graph serves every layer)."""
    from amrlhf.strategies import repeated_layers

    for layer in repeated_layers(model):
        layer.compile()


class StepClock:
    """Wall time of each optimizer step (CUDA-synchronised at both ends) and the peak CUDA memory from the first
    step on. `stop()` returns True when the run should end early: `limit_s` seconds after the first step, once
    at least one timed step (after `warmup`) is in."""

    def __init__(self, warmup: int, limit_s: float):
        self.warmup, self.limit_s = warmup, limit_s
        self.times: list[float] = []
        self.first = self.t = None
        self.base = torch.cuda.memory_allocated() if CUDA else 0

    def begin(self) -> None:
        sync()
        if CUDA:
            torch.cuda.reset_peak_memory_stats()

    def start(self) -> None:
        sync()
        self.t = time.perf_counter()
        self.first = self.first or self.t

    def stop(self) -> bool:
        sync()
        now = time.perf_counter()
        self.times.append(now - self.t)
        return len(self.times) > self.warmup and now - self.first > self.limit_s

    def result(self, tokens: int, params: int, peak: float | None, loss) -> dict:
        timed = self.times[self.warmup:]
        if not timed:
            return {"not_run": f"no timed step ({len(self.times)} steps ran, {self.warmup} warm-up)"}
        sps = sum(timed) / len(timed)
        return {"timed_steps": len(timed), "s_per_step": sps, "tokens_per_s": tokens / sps,
                "peak_gib": (torch.cuda.max_memory_allocated() - self.base) / 2**30 if CUDA else math.nan,
                "mfu": mfu(params, tokens, sps, peak),
                "loss_finite": loss is not None and bool(torch.isfinite(loss).all())}


def _trl_installed() -> bool:
    return importlib.util.find_spec("trl") is not None


def find_trl(path: str | None, fetch) -> tuple[str | None, str]:
    """Where TRL is imported from -> (a folder to put first on sys.path, "" for the installed package, None when
    there is none; what it is, or why none). In order: `path` (--trl-path: an unzipped wheel, or a
    `pip install --target` folder that also holds TRL's own needs), the installed `trl`, then
    `fetch(TRL_VERSION, marker)` (bench_ppo.trl_dir: the wheel unzipped into the asset cache, downloaded with pip
    if missing, which needs network; pip is told not to retry)."""
    if path:
        return path, f"--trl-path {path}"
    if _trl_installed():
        return "", "the installed trl"
    os.environ.setdefault("PIP_RETRIES", "0")
    os.environ.setdefault("PIP_DEFAULT_TIMEOUT", "10")
    try:
        folder = fetch(TRL_VERSION, "trl/trainer/dpo_trainer.py")
    except (RuntimeError, OSError) as exc:
        why = " ".join(str(exc).split())[-300:]
        return None, (f"trl is not installed, no --trl-path was given, and trl=={TRL_VERSION} could not be fetched "
                      f"into the asset cache ({why})")
    return folder, f"trl=={TRL_VERSION} unzipped in {folder}"


def import_trl(folder: str) -> str:
    """Import trl (from `folder` first when given) -> its version; raises ImportError saying what failed."""
    if folder and folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        import trl
        from trl import DPOConfig, DPOTrainer  # noqa: F401  (trl imports its trainers lazily)
    except Exception as exc:
        if folder in sys.path:
            sys.path.remove(folder)
        hint = " (TRL needs datasets, dill and multiprocess: see docs/gpu_benchmark.md)" \
            if isinstance(exc, ModuleNotFoundError) else ""
        raise ImportError(f"import trl failed: {type(exc).__name__}: {exc}{hint}") from None
    return trl.__version__


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def table(rows: list[dict]) -> str:
    """The markdown result table: one line per (variant, implementation, gradient checkpointing)."""
    out = ["| variant | impl | grad. ckpt | timed steps | s/step | tokens/s | peak GiB | MFU | loss finite |",
           "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        head = f"| {r['variant']} | {r['impl']} | {'on' if r['gc'] else 'off'} |"
        if "not_run" in r:
            out.append(f"{head} not run: {r['not_run']} |" + " |" * 5)
            continue
        out.append(f"{head} {r['timed_steps']} | {r['s_per_step']:.4f} | {r['tokens_per_s']:,.0f} | "
                   f"{_cell(r, 'peak_gib', '.2f')} | {_cell(r, 'mfu', '.1%')} | {r['loss_finite']} |")
    return "\n".join(out)


def _versus(label: str, a: dict, b: dict) -> str:
    """`label tokens/s A/B, peak memory A/B` (n/a where B's peak is unknown: on the CPU)."""
    mem = a["peak_gib"] / b["peak_gib"] if b["peak_gib"] and not math.isnan(b["peak_gib"]) else None
    return (f"{label} tokens/s {a['tokens_per_s'] / b['tokens_per_s']:.2f}x, peak memory "
            f"{'n/a' if mem is None else f'{mem:.2f}x'}")


def ratios(rows: list[dict]) -> list[str]:
    """One line per gradient-checkpointing setting: our DPO row over TRL's (tokens/s, peak memory); then, where it
    ran, the in-backward row (checkpointing on) over our DPO row and over TRL's."""
    lines = []
    for gc in (False, True):
        pick = {r["impl"]: r for r in rows if r["variant"] == "DPO" and r["gc"] == gc}
        ours, trl = pick.get("ours"), pick.get("TRL")
        if ours is None and trl is None:
            continue
        label = f"ours/TRL, gradient checkpointing {'on' if gc else 'off'}:"
        missing = [name for name, r in (("ours", ours), ("TRL", trl)) if r is None or "not_run" in r]
        if missing:
            lines.append(f"{label} n/a ({' and '.join(missing)} not run)")
            continue
        lines.append(_versus(label, ours, trl))
    ran = {(r["variant"], r["impl"]): r for r in rows if r["gc"] and "not_run" not in r}
    in_bwd = ran.get(("DPO in backward", "ours"))
    for impl in ("ours", "TRL"):
        base = ran.get(("DPO", impl))
        if in_bwd and base:
            lines.append(_versus(f"ours in backward/{impl}, gradient checkpointing on:", in_bwd, base))
    return lines
