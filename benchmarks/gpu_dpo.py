"""GPU check (not a test): DPO and AM-DPO steps on CUDA with bf16 autocast, through Lightning.

A random-init model of SmolLM2-135M's shape (or Qwen2.5-0.5B's, --shape qwen05b) is built from its
config (no hub, no weights carried), batches are synthetic token ids of a fixed prompt/response
layout, and the step runs through the same DPOModule as every recipe with
`precision="bf16-mixed"`. Variants: plain DPO (sample-wise), AM-DPO with precomputed scores (a
lookup, like CachedScorer), AM-DPO with a reward-model forward every step. Prints s/step,
tokens/s and peak CUDA memory. Imports nothing that the GPU machine lacks (no mlflow, lm-eval,
jsonargparse, datasets).

    PYTHONPATH=. python benchmarks/gpu_dpo.py [--shape smollm2|qwen05b] [--pairs 8] [--prompt 256] [--response 256]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import lightning as L
import torch

SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "qwen05b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}


CUDA = torch.cuda.is_available()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


class BatchScores:
    """Scores carried by the batch: the cost of a cached scorer (a lookup), nothing more."""

    def setup(self, module) -> None:
        return None

    def score(self, module, batch, split):
        from amrlhf.scorers import TokenScores

        return TokenScores(batch["token_scores"], batch["prompt_scores"])


def build_models(shape: str, root: str) -> tuple[str, str]:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForTokenClassification

    cfg = LlamaConfig(max_position_embeddings=4096, **SHAPES[shape])
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(os.path.join(root, "policy"))
    rm_cfg = LlamaConfig(max_position_embeddings=4096, num_labels=1, **SHAPES[shape])
    LlamaForTokenClassification(rm_cfg).save_pretrained(os.path.join(root, "rm"))
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(SHAPES[shape]["vocab_size"])}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                  pad_token="t0", eos_token="t1")
    for name in ("policy", "rm"):  # the scorer's tokenizer is checked against the policy's
        tok.save_pretrained(os.path.join(root, name))
    return os.path.join(root, "policy"), os.path.join(root, "rm")


def batches(n: int, pairs: int, prompt: int, response: int, vocab: int):
    from amrlhf.data.collate import pad_rows

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        p = [torch.randint(3, vocab, (prompt,), generator=g).tolist() for _ in range(pairs)]
        rows = [(p[j], torch.randint(3, vocab, (response - (j % 4) * 8,), generator=g).tolist())
                for k in range(2) for j in range(pairs)]
        b = pad_rows(rows, 0)
        b["labels"] = torch.tensor([1] * pairs + [-1] * pairs)
        b["index"] = torch.arange(pairs) + i * pairs
        b["response_lengths"] = b["response_mask"].sum(-1).long()
        b["token_scores"] = torch.randn(b["response_mask"].shape, generator=g).cumsum(-1) * 0.1
        b["prompt_scores"] = torch.zeros(2 * pairs)
        out.append(b)
    return out


def run(variant: str, policy: str, rm: str, data, steps: int, warmup: int, precision: str,
        checkpointing: bool = False) -> dict:
    from amrlhf.models import ModelSpec
    from amrlhf.modules import DPOModule, FrozenReference
    from amrlhf.scorers import RewardModelScorer
    from amrlhf.segmenters import AdaptivePivotSegmenter, SampleWiseSegmenter

    kw = {"segmenter": SampleWiseSegmenter()}
    if variant == "AM-DPO precomputed":
        kw = {"segmenter": AdaptivePivotSegmenter(delta=0.3), "scorer": BatchScores(), "score_calibration_batches": 0}
    elif variant == "AM-DPO online RM":
        kw = {"segmenter": AdaptivePivotSegmenter(delta=0.3),
              "scorer": RewardModelScorer(ModelSpec(rm, dtype="bfloat16")), "score_calibration_batches": 0}
    module = DPOModule(ModelSpec(policy, dtype="float32", gradient_checkpointing=checkpointing),
                       reference=FrozenReference(ModelSpec(policy, dtype="bfloat16")), lr=1e-6, **kw)
    times: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, *a):
            sync()
            self.t = time.perf_counter()

        def on_train_batch_end(self, *a):
            sync()
            times.append(time.perf_counter() - self.t)

        def on_train_start(self, *a):
            if CUDA:
                torch.cuda.reset_peak_memory_stats()

    trainer = L.Trainer(accelerator="cuda" if CUDA else "cpu", devices=1, precision=precision, max_steps=steps + warmup, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Timer()], use_distributed_sampler=False)
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    tokens = statistics.mean(int(b["attention_mask"].sum()) for b in data)
    sps = statistics.mean(times[warmup:])
    result = {"variant": variant, "s_per_step": sps, "tokens_per_s": tokens / sps,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if CUDA else float("nan"),
              "loss_finite": bool(torch.isfinite(trainer.callback_metrics.get("loss", torch.tensor(0.0))))}
    del module, trainer
    if CUDA:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="smollm2", choices=list(SHAPES))
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--response", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on the policy")
    p.add_argument("--json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as root:
        policy, rm = build_models(args.shape, root)
        data = batches(args.steps + args.warmup, args.pairs, args.prompt, args.response, SHAPES[args.shape]["vocab_size"])
        rows = [run(v, policy, rm, data, args.steps, args.warmup, args.precision, args.checkpointing)
                for v in ("DPO", "AM-DPO precomputed", "AM-DPO online RM")]
    print(f"\n{torch.cuda.get_device_name() if CUDA else 'CPU'}, torch {torch.__version__}, shape {args.shape}, {args.pairs} pairs x "
          f"({args.prompt}+{args.response}) tokens, precision {args.precision}, gradient checkpointing "
          f"{args.checkpointing}, {args.steps} steps after {args.warmup}")
    print(f"{'variant':22s}{'s/step':>9s}{'tokens/s':>11s}{'peak GiB':>10s}{'vs DPO':>8s}  finite loss")
    for r in rows:
        print(f"{r['variant']:22s}{r['s_per_step']:9.4f}{r['tokens_per_s']:11.0f}{r['peak_gib']:10.2f}"
              f"{r['s_per_step'] / rows[0]['s_per_step']:8.2f}  {r['loss_finite']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
