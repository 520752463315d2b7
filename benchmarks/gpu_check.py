"""The GPU check (not a test): what a lent GPU should run, in one command, in under 8 minutes.

Three stages, each in a process group of its own with a time limit of its own (220 / 90 / 170 s; a stage past it
is killed with everything it started); the results are written under --out after every stage, so a run stopped
from outside still leaves the stages it finished:
  1. dpo: benchmarks/gpu_dpo.py: our DPO step against TRL's DPOTrainer on the same card (tokens/s, MFU, peak memory;
     packed and padded; gradient checkpointing off and on; ours with the optimizer in the backward pass), AM-DPO
     cached and online.
  2. reference: does a cached reference agree with the live one under bf16-mixed? A short DPO fit whose reference
     is the live bf16 model, with the cached log-probs of the same model (CachedReference: computed once before
     training, in batches of its own) read beside it at every step: per response token and per sequence, the
     largest |cached - live|, and beta x |d(chosen) - d(rejected)|, which bounds how far the cached reference moves
     a pair's sigmoid DPO loss (the loss's slope in its logit is at most 1).
  3. fsdp: a 1-GPU FSDP smoke through `amrlhf fit` on recipes/smoke/dpo.yaml (amrlhf.strategies.FSDP, bf16-mixed):
     one run uninterrupted, one killed after step 3 (CrashAtStep, exit 17) and resumed with --ckpt_path last; the
     per-step `loss` and `eval/loss` of the two compared, FSDP's wrapping named in the log, last.ckpt's keys checked
     unwrapped, and `amrlhf export` of it. Metrics go to Lightning's CSVLogger, not MLflow, so the stage needs no
     MLflow on the card's machine (only amrlhf's CLI: jsonargparse[signatures]).
Under --out (5 files, within what a device call brings back): gpu_check.md (one line per stage, then the DPO
table), gpu_check.json (every stage's numbers), gpu_dpo.json and gpu_dpo.txt (the benchmark's own), stages.log.

    python3 benchmarks/gpu_check.py --out $OUT [--trl-path DIR]

On the lent machine (no network; no trl, datasets, dill, multiprocess, jsonargparse, docstring-parser or
typeshed-client): carry their wheels in .whl/ (docs/gpu_benchmark.md) and run
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:. \
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT --trl-path /tmp/site
A stage that fails, passes its limit or fails a check is "FAILED: <why>" in the summary, the others still run,
and the exit code is 1.
CPU dry run (tests/test_gpu_check.py): --dry-run: tiny shapes on the CPU, TRL's rows left out, and the FSDP
stage's same three fits with Lightning's default strategy (FSDP needs CUDA), so the plumbing is what is checked.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import shutil
import signal
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
LIMITS = {"dpo": 220, "reference": 90, "fsdp": 170}  # seconds per stage on a GPU: 480 in all
DRY_RUN_SLACK = 4  # a dry run's limits are this many times longer: a loaded 2-core CPU starts processes slowly
BETA = 0.1
CRASH_STEP, STEPS = 3, 6
RESUME_RTOL = 1e-3  # the resumed run's losses against the uninterrupted run's (bf16 kernels need not be bitwise)
CLI_NEEDS = ("jsonargparse", "docstring_parser", "typeshed_client")  # what `amrlhf fit` imports beyond the image


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the results (created)")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--trl-path", help="passed to gpu_dpo.py: a folder holding trl and its needs")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (the tests' check of the script)")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # a child: run this stage only, in --work
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.trl_path and not (Path(args.trl_path) / "trl" / "__init__.py").is_file():
        p.error(f"--trl-path {args.trl_path}: no trl/__init__.py there (unzip a trl wheel into it)")
    return args


def child_env() -> dict[str, str]:
    """This checkout's amrlhf first on the path, whatever the child's folder (a relative PYTHONPATH entry such as
    `.` would follow the child's cwd); no MLflow URI handed down."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
    return env


# -- stage 1: the DPO benchmark ---------------------------------------------------------------------------------

def stage_dpo(args, out: Path, work: Path) -> dict:
    cmd = [sys.executable, str(HERE / "gpu_dpo.py"), "--json", str(out / "gpu_dpo.json"),
           "--budget", str(LIMITS["dpo"] - 60)]  # no row starts after 160 s; each row is time-boxed at 25 s
    if args.dry_run:
        cmd += ["--dry-run", "--no-trl"]
    elif args.trl_path:
        cmd += ["--trl-path", args.trl_path]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    (out / "gpu_dpo.txt").write_text(proc.stdout)
    print(proc.stderr[-20000:], file=sys.stderr)
    if proc.returncode:
        raise RuntimeError(f"gpu_dpo.py exited {proc.returncode}: {last_line(proc.stderr)}")
    rows = json.loads((out / "gpu_dpo.json").read_text())["rows"]
    ran = [r for r in rows if "not_run" not in r]
    problems = [] if ran else ["no row ran"]
    problems += [f"{r['variant']} / {r['impl']}: a non-finite loss" for r in ran if not r["loss_finite"]]
    table = proc.stdout[proc.stdout.find("\n|"):].strip() if "\n|" in proc.stdout else ""
    return {"rows_run": len(ran), "rows": len(rows), "table": table, "problems": problems}


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
        b = batch["index"].shape[0]  # rows [:b] are the chosen responses, [b:] the rejected ones
        self.steps.append({"token_max": float(token.max()), "token_mean": float(token.mean()),
                           "sequence_max": float(d.abs().max()),
                           "loss_bound": float(BETA * (d[:b] - d[b:]).abs().max()),
                           "sequence_logp_mean": float(sequence_logps(live, resp).abs().mean())})
        return live


def stage_reference(args, out: Path, work: Path) -> dict:
    import lightning as L

    from amrlhf.losses import SigmoidDPO
    from amrlhf.models import ModelSpec, load_tokenizer
    from amrlhf.modules import DPOModule

    shape, pairs, length, steps = ("tiny", 2, 32, 3) if args.dry_run else ("qwen05b", 8, 256, 8)
    policy, _ = build_policy(shape, str(work), "cuda" if CUDA else "cpu")
    examples = synthetic_pairs(pairs * steps, length, length, SHAPES[shape][1]["vocab_size"], seed=1)
    twin = TwinReference(ModelSpec(policy, dtype="bfloat16"), cache=str(work / "reflogps"))
    module = DPOModule(ModelSpec(policy, dtype="float32"), reference=twin, loss=SigmoidDPO(beta=BETA), lr=1e-6)
    trainer = L.Trainer(accelerator="cuda" if CUDA else "cpu", devices=1, precision="bf16-mixed", max_steps=steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        use_distributed_sampler=False)
    trainer.fit(module, datamodule=bench_data(examples, load_tokenizer(policy), pairs))
    s = twin.steps
    result = {"shape": shape, "pairs": pairs, "tokens": 2 * length, "steps": len(s),
              "token_max": max(x["token_max"] for x in s), "token_mean": sum(x["token_mean"] for x in s) / len(s),
              "sequence_max": max(x["sequence_max"] for x in s), "loss_bound": max(x["loss_bound"] for x in s),
              "sequence_logp_mean": sum(x["sequence_logp_mean"] for x in s) / len(s)}
    result["problems"] = [f"{k} is not finite" for k, v in result.items()
                          if isinstance(v, float) and not math.isfinite(v)]
    return result


# -- stage 3: FSDP on one GPU, crashed and resumed ----------------------------------------------------------------

def _amrlhf(args: list[str], cwd: Path) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "amrlhf", *args], cwd=cwd, capture_output=True, text=True,
                          env=child_env())
    print(f"$ amrlhf {' '.join(args)}\n-> exit {proc.returncode}\n{proc.stderr[-6000:]}", file=sys.stderr)
    return proc.returncode, proc.stderr


def csv_metrics(folders: list[Path], key: str) -> dict[int, float]:
    """{step: value} of `key` in the CSVLogger files under `folders`; a later folder's value wins (a resumed run's
    steps after a crashed one's)."""
    out: dict[int, float] = {}
    for folder in folders:
        for path in sorted(folder.rglob("metrics.csv")):
            with path.open() as f:
                for row in csv.DictReader(f):
                    if row.get(key):
                        out[int(row["step"])] = float(row[key])
    return out


def max_rel_diff(a: dict[int, float], b: dict[int, float]) -> float:
    return max((abs(b[k] - a[k]) / max(abs(a[k]), 1e-12) for k in a), default=math.inf)


def stage_fsdp(args, out: Path, work: Path) -> dict:
    import importlib.util

    missing = [m for m in CLI_NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"amrlhf's CLI needs {', '.join(missing)}: carry their wheels (docs/gpu_benchmark.md)")
    rc, err = _amrlhf(["prepare", "tiny-llama", "tiny-arith"], work)
    if rc:
        raise RuntimeError(f"amrlhf prepare exited {rc}: {last_line(err)}")
    common = ["fit", "--config", str(ROOT / "recipes/smoke/dpo.yaml"), "--checkpoint_every=1",
              f"--trainer.max_steps={STEPS}", f"--trainer.val_check_interval={STEPS}",
              "--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.flush_logs_every_n_steps=1"]
    if not args.dry_run:
        common += ["--trainer.strategy.class_path=amrlhf.strategies.FSDP", "--trainer.accelerator=cuda",
                   "--trainer.devices=1", "--trainer.precision=bf16-mixed", "--trainer.gradient_clip_val=1.0"]
    a, b, b2 = work / "a", work / "b", work / "b-resumed"
    runs = {"uninterrupted": _amrlhf([*common, "--runs_root", str(a), f"--trainer.logger.save_dir={a}"], work),
            "crashed": _amrlhf([*common, "--runs_root", str(b), f"--trainer.logger.save_dir={b}",
                                "--trainer.callbacks+=amrlhf.callbacks.CrashAtStep",
                                f"--trainer.callbacks.step={CRASH_STEP}"], work),
            "resumed": _amrlhf([*common, "--runs_root", str(b), f"--trainer.logger.save_dir={b2}",
                                "--ckpt_path", "last"], work)}
    rc = {name: code for name, (code, _) in runs.items()}
    if rc != {"uninterrupted": 0, "crashed": 17, "resumed": 0}:
        bad = next(n for n, c in rc.items() if c != {"crashed": 17}.get(n, 0))
        raise RuntimeError(f"exit codes {rc}, expected 0 / 17 / 0; {bad}: {last_line(runs[bad][1])}")
    problems = []
    loss_a, loss_b = csv_metrics([a], "loss"), csv_metrics([b, b2], "loss")
    eval_a, eval_b = csv_metrics([a], "eval/loss"), csv_metrics([b, b2], "eval/loss")
    if sorted(loss_a) != sorted(loss_b) or len(loss_a) != STEPS:
        problems.append(f"logged steps differ: uninterrupted {sorted(loss_a)}, crashed + resumed {sorted(loss_b)}")
    rel, eval_rel = max_rel_diff(loss_a, loss_b), max_rel_diff(eval_a, eval_b)
    if not (rel <= RESUME_RTOL and eval_rel <= RESUME_RTOL):
        problems.append(f"the resumed run's losses differ: max rel. {rel:.2g} (loss), {eval_rel:.2g} (eval/loss)")
    wrapping = "FSDP: wrapping each" in runs["uninterrupted"][1]
    if not args.dry_run and not wrapping:
        problems.append("the log does not say FSDP wrapped the model's layers")
    ckpt = b / "smoke-dpo" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    keys = list(state["state_dict"])
    unwrapped = all(k.startswith("policy.") and "_fsdp_wrapped_module" not in k and "_checkpoint_wrapped_module"
                    not in k for k in keys)
    if not unwrapped or state["global_step"] != STEPS:
        problems.append(f"last.ckpt: global_step {state['global_step']} (expected {STEPS}), keys unwrapped "
                        f"{unwrapped}")
    code, err = _amrlhf(["export", str(ckpt), str(work / "export")], work)
    if code:
        problems.append(f"amrlhf export exited {code}: {last_line(err)}")
    return {"strategy": "Lightning's default (dry run)" if args.dry_run else "amrlhf.strategies.FSDP, 1 GPU, bf16-mixed",
            "exit_codes": rc, "steps": STEPS, "crash_after": CRASH_STEP, "loss_max_rel_diff": rel,
            "eval_loss_max_rel_diff": eval_rel, "fsdp_wrapping_logged": wrapping, "global_step": state["global_step"],
            "keys": len(keys), "keys_unwrapped": unwrapped, "exported": code == 0, "problems": problems}


# -- the driver -------------------------------------------------------------------------------------------------

RUN = {"dpo": stage_dpo, "reference": stage_reference, "fsdp": stage_fsdp}


def last_line(text: str) -> str:
    return (text.strip().splitlines() or ["(no output)"])[-1]


def verdict(name: str, r: dict) -> str:
    if "error" in r:
        return f"FAILED: {r['error']}"
    failed = f"FAILED: {'; '.join(r['problems'])}. " if r.get("problems") else ""
    if name == "dpo":
        return f"{failed}{r['rows_run']} of {r['rows']} rows ran"
    if name == "reference":
        return (f"{failed}{r['steps']} steps: per token max {r['token_max']:.3g} (mean {r['token_mean']:.2g}), per "
                f"sequence max {r['sequence_max']:.3g} (a sequence's -log p: {r['sequence_logp_mean']:.0f}); a pair's DPO loss "
                f"moved <= {r['loss_bound']:.3g}")
    return (f"{failed}{r['strategy']}: exit codes {r['exit_codes']['crashed']} then {r['exit_codes']['resumed']}; "
            f"max rel. diff {r['loss_max_rel_diff']:.2g} (loss), {r['eval_loss_max_rel_diff']:.2g} (eval/loss) over "
            f"{r['steps']} steps; keys unwrapped {r['keys_unwrapped']}; exported {r['exported']}")


def summary(results: dict[str, dict], device: str) -> str:
    lines = [f"# GPU check: {device}", "", "| stage | seconds | result |", "|---|---:|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r.get('seconds', 0):.0f} | {verdict(name, r)} |")
    if results.get("dpo", {}).get("table"):
        lines += ["", "## DPO step, ours and TRL's", "", results["dpo"]["table"]]
    return "\n".join(lines) + "\n"


def run_stage(name: str, args, out: Path) -> dict:
    """One stage in a child process group, time-limited (past it, the group is killed: the benchmark or fit the
    stage started too); -> its result, or {"error": why}. Its stderr is appended to out/stages.log."""
    limit = LIMITS[name] * (DRY_RUN_SLACK if args.dry_run else 1)
    work = Path(tempfile.mkdtemp(prefix=f"gpu_check-{name}-"))
    cmd = [sys.executable, __file__, "--out", str(out), "--stage", name, "--work", str(work)]
    cmd += ["--dry-run"] if args.dry_run else []
    cmd += ["--trl-path", args.trl_path] if args.trl_path else []
    t = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(),
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=limit)
        result_file = work / "result.json"
        if proc.returncode or not result_file.exists():
            result = {"error": f"exit {proc.returncode}: {last_line(output)}"}
        else:
            result = json.loads(result_file.read_text())
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        result = {"error": f"stopped at its limit of {limit:g} s"}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = time.monotonic() - t
    with (out / "stages.log").open("a") as f:
        f.write(f"==== {name}: {verdict(name, result)}\n{output}\n")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.stage:  # the child: one stage, its result written as JSON into its work folder
        result = RUN[args.stage](args, out, Path(args.work))
        (Path(args.work) / "result.json").write_text(json.dumps(result, indent=2))
        return 0
    if not CUDA and not args.dry_run:
        print(f"error: no CUDA device is visible (torch {torch.__version__}): --dry-run checks the script on the "
              "CPU", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name() if CUDA else "CPU (dry run)"
    (out / "stages.log").unlink(missing_ok=True)
    results: dict[str, dict] = {}
    for name in args.stages:
        log.info("stage %s (limit %g s)", name, LIMITS[name] * (DRY_RUN_SLACK if args.dry_run else 1))
        results[name] = run_stage(name, args, out)
        log.info("stage %s: %s", name, verdict(name, results[name]))
        (out / "gpu_check.json").write_text(json.dumps({"device": device, "stages": results}, indent=2))
        (out / "gpu_check.md").write_text(summary(results, device))  # after every stage
    print(summary(results, device), flush=True)
    return 0 if all("error" not in r and not r.get("problems") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
