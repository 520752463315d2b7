"""Benchmark (not a test): one PPO rollout step of ours (PPOModule) vs TRL's experimental PPOTrainer.

One step = one rollout: generate with the KV cache for a batch of prompts, old log-probs, reference
log-probs, values and reward scores, GAE, then ppo_epochs x mini-batches of optimizer steps. Both
sides get the same model, the same prompts in the same order (PromptDataModule, file order), the
same settings: fp32 on CPU, rollout batch 4 prompts, mini-batch 2 (2 optimizer steps per rollout),
1 PPO epoch, up to 32 new tokens sampled at temperature 1.0 and stopped at EOS, kl 0.05 (k1),
vf_coef 0.1, cliprange 0.2/0.2, gamma 1, lam 0.95, lr 1e-6, AdamW (torch's default kernel on both sides;
`--fused-adamw 1`: the fused one), no gradient clipping, seed 0.
Models: policy (trained), frozen reference, reward model and critic = the same weights with a
fresh scalar head (the critic, initialised like the reward model, is trained).

Each (implementation, model) runs in its own process, so peak RSS is its own; implementations
alternate. Per step (after warm-up): total s/step, tokens/s (prompt + generated tokens of the
rollout / s/step), the generation part alone (generated tokens / s, timed around our
`PPOModule.sample` and TRL's `batch_generation`), tokens generated (up to and including EOS) and
decode steps (longest response), peak RSS and RSS right after imports; ratios ours/TRL. The
machine's 1-min load average at each step end is printed too: on a shared machine, times are only
comparable between runs that saw similar load.

    python benchmarks/bench_ppo.py [--models tiny smollm2] [--steps 3] [--warmup 1] [--optimizer-in-backward 1]
        [--map-large-mb 1]

`--map-large-mb X` (here and in bench_grpo.py, bench_dpo.py) gives our side's trainer
`amrlhf.callbacks.MapLargeAllocations(X)`: large buffers mapped on their own, given back when freed.

`--optimizer-in-backward 1` runs our side with `optimizer_in_backward` (each weight's AdamW update inside the
backward pass: the same weights, no full set of gradients held); TRL's side is unchanged.

TRL >= 1.13 has no PPO trainer: the TRL side runs trl==1.12.0 (the last with trl/experimental/ppo),
fetched once with `pip download --no-deps` and unzipped into $AMRLHF_HOME/cache/bench/trl-1.12.0,
put first on sys.path in the TRL process only (the venv is untouched). Two shims, both in run_trl:
- TRL's per_device_train_batch_size is the rollout batch (4; rollout = per_device x grad. accum.),
  num_mini_batches=2 makes mini-batches of 2, each one optimizer step (gradient_accumulation_steps=1);
- its shuffling dataloader is replaced by one in file order (same prompts per step as ours), and
  when pad == EOS (SmolLM2) TRL's tokenizer pads with another special token absent from the
  prompts: TRL derives attention masks from `ids != pad_id`, which would mask the prompts' own
  <|im_end|> turns.
Work per step differs in one place: TRL takes the old log-probs from the generation logits
(output_scores=True), ours runs one more policy forward over prompt + response for them.
Needs `amrlhf prepare tiny-llama tiny-arith smollm2-135m-instruct halueval_dialogue`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zipfile

MODELS = {  # name: (model, prompts, max prompt tokens)
    "tiny": ("local:tiny-llama", "local:tiny-arith/sft_train", 64),
    "smollm2": ("local:smollm2-135m-instruct", "local:halueval_dialogue/train", 256),
}
TRL_VERSION = "1.12.0"
SEED = 0
LR = 1e-6
KL_COEF = 0.05


def _rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def trl_dir(version: str = TRL_VERSION, marker: str = "trl/experimental/ppo/ppo_trainer.py") -> str:
    """The unzipped trl==`version` wheel (downloaded once, `marker` proves it is there); raises
    RuntimeError saying why not."""
    from amrlhf.paths import cache_dir

    root = cache_dir("bench") / f"trl-{version}"
    if not (root / marker).exists():
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                   f"trl=={version}", "-d", tmp], capture_output=True, text=True)
            wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
            if proc.returncode or not wheels:
                raise RuntimeError(f"pip download trl=={version} failed: {proc.stderr[-500:]}")
            zipfile.ZipFile(os.path.join(tmp, wheels[0])).extractall(root)
    return str(root)


def import_pinned_trl(version: str = TRL_VERSION, marker: str = "trl/experimental/ppo/ppo_trainer.py"):
    """trl==`version` imported from `trl_dir` (first on sys.path, this process only) -> the module; RuntimeError
    when another version was imported."""
    sys.path.insert(0, trl_dir(version, marker))
    import trl

    if trl.__version__ != version:
        raise RuntimeError(f"imported trl {trl.__version__} from {trl.__file__}, wanted {version}")
    return trl


def _prompts(model: str, data: str, max_length: int, batch: int, n: int):
    """A PromptDataModule in file order holding exactly its first n prompts of <= max_length tokens."""
    from amrlhf.data import PromptDataModule

    dm = PromptDataModule(train=data, tokenizer=model, max_length=max_length, batch_size=batch, shuffle=False,
                          limit_train=20 * n, seed=SEED)
    dm.setup()
    if len(dm.train_data) < n:
        raise SystemExit(f"{data}: only {len(dm.train_data)} prompts of <= {max_length} tokens, need {n}")
    dm.train_data = dm.train_data[:n]
    return dm


def _threshold_mb(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 32:
        raise argparse.ArgumentTypeError(f"between 0 (off) and 32 MiB; got {text}")
    return value


def add_map_large_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--map-large-mb", type=_threshold_mb, default=0.0,
                   help="> 0: our side's trainer gets MapLargeAllocations(threshold_mb) (allocations of at least "
                        "this many MiB mapped on their own, given back when freed; glibc); 0: off")


def mapping_callbacks(threshold_mb: float) -> list:
    """[MapLargeAllocations(threshold_mb)] for our side's trainer, or [] when off (0)."""
    from amrlhf.callbacks import MapLargeAllocations

    return [MapLargeAllocations(threshold_mb)] if threshold_mb > 0 else []


def add_adamw_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fused-adamw", type=int, choices=(0, 1), default=0,
                   help="1: AdamW's fused kernel on both sides (ours: fused_adamw; TRL: optim adamw_torch_fused); "
                        "0: torch.optim.AdamW's default kernel on both sides (TRL: optim adamw_torch)")


def trl_optim(args) -> str:
    """TRL's `optim` for the AdamW kernel our side runs (TRL's own default is the fused one)."""
    return "adamw_torch_fused" if args.fused_adamw else "adamw_torch"


def ours_settings(args) -> str:
    """The AdamW kernel both sides run, then what our side runs with beyond the defaults, for a table's heading."""
    named = (["optimizer_in_backward"] if getattr(args, "optimizer_in_backward", 0) else []) + (
        [f"MapLargeAllocations({args.map_large_mb:g} MiB)"] if args.map_large_mb else [])
    kernel = "; fused AdamW on both sides" if args.fused_adamw else ""
    return kernel + (f"; ours with {' and '.join(named)}" if named else "")


def run_ours(model: str, data: str, max_length: int, args) -> dict:
    import lightning as L

    from amrlhf.losses import FixedKL
    from amrlhf.models import ModelSpec
    from amrlhf.modules import FrozenReference, PPOModule, ValueModel
    from amrlhf.sampling import Sampling
    from amrlhf.scorers import RewardModelScorer

    L.seed_everything(SEED, verbose=False)
    dm = _prompts(model, data, max_length, args.batch, args.batch * (args.steps + args.warmup))
    spec = ModelSpec(model, dtype="float32")
    module = PPOModule(spec, reward=RewardModelScorer(spec), critic=ValueModel(spec), reference=FrozenReference(),
                       sampling=Sampling(max_new_tokens=args.new_tokens, temperature=1.0), kl=FixedKL(KL_COEF),
                       kl_estimator="k1", ppo_epochs=1, mini_batch_size=args.mini_batch, max_grad_norm=None,
                       seed=SEED, lr=LR, optimizer_in_backward=bool(args.optimizer_in_backward),
                       fused_adamw=bool(args.fused_adamw))
    gen, times, loads = [], [], []
    sample = module.sample

    def timed_sample(prompt_batch, seed, n=1):
        t = time.perf_counter()
        out = sample(prompt_batch, seed, n)  # (rollout tensors, ended, prompt rows)
        lengths = out[0]["response_mask"].sum(-1)
        gen.append({"s": time.perf_counter() - t, "new": int(lengths.sum()), "width": int(lengths.max()),
                    "prompt": int(prompt_batch["prompt_mask"].sum())})
        return out

    module.sample = timed_sample

    class Timer(L.Callback):  # step = from the previous step's end (or the start of training) to this one's
        def on_train_start(self, *a):
            self.t = time.perf_counter()

        def on_train_batch_end(self, *a):
            now = time.perf_counter()
            times.append(now - self.t)
            loads.append(os.getloadavg()[0])
            self.t = now

    per_rollout = module.steps_per_rollout(args.batch)
    trainer = L.Trainer(accelerator="cpu", max_steps=(args.steps + args.warmup) * per_rollout, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[Timer(), *mapping_callbacks(args.map_large_mb)])
    trainer.fit(module, datamodule=dm)
    return {"times": times, "gen": gen, "loads": loads}


def _trl_pad(tok, prompts) -> None:
    """TRL masks every `pad_id` token of a prompt out of attention: if pad == EOS (and EOS closes each
    chat turn), pad with a special token that no prompt contains (no new embedding row)."""
    if tok.pad_token_id != tok.eos_token_id:
        return
    used = {t for p in prompts for t in p}
    free = [i for i in sorted(tok.all_special_ids) if i not in used and i != tok.eos_token_id]
    if not free:
        raise RuntimeError("pad == EOS and every other special token occurs in the prompts")
    tok.pad_token = tok.convert_ids_to_tokens(free[0])


def run_trl(model: str, data: str, max_length: int, args) -> dict:
    import datasets
    import torch
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    from amrlhf.models import ModelSpec, load_causal_lm, resolve_model

    set_seed(SEED)
    dm = _prompts(model, data, max_length, args.batch, args.batch * (args.steps + args.warmup))
    prompts = [e.prompt_ids for e in dm.train_data]
    tok = dm.tokenizer
    tok.padding_side = "left"
    _trl_pad(tok, prompts)
    ds = datasets.Dataset.from_list([{"input_ids": p} for p in prompts])
    spec = ModelSpec(model, dtype="float32")
    policy = load_causal_lm(spec)
    ref = load_causal_lm(spec).eval()
    path = resolve_model(model)[0]

    def scalar_head():
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)

    reward, value = scalar_head(), scalar_head()
    gen, times, loads = [], [], []
    batch_generation = trl_ppo.batch_generation

    def timed_generation(m, queries, *a, **k):
        t = time.perf_counter()
        out = batch_generation(m, queries, *a, **k)
        resp = out[0][:, queries.shape[1]:]
        is_eos = resp == tok.eos_token_id
        lengths = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, resp.shape[1])
        gen.append({"s": time.perf_counter() - t, "new": int(lengths.sum()), "width": int(resp.shape[1]),
                    "prompt": int((queries != tok.pad_token_id).sum())})
        return out

    trl_ppo.batch_generation = timed_generation  # train() looks it up in the module at each rollout

    class Timer(TrainerCallback):  # TRL's PPO loop calls on_step_end only (no on_step_begin)
        def on_train_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            times.append(now - self.t)
            loads.append(os.getloadavg()[0])
            self.t = now

    with tempfile.TemporaryDirectory() as out:
        cfg = PPOConfig(
            output_dir=out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
            num_mini_batches=args.batch // args.mini_batch, num_ppo_epochs=1,
            total_episodes=args.batch * (args.steps + args.warmup), response_length=args.new_tokens,
            stop_token="eos", temperature=1.0, learning_rate=LR, kl_coef=KL_COEF, kl_estimator="k1", vf_coef=0.1,
            cliprange=0.2, cliprange_value=0.2, gamma=1.0, lam=0.95, missing_eos_penalty=None,
            num_sample_generations=0, optim=trl_optim(args), lr_scheduler_type="constant", use_cpu=True, bf16=False,
            fp16=False, report_to=[], save_strategy="no", logging_steps=1000, disable_tqdm=True,
            dataloader_num_workers=0, seed=SEED)
        trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                             value_model=value, train_dataset=ds, callbacks=[Timer()])
        # same prompts per step as ours: file order instead of TRL's shuffled loader
        trainer.dataloader = trainer.accelerator.prepare(DataLoader(
            ds, batch_size=args.batch, shuffle=False, collate_fn=trainer.data_collator, drop_last=True))
        trainer.train()
    return {"times": times, "gen": gen, "loads": loads}


def child(impl: str, name: str, args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    model, data, max_length = MODELS[name]
    if impl == "ours":
        import lightning  # noqa: F401

        import amrlhf.modules  # noqa: F401
    else:
        import_pinned_trl()
        from trl.experimental.ppo import PPOTrainer  # noqa: F401
    import_rss = _rss()
    report((run_ours if impl == "ours" else run_trl)(model, data, max_length, args), import_rss, args)


def report(out: dict, import_rss: float, args) -> None:
    """A child's measurements, warm-up steps dropped, with its peak RSS, as the RESULT line."""
    n = args.steps + args.warmup
    if len(out["times"]) != n or len(out["gen"]) != n:
        raise RuntimeError(f"expected {n} steps, timed {len(out['times'])} steps and {len(out['gen'])} generations")
    for key in ("times", "gen", "loads"):
        out[key] = out[key][args.warmup:]
    out["peak_rss_mb"], out["import_rss_mb"] = _rss(), import_rss
    print("RESULT " + json.dumps(out))


def _summary(r: dict) -> dict:
    """Per-step means; `decode steps` only when the generations recorded their width."""
    steps = len(r["times"])
    sps = sum(r["times"]) / steps
    new = sum(g["new"] for g in r["gen"]) / steps
    prompt = sum(g["prompt"] for g in r["gen"]) / steps
    gen_s = sum(g["s"] for g in r["gen"]) / steps
    out = {"s/step": sps, "tokens/s": (prompt + new) / sps, "gen s/step": gen_s, "gen tokens/s": new / gen_s,
           "tokens generated": new, "peak RSS MB": r["peak_rss_mb"], "RSS after imports MB": r["import_rss_mb"],
           "peak RSS above imports MB": r["peak_rss_mb"] - r["import_rss_mb"],
           "machine load (1-min avg)": sum(r["loads"]) / steps}
    if all("width" in g for g in r["gen"]):
        out["decode steps"] = sum(g["width"] for g in r["gen"]) / steps
    return out


def run_child(script: str, impl: str, name: str, args, exclude: tuple[str, ...] = ("models", "child")
              ) -> tuple[dict | None, str]:
    """One (implementation, model) of `script` in its own process: `--child IMPL MODEL` plus every argument of
    `args` but `exclude` -> (the child's RESULT dict, "") or (None, why it did not run; its stderr's tail printed)."""
    forwarded = {k: v for k, v in vars(args).items() if k not in exclude}
    for k, v in forwarded.items():
        if not isinstance(v, (int, float, str)) or isinstance(v, bool):
            raise TypeError(f"--{k.replace('_', '-')}: run_child forwards numbers and strings only, got {v!r}")
    cmd = [sys.executable, os.path.abspath(script), "--child", impl, name] + [
        f"--{k.replace('_', '-')}={v}" for k, v in forwarded.items()]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        err = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        why = err[-1] if err else f"exit code {proc.returncode}"
        print(f"{impl}/{name} did not run: {why}\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None, why
    return json.loads(line[7:]), ""


def run_children(script: str, args) -> list[tuple[str, dict]]:
    """Each (model, implementation) of `script` in its own process (`run_child`) -> [(model, {impl: summary, or
    why it did not run})], printing each side's step times."""
    results = []
    for name in args.models:
        res = {}
        for impl in ("ours", "trl"):
            raw, why = run_child(script, impl, name, args)
            if raw is None:
                res[impl] = why
                continue
            res[impl] = _summary(raw)
            print(f"{impl}/{name}: step times {[round(t, 2) for t in raw['times']]} s, 1-min load "
                  f"{[round(x, 1) for x in raw['loads']]}", flush=True)
        results.append((name, res))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=list(MODELS))
    p.add_argument("--steps", type=int, default=3, help="timed rollout steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed rollout steps first")
    p.add_argument("--batch", type=int, default=4, help="prompts per rollout")
    p.add_argument("--mini-batch", type=int, default=2, help="rows per optimizer step")
    p.add_argument("--new-tokens", type=int, default=32, help="max new tokens per response")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--optimizer-in-backward", type=int, choices=(0, 1), default=0,
                   help="1: our side updates each weight inside the backward pass")
    add_adamw_argument(p)
    add_map_large_argument(p)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.batch % args.mini_batch:
        p.error("--mini-batch must divide --batch")
    if args.child:
        child(*args.child, args)
        return
    rows = run_children(__file__, args)
    print(f"\nPPO rollout step, CPU fp32, {args.batch} prompts/rollout, mini-batch {args.mini_batch}, 1 PPO epoch, "
          f"<= {args.new_tokens} new tokens (T=1.0, stop at EOS), policy + frozen ref + reward model + critic; "
          f"{args.steps} timed steps after {args.warmup} warm-up, {args.threads} threads; TRL {TRL_VERSION} "
          f"experimental PPOTrainer{ours_settings(args)}\n")
    for name, res in rows:
        print(f"model {name} ({MODELS[name][0]}, prompts {MODELS[name][1]})\n")
        print("| metric (per rollout step) | ours | TRL | ours/TRL |\n|---|---:|---:|---:|")
        ours, trl = res["ours"], res["trl"]
        for key in ("s/step", "tokens/s", "gen s/step", "gen tokens/s", "tokens generated", "decode steps",
                    "peak RSS MB", "RSS after imports MB", "peak RSS above imports MB", "machine load (1-min avg)"):
            cells = ["n/a" if not isinstance(r, dict) else f"{r[key]:.3f}" if key.endswith("s/step")
                     else f"{r[key]:.1f}" for r in (ours, trl)]
            ratio = f"{ours[key] / trl[key]:.2f}" if isinstance(ours, dict) and isinstance(trl, dict) else "n/a"
            print(f"| {key} | {cells[0]} | {cells[1]} | {ratio} |")
        for impl, r in res.items():
            if not isinstance(r, dict):
                print(f"\n{impl} did not run: {r}")
        print()


if __name__ == "__main__":
    main()
