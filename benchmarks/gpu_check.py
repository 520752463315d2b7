"""The GPU check (not a test): what a lent GPU should run, in one command, in under 8 minutes.

Three stages, each in a process of its own with a time limit of its own; each writes its result under --out as
soon as it ends, so a run stopped from outside still leaves the stages it finished:
  1. dpo: benchmarks/gpu_dpo.py: our DPO step against TRL's DPOTrainer on the same card (tokens/s, MFU, peak memory;
     packed and padded; gradient checkpointing off and on), AM-DPO cached and online (gpu_dpo.json, gpu_dpo.txt).
  2. reference: does a cached reference agree with the live one under bf16-mixed? A short DPO fit whose reference
     is the live bf16 model, with the cached log-probs of the same model (CachedReference: computed once before
     training, in batches of its own) read beside it at every step: per response token and per sequence, the
     largest |cached - live|, and beta x |d(chosen) - d(rejected)|, which bounds how far the cached reference moves
     a pair's sigmoid DPO loss (reference.json).
  3. fsdp: a 1-GPU FSDP smoke on recipes/smoke/dpo.yaml (amrlhf.strategies.FSDP, bf16-mixed): one run
     uninterrupted, one killed after step 3 (CrashAtStep, exit 17) and resumed with --ckpt_path last; the per-step
     losses of the two compared, last.ckpt's keys checked unwrapped, and `amrlhf export` of it (fsdp.json).
Then gpu_check.md: one summary table and each stage's own table.

    python3 benchmarks/gpu_check.py --out $OUT [--trl-path DIR]

On the lent machine (no network, no trl): carry the wheels of docs/gpu_benchmark.md in .whl/ and run
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. \
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT --trl-path /tmp/site
CPU dry run (tests/test_gpu_check.py): --dry-run: tiny shapes on the CPU, TRL's rows left out, and the FSDP
stage's same three fits with Lightning's default strategy (FSDP needs CUDA), so the plumbing is what is checked.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from gpu_common import CUDA, SHAPES, bench_data, build_policy, synthetic_pairs  # noqa: E402

log = logging.getLogger("gpu_check")
STAGES = ("dpo", "reference", "fsdp")
LIMITS = {"dpo": 240, "reference": 60, "fsdp": 170}  # seconds per stage on a GPU: 470 in all, under 8 minutes
DRY_RUN_SLACK = 4  # a dry run's limits are this many times longer: a 2-core CPU starts each process slowly
BETA = 0.1
CRASH_STEP, STEPS = 3, 6


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the stages' results (created)")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--trl-path", help="passed to gpu_dpo.py: a folder holding trl and its needs")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (the tests' check of the script)")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # a child process: run this stage only
    args = p.parse_args(argv)
    if args.trl_path and not (Path(args.trl_path) / "trl" / "__init__.py").is_file():
        p.error(f"--trl-path {args.trl_path}: no trl/__init__.py there (unzip a trl wheel into it)")
    return args


# -- stage 1: the DPO benchmark ---------------------------------------------------------------------------------

def stage_dpo(args, out: Path) -> dict:
    cmd = [sys.executable, str(HERE / "gpu_dpo.py"), "--json", str(out / "gpu_dpo.json"),
           "--budget", str(LIMITS["dpo"] - 60)]  # no row starts after 180 s; a row is time-boxed at 25 s
    if args.dry_run:
        cmd += ["--dry-run", "--no-trl"]
    elif args.trl_path:
        cmd += ["--trl-path", args.trl_path]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    (out / "gpu_dpo.txt").write_text(proc.stdout + proc.stderr[-4000:])
    if proc.returncode:
        raise RuntimeError(f"gpu_dpo.py exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    rows = json.loads((out / "gpu_dpo.json").read_text())["rows"]
    ran = [r for r in rows if "not_run" not in r]
    table = proc.stdout[proc.stdout.find("\n|"):].strip() if "\n|" in proc.stdout else ""
    return {"rows_run": len(ran), "rows": len(rows), "all_finite": all(r["loss_finite"] for r in ran),
            "table": table}


# -- stage 2: the cached reference against the live one -----------------------------------------------------------

class TwinReference:
    """The live reference (returned, so training runs on it) and the cached one read beside it at every step."""

    def __init__(self, spec, cache: str):
        from amrlhf.modules import CachedReference, FrozenReference

        self.live = FrozenReference(spec)
        self.cached = CachedReference(FrozenReference(spec), cache=cache)
        self.steps: list[dict] = []

    def setup(self, module) -> None:
        self.cached.setup(module)
        self.live.setup(module)

    def logps(self, module, batch: dict, split: str):
        from amrlhf.losses import sequence_logps

        live = self.live.logps(module, batch, split)
        cached = self.cached.logps(module, batch, split).to(live.dtype)
        resp = batch["response_mask"].bool()
        token = (cached - live).abs()[resp]
        d = sequence_logps(cached, resp) - sequence_logps(live, resp)
        b = batch["index"].shape[0]
        self.steps.append({"token_max": float(token.max()), "token_mean": float(token.mean()),
                           "sequence_max": float(d.abs().max()),
                           "loss_bound": float(BETA * (d[:b] - d[b:]).abs().max()),
                           "sequence_logp_mean": float(sequence_logps(live, resp).abs().mean())})
        return live


def stage_reference(args, out: Path) -> dict:
    import lightning as L

    from amrlhf.losses import SigmoidDPO
    from amrlhf.models import ModelSpec, load_tokenizer
    from amrlhf.modules import DPOModule

    shape, pairs, length, steps = ("tiny", 2, 32, 3) if args.dry_run else ("qwen05b", 8, 256, 8)
    with tempfile.TemporaryDirectory() as root:
        policy, _ = build_policy(shape, root, "cuda" if CUDA else "cpu")
        examples = synthetic_pairs(pairs * steps, length, length, SHAPES[shape][1]["vocab_size"], seed=1)
        twin = TwinReference(ModelSpec(policy, dtype="bfloat16"), cache=os.path.join(root, "reflogps"))
        module = DPOModule(ModelSpec(policy, dtype="float32"), reference=twin, loss=SigmoidDPO(beta=BETA), lr=1e-6)
        trainer = L.Trainer(accelerator="cuda" if CUDA else "cpu", devices=1, precision="bf16-mixed",
                            max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                            use_distributed_sampler=False)
        trainer.fit(module, datamodule=bench_data(examples, load_tokenizer(policy), pairs))
    s = twin.steps
    return {"shape": shape, "pairs": pairs, "tokens": 2 * length, "steps": len(s),
            "token_max": max(x["token_max"] for x in s), "token_mean": sum(x["token_mean"] for x in s) / len(s),
            "sequence_max": max(x["sequence_max"] for x in s), "loss_bound": max(x["loss_bound"] for x in s),
            "sequence_logp_mean": sum(x["sequence_logp_mean"] for x in s) / len(s)}


# -- stage 3: FSDP on one GPU, crashed and resumed ----------------------------------------------------------------

def child_env() -> dict[str, str]:
    """This checkout's amrlhf first on the path, whatever the child's folder (a relative PYTHONPATH entry such as
    `.` would follow the child's cwd); MLflow's URI left to each run's own store."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
    return env


def _fit(args: list[str], cwd: Path, log_to: Path) -> int:
    proc = subprocess.run([sys.executable, "-m", "amrlhf", *args], cwd=cwd, capture_output=True, text=True,
                          env=child_env())
    with log_to.open("a") as f:
        f.write(f"$ amrlhf {' '.join(args)}\n-> exit {proc.returncode}\n{proc.stderr[-6000:]}\n")
    return proc.returncode


def _losses(runs_root: Path) -> dict[int, float]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{runs_root.resolve()}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    if len(runs) != 1:
        raise RuntimeError(f"{runs_root}: {len(runs)} MLflow runs, expected 1 (a resume reattaches to its run)")
    return {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "loss")}


def stage_fsdp(args, out: Path) -> dict:
    work = out / "fsdp"
    work.mkdir(exist_ok=True)
    logs = out / "fsdp.log"
    if _fit(["prepare", "tiny-llama", "tiny-arith"], ROOT, logs):
        raise RuntimeError(f"amrlhf prepare failed (see {logs.name})")
    common = ["fit", "--config", str(ROOT / "recipes/smoke/dpo.yaml"), "--checkpoint_every=1",
              f"--trainer.max_steps={STEPS}", f"--trainer.val_check_interval={STEPS}", "--tracking.log_checkpoint=false"]
    if not args.dry_run:
        common += ["--trainer.strategy.class_path=amrlhf.strategies.FSDP", "--trainer.accelerator=cuda",
                   "--trainer.devices=1", "--trainer.precision=bf16-mixed", "--trainer.gradient_clip_val=1.0"]
    a, b = work / "a", work / "b"
    rc = {"uninterrupted": _fit([*common, "--runs_root", str(a)], work, logs),
          "crashed": _fit([*common, "--runs_root", str(b), "--trainer.callbacks+=amrlhf.callbacks.CrashAtStep",
                           f"--trainer.callbacks.step={CRASH_STEP}"], work, logs),
          "resumed": _fit([*common, "--runs_root", str(b), "--ckpt_path", "last"], work, logs)}
    if rc != {"uninterrupted": 0, "crashed": 17, "resumed": 0}:
        raise RuntimeError(f"exit codes {rc}, expected 0 / 17 / 0 (see {logs.name})")
    la, lb = _losses(a), _losses(b)
    if sorted(la) != sorted(lb) or len(la) != STEPS:
        raise RuntimeError(f"logged steps differ: uninterrupted {sorted(la)}, resumed {sorted(lb)}")
    rel = max(abs(lb[k] - la[k]) / max(abs(la[k]), 1e-12) for k in la)
    ckpt = b / "smoke-dpo" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    keys = list(state["state_dict"])
    wrapped = [k for k in keys if "_fsdp_wrapped_module" in k or "_checkpoint_wrapped_module" in k]
    exported = _fit(["export", str(ckpt), str(work / "export")], work, logs) == 0
    return {"strategy": "Lightning default (dry run)" if args.dry_run else "amrlhf.strategies.FSDP, 1 GPU",
            "exit_codes": rc, "steps": STEPS, "crash_after": CRASH_STEP, "loss_max_rel_diff": rel,
            "global_step": state["global_step"], "keys": len(keys),
            "keys_unwrapped": not wrapped and all(k.startswith("policy.") for k in keys), "exported": exported}


# -- the driver -------------------------------------------------------------------------------------------------

RUN = {"dpo": stage_dpo, "reference": stage_reference, "fsdp": stage_fsdp}


def verdict(name: str, r: dict) -> str:
    if "error" in r:
        return f"failed: {r['error']}"
    if name == "dpo":
        return f"{r['rows_run']} of {r['rows']} rows ran, losses finite: {r['all_finite']}"
    if name == "reference":
        return (f"{r['steps']} steps: per token max {r['token_max']:.3g} (mean {r['token_mean']:.2g}), per sequence "
                f"max {r['sequence_max']:.3g} of |log p| {r['sequence_logp_mean']:.0f}; DPO loss moved <= "
                f"{r['loss_bound']:.3g}")
    return (f"{r['strategy']}: exit codes {r['exit_codes']['crashed']} then {r['exit_codes']['resumed']}, "
            f"losses max rel. diff {r['loss_max_rel_diff']:.2g} over {r['steps']} steps, keys unwrapped "
            f"{r['keys_unwrapped']}, exported {r['exported']}")


def summary(results: dict[str, dict], device: str) -> str:
    lines = [f"# GPU check: {device}", "", "| stage | seconds | result |", "|---|---:|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r.get('seconds', 0):.0f} | {verdict(name, r)} |")
    if results.get("dpo", {}).get("table"):
        lines += ["", "## DPO step, ours and TRL's", "", results["dpo"]["table"]]
    return "\n".join(lines) + "\n"


def run_stage(name: str, args, out: Path) -> dict:
    """One stage in a child process, time-limited; -> its result, or {"error": why}."""
    cmd = [sys.executable, __file__, "--out", str(out), "--stage", name] + (["--dry-run"] if args.dry_run else [])
    if args.trl_path:
        cmd += ["--trl-path", args.trl_path]
    limit = LIMITS[name] * (DRY_RUN_SLACK if args.dry_run else 1)
    t = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=child_env())
        result_file = out / f"{name}.json"
        if proc.returncode or not result_file.exists():
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            result = {"error": f"exit {proc.returncode}: {tail}"}
        else:
            result = json.loads(result_file.read_text())
        (out / f"{name}.stderr.txt").write_text(proc.stderr[-20000:])
    except subprocess.TimeoutExpired:
        result = {"error": f"stopped at its limit of {limit} s"}
    result["seconds"] = time.monotonic() - t
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.stage:  # the child: one stage, its result written as JSON
        (out / f"{args.stage}.json").write_text(json.dumps(RUN[args.stage](args, out), indent=2))
        return 0
    if not CUDA and not args.dry_run:
        print(f"error: no CUDA device is visible (torch {torch.__version__}): --dry-run checks the script on the "
              "CPU", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name() if CUDA else "CPU (dry run)"
    results: dict[str, dict] = {}
    for name in args.stages:
        log.info("stage %s (limit %d s)", name, LIMITS[name])
        results[name] = run_stage(name, args, out)
        log.info("stage %s: %s", name, verdict(name, results[name]))
        (out / "gpu_check.md").write_text(summary(results, device))  # after every stage
    print(summary(results, device), flush=True)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
