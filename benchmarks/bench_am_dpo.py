"""Benchmark (not a test): AM-DPO vs DPO step time, and each segmenter's own cost per batch.

Step time: the same DPOModule, data, batch and frozen reference, with (a) the sample-wise segmenter
(plain DPO), (b) the adaptive segmenter on reward-model scores cached once per example
(CachedScorer), (c) the same scores computed online every step. Target: (b) within 5% of (a).
Segmenter cost: `segment()` alone on a [2B, T-1] batch of scores, median of many repeats.

    python benchmarks/bench_am_dpo.py [--models tiny smollm2] [--steps 4] [--warmup 2] [--rm PATH]
--rm: a reward-model folder for the scores (default: the policy itself with a fresh head; the
cost does not depend on the weights).
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch

from amrlhf.data import PreferenceDataModule
from amrlhf.models import ModelSpec
from amrlhf.modules import DPOModule, FrozenReference
from amrlhf.scorers import CachedScorer, RewardModelScorer
from amrlhf.segmenters import (
    AdaptivePivotSegmenter,
    EntropySegmenter,
    SampleWiseSegmenter,
    SegmentInputs,
    StepWiseSegmenter,
    TokenWiseSegmenter,
)

MODELS = {
    "tiny": ("local:tiny-llama", "local:tiny-arith/prefs_train", 64),
    "smollm2": ("local:smollm2-135m-instruct", "local:halueval_dialogue/train", 256),
}


class Timer(L.Callback):
    def __init__(self):
        self.times = []

    def on_train_batch_start(self, *a):
        self.t = time.perf_counter()

    def on_train_batch_end(self, *a):
        self.times.append(time.perf_counter() - self.t)


def step_time(model: str, data: str, max_length: int, variant: str, rm: str, batch: int, steps: int,
              warmup: int) -> float:
    torch.manual_seed(0)
    dm = PreferenceDataModule(data, tokenizer=model, max_length=max_length, batch_size=batch,
                              limit_train=batch * (steps + warmup), shuffle=False)
    kw = {"segmenter": SampleWiseSegmenter()}
    if variant != "DPO":
        scorer = RewardModelScorer(ModelSpec(rm))
        kw = {"segmenter": AdaptivePivotSegmenter(delta=0.3),
              "scorer": CachedScorer(scorer, cache="bench_out/scores") if variant.endswith("cached") else scorer,
              "score_calibration_batches": 2}
    module = DPOModule(ModelSpec(model), reference=FrozenReference(), lr=1e-6, **kw)
    timer = Timer()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps + warmup, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                        use_distributed_sampler=False, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    return statistics.mean(timer.times[warmup:])


def segmenter_costs(tokenizer_model: str, B: int = 8, T: int = 256, repeats: int = 200) -> dict[str, float]:
    from amrlhf.models import load_tokenizer

    g = torch.Generator().manual_seed(0)
    resp = torch.zeros(2 * B, T - 1)
    resp[:, T // 2:] = 1
    kwargs = dict(response_mask=resp, labels=torch.tensor([1] * B + [-1] * B),
                  input_ids=torch.randint(0, 300, (2 * B, T), generator=g), scores=torch.randn(2 * B, T - 1, generator=g),
                  prompt_scores=torch.randn(2 * B, generator=g), ref_entropy=torch.rand(2 * B, T - 1, generator=g) * 4)
    step = StepWiseSegmenter()
    step.setup(load_tokenizer(tokenizer_model))
    segs = {"sample-wise": SampleWiseSegmenter(), "token-wise": TokenWiseSegmenter(), "step-wise": step,
            "entropy": EntropySegmenter(), "adaptive level": AdaptivePivotSegmenter(),
            "adaptive increment": AdaptivePivotSegmenter(signal="increment")}
    out = {}
    for name, s in segs.items():
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            s.segment(SegmentInputs(**kwargs))
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=list(MODELS))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rm", help="reward-model folder (default: the policy with a fresh head)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        model, data, max_length = MODELS[name]
        steps = args.steps * (5 if name == "tiny" else 1)
        res = {v: step_time(model, data, max_length, v, args.rm or model, args.batch, steps, args.warmup)
               for v in ("DPO", "AM-DPO cached", "AM-DPO online")}
        rows.append((name, res))
    print(f"\nstep time, CPU fp32, batch {args.batch} pairs, frozen reference, {args.threads} threads")
    print(f"{'model':10s}{'variant':16s}{'s/step':>10s}{'vs DPO':>9s}")
    for name, res in rows:
        for v, t in res.items():
            print(f"{name:10s}{v:16s}{t:10.4f}{t / res['DPO']:9.2f}")
    costs = segmenter_costs(MODELS[args.models[0]][0])
    print("\nsegmenter cost per batch (16 rows x 255 tokens, half response), median of 200")
    for name, t in costs.items():
        print(f"{name:20s}{t * 1e3:8.3f} ms")


if __name__ == "__main__":
    main()
