"""Benchmark (not a test): a GRPO rollout's generation alone, ours against transformers' `generate`, in ONE process,
alternating round by round, so both sides see the same machine (a paired comparison; the full side-by-side run
with TRL is bench_grpo.py, whose two processes run minutes apart).

Each round draws `--prompts` prompts x `--generations` samples of <= `--new-tokens` tokens at temperature 1:
- ours: `amrlhf.sampling.generate` with one seed per prompt, GRPO's default path (`group_seeds: true`): our
  decode loop, each prompt prefilled once, each group from its own generator;
- transformers: `model.generate(do_sample=True)` on the prompts repeated `--generations` times, as TRL's
  GRPOTrainer calls it (every row prefilled).
Both stop when every row has ended (EOS) or at the token limit, fp32, the same prompts (`arith_steps`, file order)
and model. The sides alternate (which goes first flips each round); the first round of each is a warm-up and
not counted. Printed: seconds per round of each side, mean, the paired ratio ours/transformers per round (mean,
min, max), tokens generated and the 1-minute load average.

    python benchmarks/bench_generate.py [--model local:smollm2-135m-instruct] [--rounds 6]

Needs `amrlhf prepare smollm2-135m-instruct arith_steps` (or a hub model name and prompt file).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ppo import _prompts  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="local:smollm2-135m-instruct")
    p.add_argument("--data", default="local:arith_steps/train")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=6, help="timed rounds per side, after one warm-up round each")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    for name in ("prompts", "generations", "new_tokens", "rounds", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")

    import torch
    from transformers import GenerationConfig

    from amrlhf.models import ModelSpec, load_causal_lm
    from amrlhf.sampling import Sampling, generate, left_pad, own_generation_config, seeded

    torch.set_num_threads(args.threads)
    dm = _prompts(args.model, args.data, 128, args.prompts, args.prompts * (args.rounds + 1))
    tok = dm.tokenizer
    model = load_causal_lm(ModelSpec(args.model, dtype="float32")).eval()
    sampling = Sampling(max_new_tokens=args.new_tokens)
    config = GenerationConfig(do_sample=True, num_return_sequences=args.generations,
                              max_new_tokens=args.new_tokens, min_new_tokens=0, temperature=1.0, top_p=1.0, top_k=0,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    eos = tok.eos_token_id

    def ours(prompts, r):
        groups = generate(model, prompts, args.generations, sampling, eos_id=eos, pad_id=tok.pad_token_id,
                          seeds=[1000 * r + i for i in range(len(prompts))])
        return sum(len(s) for g in groups for s in g)

    def theirs(prompts, r):
        ids, attn = left_pad(prompts, tok.pad_token_id)
        with seeded(r), own_generation_config(model), torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=attn, generation_config=config)[:, ids.shape[1]:]
        rows = out.tolist()
        return sum(row.index(eos) + 1 if eos in row else len(row) for row in rows)

    sides = {"ours": ours, "transformers": theirs}
    times = {k: [] for k in sides}
    tokens = {k: [] for k in sides}
    loads = []
    for r in range(args.rounds + 1):
        prompts = [e.prompt_ids for e in dm.train_data[r * args.prompts:(r + 1) * args.prompts]]
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for name in order:
            t = time.perf_counter()
            made = sides[name](prompts, r)
            if r:  # round 0 warms both sides up
                times[name].append(time.perf_counter() - t)
                tokens[name].append(made)
        if r:
            loads.append(os.getloadavg()[0])
        print(f"round {r}{' (warm-up)' if not r else ''}: "
              + ", ".join(f"{k} {times[k][-1]:.2f} s" for k in sides if r), flush=True)

    ratios = [a / b for a, b in zip(times["ours"], times["transformers"], strict=True)]
    print(f"\nGeneration alone, {args.model}, CPU fp32, {args.threads} threads, {args.prompts} prompts x "
          f"{args.generations} samples, <= {args.new_tokens} new tokens (T=1, stop at EOS); {args.rounds} rounds "
          f"after 1 warm-up, the sides alternating; 1-min load {min(loads):.1f}-{max(loads):.1f}\n")
    print("| per round | ours | transformers `generate` | ours/transformers |")
    print("|---|---:|---:|---:|")
    mo, mt = statistics.mean(times["ours"]), statistics.mean(times["transformers"])
    print(f"| seconds, mean | {mo:.3f} | {mt:.3f} | {mo / mt:.2f} |")
    print(f"| seconds, min-max | {min(times['ours']):.2f}-{max(times['ours']):.2f} | "
          f"{min(times['transformers']):.2f}-{max(times['transformers']):.2f} | |")
    print(f"| paired ratio per round: mean (min-max) | | | {statistics.mean(ratios):.2f} "
          f"({min(ratios):.2f}-{max(ratios):.2f}) |")
    to, tt = statistics.mean(tokens["ours"]), statistics.mean(tokens["transformers"])
    print(f"| tokens generated | {to:.1f} | {tt:.1f} | {to / tt:.2f} |")
    print(f"| tokens/s | {to / mo:.1f} | {tt / mt:.1f} | {(to / mo) / (tt / mt):.2f} |")


if __name__ == "__main__":
    main()
