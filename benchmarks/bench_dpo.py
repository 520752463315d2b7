"""Benchmark (not a test): our DPO step vs TRL's DPOTrainer step, side by side.

Same model, same preference pairs (HaluEval dialogue when prepared, else tiny-arith), same batch,
same reference mode (a frozen reference model), no gradient checkpointing, fp32 on CPU, AdamW lr 1e-6 with
torch's default kernel (`--fused-adamw 1`: the fused one) and no gradient clipping on both sides (TRL's
defaults, fused AdamW and clipping at 1.0, are set to match). Each
(implementation, model) runs in its own process, so peak RSS is its own; implementations alternate
so that machine noise hits both. Prints s/step, tokens/s, peak RSS (and RSS right after imports) and the ratios
to TRL. `ours` is DPOModule's defaults (shared-prefix packing on); `ours-padded` the same with
`share_prefix=False` (the padded batch, as TRL runs it); `ours-in-backward` the defaults with `optimizer_in_backward`
(each weight's AdamW update inside the backward pass: the same weights, no full set of gradients held).

    python benchmarks/bench_dpo.py [--models tiny smollm2] [--impls ours ours-padded ours-in-backward trl]
        [--steps 4] [--warmup 2] [--fused-adamw 1] [--map-large-mb 0.25]
Needs `amrlhf prepare` for the models. The TRL side runs trl==1.16.0 as bench_grpo.py does: fetched once with
`pip download --no-deps` into $AMRLHF_HOME/cache/bench/trl-1.16.0, first on sys.path in the TRL process only
(an installed trl of another version is not used).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ppo import (  # noqa: E402
    add_adamw_argument,
    add_map_large_argument,
    import_pinned_trl,
    mapping_callbacks,
    ours_settings,
    run_child,
    trl_optim,
)

TRL_VERSION = "1.16.0"
IMPLS = ("ours", "ours-padded", "ours-in-backward", "trl")
MODELS = {
    "tiny": ("local:tiny-llama", "local:tiny-arith/prefs_train", 64),
    "smollm2": ("local:smollm2-135m-instruct", "local:halueval_dialogue/train", 256),
}


def _pairs(model: str, data: str, max_length: int, n: int):
    """The first n pairs whose prompt + longer response fit max_length (so neither side truncates)."""
    from amrlhf.data import encode_examples, read_examples
    from amrlhf.models import load_tokenizer

    tok = load_tokenizer(model)
    exs = read_examples(data, "preference", 20 * n)
    enc, _ = encode_examples(exs, tok, 10_000)
    keep = [i for i, e in enumerate(enc) if len(e.prompt_ids) + max(map(len, e.responses)) <= max_length][:n]
    return tok, [exs[i] for i in keep], [enc[i] for i in keep]


def _tokens(enc) -> int:
    return sum(2 * len(e.prompt_ids) + sum(map(len, e.responses)) for e in enc)


def run_ours(model: str, data: str, max_length: int, batch: int, steps: int, warmup: int,
             share_prefix: bool = True, in_backward: bool = False, map_large_mb: float = 0.0,
             fused_adamw: bool = False) -> dict:
    import lightning as L
    import torch

    from amrlhf.data import Collator
    from amrlhf.models import ModelSpec
    from amrlhf.modules import DPOModule, FrozenReference
    from amrlhf.segmenters import SampleWiseSegmenter

    tok, _, enc = _pairs(model, data, max_length, batch * (steps + warmup))
    torch.manual_seed(0)
    module = DPOModule(ModelSpec(model, dtype="float32"), reference=FrozenReference(),
                       segmenter=SampleWiseSegmenter(), lr=1e-6, share_prefix=share_prefix,
                       optimizer_in_backward=in_backward, fused_adamw=fused_adamw)
    loader = torch.utils.data.DataLoader(enc, batch_size=batch, collate_fn=Collator(tok.pad_token_id))
    times = []

    class Timer(L.Callback):
        def on_train_batch_start(self, *a):
            self.t = time.perf_counter()

        def on_train_batch_end(self, *a):
            times.append(time.perf_counter() - self.t)

    trainer = L.Trainer(accelerator="cpu", max_steps=steps + warmup, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Timer(), *mapping_callbacks(map_large_mb)])
    trainer.fit(module, train_dataloaders=loader)
    return {"times": times[warmup:], "tokens": _tokens(enc[batch * warmup:]) / steps}


def run_trl(model: str, data: str, max_length: int, batch: int, steps: int, warmup: int, optim: str) -> dict:
    import datasets
    import torch
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from amrlhf.models import ModelSpec, load_causal_lm

    tok, exs, enc = _pairs(model, data, max_length, batch * (steps + warmup))
    def conv(p):
        return [{"role": "user", "content": p}] if isinstance(p, str) else p

    ds = datasets.Dataset.from_list([{"prompt": conv(e.prompt), "chosen": [{"role": "assistant", "content": e.chosen}],
                                      "rejected": [{"role": "assistant", "content": e.rejected}]} for e in exs])
    torch.manual_seed(0)
    policy = load_causal_lm(ModelSpec(model, dtype="float32"))
    ref = load_causal_lm(ModelSpec(model, dtype="float32")).eval()
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    cfg = DPOConfig(output_dir=os.path.join("bench_out", "trl"), per_device_train_batch_size=batch,
                    max_length=max_length, beta=0.1, learning_rate=1e-6, max_steps=steps + warmup, use_cpu=True,
                    bf16=False, gradient_checkpointing=False, report_to=[], save_strategy="no", logging_steps=1000,
                    dataloader_num_workers=0, seed=0, optim=optim, max_grad_norm=0.0)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=cfg, train_dataset=ds, processing_class=tok,
                         callbacks=[Timer()])
    trainer.train()
    return {"times": times[warmup:], "tokens": _tokens(enc[batch * warmup:]) / steps}


def child(impl: str, name: str, args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    model, data, max_length = MODELS[name]
    if impl == "trl":
        import_pinned_trl(TRL_VERSION, "trl/trainer/dpo_trainer.py")
        from trl import DPOConfig, DPOTrainer  # noqa: F401  (trl imports lazily)
    else:
        import amrlhf.modules  # noqa: F401
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    run = (lambda *a: run_ours(*a, share_prefix=impl != "ours-padded", in_backward=impl == "ours-in-backward",
                               map_large_mb=args.map_large_mb, fused_adamw=bool(args.fused_adamw))) \
        if impl != "trl" else (lambda *a: run_trl(*a, optim=trl_optim(args)))
    out = run(model, data, max_length, args.batch, args.steps, args.warmup)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["import_rss_mb"] = baseline
    out["load1"] = os.getloadavg()[0]  # the machine's 1-min load when this side finished
    print("RESULT " + json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=list(MODELS))
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=2, help="pairs per step")
    p.add_argument("--threads", type=int, default=2)
    add_adamw_argument(p)
    add_map_large_argument(p)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child, args)
        return
    rows = []
    for name in args.models:
        res = {}
        for impl in args.impls:
            res[impl] = run_child(__file__, impl, name, args, exclude=("models", "impls", "child"))[0]
        rows.append((name, res))
    print(f"\nDPO step, CPU fp32, batch {args.batch} pairs, frozen reference, {args.steps} timed steps after "
          f"{args.warmup} warm-up, {args.threads} threads, no gradient clipping; TRL {TRL_VERSION}{ours_settings(args)}")
    print(f"{'model':10s}{'impl':18s}{'s/step':>10s}{'tokens/s':>11s}{'peak RSS MB':>13s}{'after imports':>15s}{'1-min load':>12s}")
    for name, res in rows:
        for impl, r in res.items():
            if r is None:
                print(f"{name:10s}{impl:18s}{'failed':>10s}")
                continue
            sps = sum(r["times"]) / len(r["times"])
            r["sps"] = sps
            print(f"{name:10s}{impl:18s}{sps:10.3f}{r['tokens'] / sps:11.0f}{r['peak_rss_mb']:13.0f}"
                  f"{r['import_rss_mb']:15.0f}{r['load1']:12.1f}")
        trl = res.get("trl")
        for impl in ("ours", "ours-padded", "ours-in-backward"):
            r = res.get(impl)
            if r and trl:
                above = (r["peak_rss_mb"] - r["import_rss_mb"]) / (trl["peak_rss_mb"] - trl["import_rss_mb"])
                print(f"{name:10s}{impl + '/TRL':25s}time {r['sps'] / trl['sps']:.2f}   peak RSS "
                      f"{r['peak_rss_mb'] / trl['peak_rss_mb']:.2f}   peak RSS above imports {above:.2f}")


if __name__ == "__main__":
    main()
