"""GPU benchmark (not a test): our DPO step and TRL's DPOTrainer step, side by side on one card in one run.

A random-init model of Qwen2.5-0.5B's shape (--shape; built from its config on the card, saved once to a
temporary folder), 8 pairs x (256 prompt + 256 response) tokens per step (every row that long: no padding, the
same token ids for both), bf16 autocast over float32 master weights, a frozen reference in bf16, AdamW at lr 1e-6,
gradient clipping at 1.0, 3 warm-up + 10 timed steps. Rows, implementations alternating:
  DPO ours / TRL with gradient checkpointing off, then on;
  DPO in backward: ours with checkpointing on and `optimizer_in_backward` (each weight's AdamW update inside the
  backward pass, so the float32 gradients are never all held; it cannot clip, so this row does not);
  AM-DPO cached (reward-model scores computed once before training: CachedScorer) and AM-DPO online (a
  reward-model forward every step; the reward model is the policy's folder with a fresh head), ours only;
  DPO padded: ours without shared-prefix packing (each prompt run twice), the last row.
Our packed rows compute pairs x (prompt + 2 x response) positions: their MFU counts those, their tokens/s every
token of both rows, as TRL's does.
Ours: amrlhf's DPOModule through Lightning (`precision="bf16-mixed"`). TRL: trl.DPOTrainer (`bf16=True`) on the
same ids (pre-tokenized: its dataset preparation is skipped). Options for both sides, named in the table's
header: --compile (torch.compile of each decoder layer), --fused-adamw, --cached-ref (reference log-probs
computed once before training under bf16 autocast, no reference model kept: our CachedReference over the bf16
reference, TRL's precompute_ref_log_probs). Per row: s/step, tokens/s (every token of both responses and their
prompts), peak GiB (max_memory_allocated from the first step, above what was allocated before the row), MFU
(8 x params x tokens / s / peak bf16 FLOP/s: the card's from a table, or --peak-flops) and the ratios ours/TRL.
Each row's steps are time-boxed (--row-seconds), the run too (--budget: a row that would start later is "not
run"); a row that fails says why ("not run: ...") and the others still run.

TRL comes from --trl-path DIR (put first on sys.path: an unzipped wheel, or a `pip install --target` folder),
else the installed trl, else trl==1.16.0 through bench_ppo.trl_dir (asset cache; pip download: network). The
GPU machine has no network and no trl, datasets, dill or multiprocess: carry their wheels in .whl/
(docs/gpu_benchmark.md) and run, from the repository root, in one command (the timeout stops it under 4 minutes):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 timeout 230 python3 benchmarks/gpu_dpo.py --json $OUT/gpu_dpo.json

CPU check in seconds (tests/test_gpu_bench.py): `python benchmarks/gpu_dpo.py --dry-run --no-trl` (tiny shape,
2 pairs x (32+32), 1 warm-up + 1 timed step, on the CPU when there is no GPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ppo import trl_dir  # noqa: E402
from gpu_common import (  # noqa: E402
    CUDA,
    SHAPES,
    StepClock,
    bench_data,
    build_policy,
    compile_layers,
    find_trl,
    import_trl,
    mfu,
    peak_flops,
    ratios,
    synthetic_pairs,
    table,
)

log = logging.getLogger("gpu_dpo")
LR = 1e-6
ROWS = (("DPO", "ours", False), ("DPO", "TRL", False), ("DPO", "ours", True), ("DPO", "TRL", True),
        ("DPO in backward", "ours", True), ("AM-DPO cached", "ours", False), ("AM-DPO online", "ours", False),
        ("DPO padded", "ours", False))
DRY_RUN = dict(shape="tiny", pairs=2, prompt=32, response=32, warmup=1, steps=1)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments; a bad one ends the script with exit code 2 and a message naming it."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen05b", choices=list(SHAPES))
    p.add_argument("--pairs", type=int, default=8, help="preference pairs per step")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens per pair")
    p.add_argument("--response", type=int, default=256, help="tokens of each response")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "32-true"])
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (both sides)")
    p.add_argument("--fused-adamw", action="store_true", help="fused AdamW (both sides; default: foreach)")
    p.add_argument("--cached-ref", action="store_true", help="reference log-probs computed once (both sides)")
    p.add_argument("--peak-flops", type=float, help="peak dense bf16 FLOP/s of the card, for MFU")
    p.add_argument("--trl-path", help="folder holding an unzipped trl wheel (and its needs), put first on sys.path")
    p.add_argument("--no-trl", action="store_true", help="run our rows only")
    p.add_argument("--row-seconds", type=float, default=25.0, help="a row stops this long after its first step")
    p.add_argument("--budget", type=float, default=200.0, help="no row starts after this many seconds")
    p.add_argument("--dry-run", action="store_true",
                   help="check the script: " + ", ".join(f"{k} {v}" for k, v in DRY_RUN.items()) + ", CPU allowed")
    p.add_argument("--json", help="write the settings and rows here")
    args = p.parse_args(argv)
    for name in ("pairs", "prompt", "response", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    for name in ("peak_flops", "row_seconds", "budget"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if args.trl_path and args.no_trl:
        p.error("--trl-path and --no-trl contradict each other")
    if args.trl_path and not (Path(args.trl_path) / "trl" / "__init__.py").is_file():
        p.error(f"--trl-path {args.trl_path}: no trl/__init__.py there (unzip a trl wheel into it)")
    if args.dry_run:
        vars(args).update(DRY_RUN)
    return args


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def bench_module(compiled: bool):
    """DPOModule with the benchmark's option (compiled decoder layers), keeping its last loss."""
    from amrlhf.modules import DPOModule

    class BenchDPO(DPOModule):
        last_loss = None
        packed = None

        def load_policy(self):
            model = super().load_policy()
            if compiled:
                compile_layers(model)
            return model

        def training_step(self, batch, batch_idx):
            if self.packed is None:  # whether shared-prefix packing served (it falls back by itself)
                from amrlhf.models.forward import lm_parts, packing_for

                parts = lm_parts(self.policy)
                self.packed = bool(self.share_prefix and parts and packing_for(parts[0], batch) is not None)
            loss = super().training_step(batch, batch_idx)
            self.last_loss = loss.detach()
            return loss

    return BenchDPO


def our_reference(ctx):
    """The frozen bf16 reference (layers compiled with --compile), cached once with --cached-ref."""
    from amrlhf.models import ModelSpec
    from amrlhf.modules import CachedReference, FrozenReference

    class Reference(FrozenReference):
        def setup(self, module) -> None:
            fresh = not self._model
            super().setup(module)
            if fresh and ctx.args.compile:
                compile_layers(self._model[0])

    ref = Reference(ModelSpec(ctx.policy, dtype="bfloat16"))
    return CachedReference(ref, cache=os.path.join(ctx.root, "reflogps")) if ctx.args.cached_ref else ref


def run_ours(variant: str, gc_on: bool, ctx, clock: StepClock):
    import lightning as L

    from amrlhf.models import ModelSpec
    from amrlhf.scorers import CachedScorer, RewardModelScorer
    from amrlhf.segmenters import AdaptivePivotSegmenter, SampleWiseSegmenter

    a = ctx.args
    # "DPO padded": without shared-prefix packing (each pair's prompt run twice, rows padded; a dense 4D mask
    # keeps SDPA off its flash kernel, so packing can lose on a GPU: docs/performance.md)
    in_backward = variant == "DPO in backward"  # no gradient clipping: it needs every gradient before any update
    kw = {"segmenter": SampleWiseSegmenter(), "share_prefix": variant != "DPO padded",
          "optimizer_in_backward": in_backward}
    if variant.startswith("AM-DPO"):
        scorer = RewardModelScorer(ModelSpec(ctx.policy, dtype="bfloat16"))
        if variant == "AM-DPO cached":
            scorer = CachedScorer(scorer, cache=os.path.join(ctx.root, "scores"))
        kw = {"segmenter": AdaptivePivotSegmenter(delta=0.3), "scorer": scorer, "score_calibration_batches": 1}
    module = bench_module(a.compile)(
        ModelSpec(ctx.policy, dtype="float32", gradient_checkpointing=gc_on), reference=our_reference(ctx), lr=LR,
        fused_adamw=a.fused_adamw, **kw)

    class Timer(L.Callback):
        def on_train_start(self, *_):
            clock.begin()

        def on_train_batch_start(self, *_):
            clock.start()

        def on_train_batch_end(self, trainer, *_):
            if clock.stop():
                trainer.should_stop = True

    trainer = L.Trainer(accelerator="cuda" if CUDA else "cpu", devices=1, precision=a.precision,
                        max_steps=a.warmup + a.steps, gradient_clip_val=None if in_backward else 1.0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, use_distributed_sampler=False, callbacks=[Timer()])
    trainer.fit(module, datamodule=bench_data(ctx.examples, ctx.tokenizer, a.pairs))
    ctx.packed = bool(module.packed)
    return module.last_loss


def run_trl(variant: str, gc_on: bool, ctx, clock: StepClock):
    import datasets
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    a = ctx.args

    class PreTokenized(DPOTrainer):
        last_loss = None

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # prompt_ids / chosen_ids / rejected_ids already: the ids our rows train on

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            self.last_loss = loss.detach()
            return loss

    class Timer(TrainerCallback):
        def on_train_begin(self, *_, **__):
            clock.begin()

        def on_step_begin(self, *_, **__):
            clock.start()

        def on_step_end(self, args, state, control, **__):
            if clock.stop():
                control.should_training_stop = True

    policy = AutoModelForCausalLM.from_pretrained(ctx.policy, dtype=torch.float32)
    # --cached-ref: no reference model; TRL precomputes with the (initial) policy under autocast, then keeps none
    ref = None if a.cached_ref else AutoModelForCausalLM.from_pretrained(ctx.policy, dtype=torch.bfloat16).eval()
    for model in (policy, ref):
        if a.compile and model is not None:
            compile_layers(model)
    ds = datasets.Dataset.from_list([{"prompt_ids": e.prompt_ids, "chosen_ids": e.responses[0],
                                      "rejected_ids": e.responses[1]} for e in ctx.examples])
    cfg = DPOConfig(output_dir=os.path.join(ctx.root, "trl"), per_device_train_batch_size=a.pairs, max_length=None,
                    beta=0.1, learning_rate=LR, lr_scheduler_type="constant", max_steps=a.warmup + a.steps,
                    max_grad_norm=1.0, bf16=a.precision == "bf16-mixed", use_cpu=not CUDA,
                    gradient_checkpointing=gc_on, gradient_checkpointing_kwargs={"use_reentrant": False},
                    optim="adamw_torch_fused" if a.fused_adamw else "adamw_torch",
                    precompute_ref_log_probs=a.cached_ref, report_to=[], save_strategy="no", logging_steps=1000,
                    disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = PreTokenized(model=policy, ref_model=ref, args=cfg, train_dataset=ds, processing_class=ctx.tokenizer,
                           callbacks=[Timer()])
    trainer.train()
    return trainer.last_loss


def release(compiled: bool) -> None:
    """Free what a row left (its models, optimizer, compiled graphs) before the next row is built."""
    gc.collect()
    if compiled:
        torch._dynamo.reset()
    if CUDA:
        torch.cuda.empty_cache()


def run_row(variant: str, impl: str, gc_on: bool, ctx) -> dict:
    """One row's measurements, or {"not_run": why} when it failed (out of memory, an API change)."""
    clock = StepClock(ctx.args.warmup, ctx.args.row_seconds)
    ctx.packed = False
    try:
        loss = (run_trl if impl == "TRL" else run_ours)(variant, gc_on, ctx, clock)
        row = clock.result(ctx.tokens, ctx.params, ctx.peak, loss)
        if ctx.packed and "s_per_step" in row:
            # packed pairs run each prompt once: tokens/s counts every token of both rows (the work done for the
            # user, as TRL's row counts it), MFU only the positions computed
            a = ctx.args
            row["computed_tokens_per_step"] = a.pairs * (a.prompt + 2 * a.response)
            row["mfu"] = mfu(ctx.params, row["computed_tokens_per_step"], row["s_per_step"], ctx.peak)
        return row
    except Exception as exc:  # one row's failure must not cost the others
        log.exception("%s / %s failed", variant, impl)
        return {"not_run": f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}
    finally:
        release(ctx.args.compile)


def context(args, root: str, trl: str) -> SimpleNamespace:
    """What every row shares: the model folder, its size, the pairs, the tokenizer, the card's peak FLOP/s."""
    import transformers

    from amrlhf.models import load_tokenizer

    device = torch.cuda.get_device_name() if CUDA else "CPU"
    peak, peak_from = peak_flops(device, args.peak_flops)
    t = time.perf_counter()
    policy, params = build_policy(args.shape, root, "cuda" if CUDA else "cpu")
    log.info("built %s (%.1fM parameters) in %.1f s", args.shape, params / 1e6, time.perf_counter() - t)
    vocab = SHAPES[args.shape][1]["vocab_size"]
    examples = synthetic_pairs(args.pairs * (args.warmup + args.steps), args.prompt, args.response, vocab)
    on = {True: "on", False: "off"}
    settings = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl,
                "shape": args.shape, "params": params, "pairs": args.pairs, "prompt": args.prompt,
                "response": args.response, "tokens_per_step": 2 * args.pairs * (args.prompt + args.response),
                "precision": args.precision, "reference": "frozen, bf16 weights", "steps": args.steps,
                "warmup": args.warmup, "compile": on[args.compile], "fused_adamw": on[args.fused_adamw],
                "cached_ref": on[args.cached_ref], "peak_flops": peak, "peak_flops_from": peak_from}
    return SimpleNamespace(args=args, root=root, policy=policy, params=params, examples=examples, peak=peak,
                           tokenizer=load_tokenizer(policy), tokens=settings["tokens_per_step"], settings=settings)


def header(s: dict) -> str:
    peak = f"{s['peak_flops'] / 1e12:.0f} TFLOP/s, {s['peak_flops_from']}" if s["peak_flops"] else s["peak_flops_from"]
    return (f"{s['device']}, torch {s['torch']}, transformers {s['transformers']}, TRL: {s['trl']}\n"
            f"shape {s['shape']} ({s['params'] / 1e6:.1f}M parameters), {s['pairs']} pairs x ({s['prompt']}+"
            f"{s['response']}) = {s['tokens_per_step']:,} tokens/step, {s['precision']}, reference {s['reference']}, "
            f"{s['steps']} timed steps after {s['warmup']} warm-up\ntorch.compile {s['compile']}, fused AdamW "
            f"{s['fused_adamw']}, cached reference log-probs {s['cached_ref']}; MFU against {peak}")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.monotonic()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("lightning.pytorch").propagate = False  # Lightning prints its own lines
    if not CUDA and not args.dry_run:
        return fail(f"no CUDA device is visible (torch {torch.__version__}): this benchmark times GPU steps; "
                    "--dry-run checks the script on the CPU")
    trl, trl_why = None, "--no-trl"
    if not args.no_trl:
        folder, trl_why = find_trl(args.trl_path, trl_dir)
        if folder is not None:
            try:
                trl = f"{import_trl(folder)} ({trl_why})"
            except ImportError as exc:
                trl_why = str(exc)
        if trl is None and not args.dry_run:
            return fail(f"TRL is not available: {trl_why}. Pass --trl-path DIR (docs/gpu_benchmark.md), or --no-trl")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        ctx = context(args, root, trl or f"not run ({trl_why})")
        for variant, impl, gc_on in ROWS:
            row = {"variant": variant, "impl": impl, "gc": gc_on}
            if impl == "TRL" and trl is None:
                row["not_run"] = trl_why
            elif time.monotonic() - started > args.budget:
                row["not_run"] = f"--budget {args.budget:g} s spent"
            else:
                t = time.monotonic()
                row.update(run_row(variant, impl, gc_on, ctx))
                log.info("%s / %s / checkpointing %s: %.0f s, %s", variant, impl, gc_on, time.monotonic() - t,
                         row.get("not_run") or f"{row['s_per_step']:.4f} s/step")
            rows.append(row)
            if args.json:  # after every row: a run stopped by its timeout still leaves the rows it finished
                Path(args.json).write_text(json.dumps({"settings": ctx.settings, "rows": rows}, indent=2))
    print("\n" + header(ctx.settings) + "\n\n" + table(rows) + "\n\n" + "\n".join(ratios(rows)))
    print(f"\ntotal {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
