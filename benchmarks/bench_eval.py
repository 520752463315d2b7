"""Benchmark (not a test): evaluation-only mode vs the plain lm-eval command line, same model, tasks,
data, limit and batch size, each as a separate process (so both pay their own start-up and model
load). Prints seconds per suite and the ratio.

    python benchmarks/bench_eval.py [--model local:smollm2-135m-instruct] [--config recipes/eval/quick.yaml] [--limit 20]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="local:smollm2-135m-instruct")
    p.add_argument("--config", default="recipes/eval/quick.yaml")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()

    from amrlhf.evaluation.suites import load_suite
    from amrlhf.evaluation.tasks import render_tasks
    from amrlhf.models.loading import resolve_model

    suite = load_suite(args.config)
    tasks = ",".join(task for _, task, _ in suite.resolve())
    include = render_tasks(suite)
    path, _ = resolve_model(args.model)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    times: dict[str, list[float]] = {"amrlhf eval": [], "lm-eval CLI": []}
    with tempfile.TemporaryDirectory() as tmp:
        ours = [sys.executable, "-m", "amrlhf", "eval", "--config", args.config, "--model", args.model, "--limit",
                str(args.limit), "--runs_root", os.path.join(tmp, "runs")]
        theirs = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                  f"pretrained={path},dtype=float32,max_length={suite.max_length}", "--tasks", tasks, "--include_path",
                  str(include), "--limit", str(args.limit), "--batch_size", str(suite.batch_size), "--device", "cpu",
                  "--gen_kwargs", f"max_gen_toks={suite.max_gen_toks}", "--output_path", os.path.join(tmp, "cli")]
        for _ in range(args.repeats):
            for name, cmd in (("amrlhf eval", ours), ("lm-eval CLI", theirs)):
                start = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    sys.exit(f"{name} failed:\n{proc.stderr[-2000:]}")
                times[name].append(time.perf_counter() - start)
    print(f"\nevaluation-only mode, {args.model}, tasks {tasks}, limit {args.limit}, batch {suite.batch_size}, CPU")
    print(f"{'command':14s}{'seconds':>10s}")
    for name, ts in times.items():
        print(f"{name:14s}{min(ts):10.1f}")
    print(f"ratio amrlhf/lm-eval: {min(times['amrlhf eval']) / min(times['lm-eval CLI']):.2f}")


if __name__ == "__main__":
    main()
