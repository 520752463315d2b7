"""Benchmark (not a test): one GRPO rollout step of ours (GRPOModule) vs TRL's GRPOTrainer, side by side.

One step = one rollout: `--prompts` prompts x `--generations` samples each (KV cache, stop at EOS), the
reward of every completion, group-relative advantages (std-scaled), then 2 optimizer steps on mini-batches
of half the completions (so both sides compute the old log-probs in a pass of their own), DAPO's token-mean
loss, clip 0.2, beta `--beta` (0: no reference model, TRL's default; > 0: a frozen reference, k3 in the
loss), AdamW lr 1e-6 (torch's default kernel on both sides; `--fused-adamw 1`: the fused one), gradient clipping `--max-grad-norm` (1.0; 0: off on both sides), seed 0. Both sides get
the same model (fp32 on CPU), the same prompts in the same order (file order) and the same reward function
(`digit_share`: the share of digit characters in the completion).

Each (implementation, model) runs in its own process, so peak RSS is its own. Per rollout (after warm-up):
s/step, tokens/s ((prompt + generated tokens) / s), the generation part alone (timed around our
`GRPOModule.sample` and TRL's `_generate_single_turn`), tokens generated (up to and including EOS), peak RSS
and RSS after imports, and the ratios ours/TRL; the machine's 1-min load average too (times are only
comparable between runs that saw similar load).

    python benchmarks/bench_grpo.py [--models tiny smollm2] [--steps 3] [--warmup 1]
        [--max-grad-norm 0 --optimizer-in-backward 1] [--map-large-mb 0.25]

`--optimizer-in-backward 1` runs our side with `optimizer_in_backward` (each weight's AdamW update inside the
backward pass: the same weights, no full set of gradients held), which needs `--max-grad-norm 0`.

The TRL side runs trl==1.16.0, fetched once with `pip download --no-deps` and unzipped into
$AMRLHF_HOME/cache/bench/trl-1.16.0, first on sys.path in the TRL process only (the venv is untouched).
TRL's shapes: per_device_train_batch_size = half the rollout's completions, steps_per_generation = 2,
num_iterations = 1, gradient_accumulation_steps = 1, shuffle_dataset = False; its prompts are our prompts'
chat-templated text (the same tokens). One difference in the loss, none in the work: TRL's `dapo` divides
each step's token sum by the generation batch's token count, our TokenMean by the mini-batch's. Needs `amrlhf prepare tiny-llama tiny-arith smollm2-135m-instruct
arith_steps`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ppo import (  # noqa: E402
    _prompts,
    _rss,
    _summary,
    _trl_pad,
    add_adamw_argument,
    add_map_large_argument,
    import_pinned_trl,
    mapping_callbacks,
    ours_settings,
    report,
    run_children,
    trl_optim,
)

MODELS = {  # name: (model, prompts, max prompt tokens)
    "tiny": ("local:tiny-llama", "local:tiny-arith/sft_train", 64),
    "smollm2": ("local:smollm2-135m-instruct", "local:arith_steps/train", 128),
}
TRL_VERSION = "1.16.0"
SEED = 0
LR = 1e-6


def digit_share(prompt, response: str) -> float:
    """The reward both sides use: the share of digit characters in the completion."""
    return sum(c.isdigit() for c in response) / max(len(response), 1)


class Clock:
    """Step times (from the previous step's end) and the 1-min load average at each step end."""

    def __init__(self):
        self.times, self.loads, self.t = [], [], None

    def start(self):
        self.t = time.perf_counter()

    def tick(self):
        now = time.perf_counter()
        self.times.append(now - self.t)
        self.loads.append(os.getloadavg()[0])
        self.t = now


def run_ours(model: str, data: str, max_length: int, args) -> dict:
    import lightning as L

    from amrlhf.losses import FixedKL, GroupRelative, TokenMean
    from amrlhf.models import ModelSpec
    from amrlhf.modules import GRPOModule
    from amrlhf.rewards import FunctionReward, VerifiableReward
    from amrlhf.sampling import Sampling

    L.seed_everything(SEED, verbose=False)
    dm = _prompts(model, data, max_length, args.prompts, args.prompts * (args.steps + args.warmup))
    rows = args.prompts * args.generations
    module = GRPOModule(ModelSpec(model, dtype="float32"), reward=VerifiableReward([FunctionReward(digit_share)]),
                        num_generations=args.generations, advantage=GroupRelative(), aggregation=TokenMean(),
                        kl=FixedKL(args.beta), kl_estimator="k3", clip_low=0.2,
                        sampling=Sampling(max_new_tokens=args.new_tokens, temperature=1.0), epochs=1,
                        mini_batch_size=rows // 2, max_grad_norm=args.max_grad_norm or None, seed=SEED, lr=LR,
                        optimizer_in_backward=bool(args.optimizer_in_backward), fused_adamw=bool(args.fused_adamw))
    gen, clock = [], Clock()
    sample = module.sample

    def timed_sample(prompt_batch, seed, n=1, per_prompt=False):
        t = time.perf_counter()
        out = sample(prompt_batch, seed, n, per_prompt)
        lengths = out[0]["response_mask"].sum(-1)
        gen.append({"s": time.perf_counter() - t, "new": int(lengths.sum()),
                    "prompt": int(prompt_batch["prompt_mask"].sum()) * n})
        return out

    module.sample = timed_sample

    class Timer(L.Callback):
        def on_train_start(self, *a):
            clock.start()

        def on_train_batch_end(self, *a):
            clock.tick()

    trainer = L.Trainer(accelerator="cpu", max_steps=(args.steps + args.warmup) * module.steps_per_rollout(rows),
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[Timer(), *mapping_callbacks(args.map_large_mb)])
    trainer.fit(module, datamodule=dm)
    return {"times": clock.times, "gen": gen, "loads": clock.loads}


def run_trl(model: str, data: str, max_length: int, args) -> dict:
    import tempfile

    import datasets
    from accelerate.utils import set_seed
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from amrlhf.models import ModelSpec, load_causal_lm

    set_seed(SEED)
    dm = _prompts(model, data, max_length, args.prompts, args.prompts * (args.steps + args.warmup))
    tok = dm.tokenizer
    prompts = [e.prompt_ids for e in dm.train_data]
    _trl_pad(tok, prompts)
    texts = [tok.decode(p, skip_special_tokens=False) for p in prompts]
    if [tok(t, add_special_tokens=False)["input_ids"] for t in texts] != prompts:
        raise RuntimeError("the prompts' text does not re-tokenize to the same tokens")
    ds = datasets.Dataset.from_list([{"prompt": t} for t in texts])
    policy = load_causal_lm(ModelSpec(model, dtype="float32"))
    rows = args.prompts * args.generations
    gen, clock, optimizer_steps = [], Clock(), []

    def reward(prompts, completions, **kw):
        return [digit_share(p, c) for p, c in zip(prompts, completions, strict=True)]

    class Timer(TrainerCallback):  # two optimizer steps per generation: a rollout ends every second step
        def on_train_begin(self, *a, **k):
            clock.start()

        def on_step_end(self, *a, **k):
            optimizer_steps.append(1)
            if len(optimizer_steps) % 2 == 0:
                clock.tick()

    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(
            output_dir=out, per_device_train_batch_size=rows // 2, gradient_accumulation_steps=1,
            steps_per_generation=2, num_generations=args.generations, num_iterations=1,
            max_completion_length=args.new_tokens, temperature=1.0, top_p=1.0, learning_rate=LR,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=args.max_grad_norm,
            beta=args.beta,
            epsilon=0.2, loss_type="dapo", scale_rewards="group", mask_truncated_completions=False,
            shuffle_dataset=False, max_steps=2 * (args.steps + args.warmup), optim=trl_optim(args), use_cpu=True,
            bf16=False, fp16=False, report_to=[], save_strategy="no", logging_steps=1000, disable_tqdm=True,
            dataloader_num_workers=0, seed=SEED, log_completions=False)
        trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=cfg, train_dataset=ds,
                              processing_class=tok, callbacks=[Timer()])
        generate = trainer._generate_single_turn

        def timed_generate(prompt_ids, *a, **k):
            t = time.perf_counter()
            completion_ids, logprobs = generate(prompt_ids, *a, **k)
            gen.append({"s": time.perf_counter() - t, "new": sum(len(c) for c in completion_ids),
                        "prompt": sum(len(p) for p in prompt_ids)})  # one row per completion already
            return completion_ids, logprobs

        trainer._generate_single_turn = timed_generate
        trainer.train()
    return {"times": clock.times, "gen": gen, "loads": clock.loads}


def child(impl: str, name: str, args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    model, data, max_length = MODELS[name]
    if impl == "ours":
        import lightning  # noqa: F401

        import amrlhf.modules  # noqa: F401
    else:
        import_pinned_trl(TRL_VERSION, "trl/trainer/grpo_trainer.py")
        from trl import GRPOTrainer  # noqa: F401
    import_rss = _rss()
    report((run_ours if impl == "ours" else run_trl)(model, data, max_length, args), import_rss, args)


summary = _summary  # per-rollout means (bench_ppo's)


KEYS = ("s/step", "tokens/s", "gen s/step", "gen tokens/s", "tokens generated", "peak RSS MB",
        "RSS after imports MB", "peak RSS above imports MB", "machine load (1-min avg)")


def table(res: dict) -> str:
    lines = ["| metric (per rollout step) | ours | TRL | ours/TRL |", "|---|---:|---:|---:|"]
    ours, trl = res.get("ours"), res.get("trl")
    for key in KEYS:
        cells = ["n/a" if not isinstance(r, dict) else f"{r[key]:.3f}" if key.endswith("s/step") else f"{r[key]:.1f}"
                 for r in (ours, trl)]
        ratio = f"{ours[key] / trl[key]:.2f}" if isinstance(ours, dict) and isinstance(trl, dict) and trl[key] \
            else "n/a"
        lines.append(f"| {key} | {cells[0]} | {cells[1]} | {ratio} |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=list(MODELS))
    p.add_argument("--steps", type=int, default=3, help="timed rollouts")
    p.add_argument("--warmup", type=int, default=1, help="untimed rollouts first")
    p.add_argument("--prompts", type=int, default=2, help="prompts per rollout")
    p.add_argument("--generations", type=int, default=4, help="samples per prompt (G)")
    p.add_argument("--new-tokens", type=int, default=32, help="max new tokens per completion")
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (0: no reference model)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping on both sides (0: off)")
    p.add_argument("--optimizer-in-backward", type=int, choices=(0, 1), default=0,
                   help="1: our side updates each weight inside the backward pass (needs --max-grad-norm 0)")
    p.add_argument("--threads", type=int, default=2)
    add_adamw_argument(p)
    add_map_large_argument(p)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("steps", "prompts", "new_tokens", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.beta < 0 or args.max_grad_norm < 0:
        p.error("--warmup, --beta and --max-grad-norm must be >= 0")
    if args.optimizer_in_backward and args.max_grad_norm:
        p.error("--optimizer-in-backward 1 needs --max-grad-norm 0: the global norm needs every gradient first")
    if args.generations < 2:
        p.error("--generations must be >= 2 (group-relative advantages compare the samples of a prompt)")
    if (args.prompts * args.generations) % 2:
        p.error("--prompts x --generations must be even (two mini-batches per rollout)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.child:
        child(*args.child, args)
        return
    results = run_children(__file__, args)
    print(f"\nGRPO rollout step, CPU fp32, {args.prompts} prompts x {args.generations} samples, <= {args.new_tokens} "
          f"new tokens (T=1.0, stop at EOS), 2 optimizer steps per rollout, DAPO loss, beta {args.beta}, gradient "
          f"clipping {args.max_grad_norm or 'off'}; {args.steps} timed rollouts after {args.warmup} warm-up, "
          f"{args.threads} threads; TRL {TRL_VERSION} GRPOTrainer"
          f"{ours_settings(args)}\n")
    for name, res in results:
        print(f"model {name} ({MODELS[name][0]}, prompts {MODELS[name][1]})\n\n{table(res)}")
        for impl, r in res.items():
            if not isinstance(r, dict):
                print(f"\n{impl} did not run: {r}")
        print()


if __name__ == "__main__":
    main()
