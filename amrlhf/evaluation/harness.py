"""The ONE evaluation function: lm-eval on an in-memory model, used by the callback after `fit`
and by `amrlhf eval` alike. Metrics come back as `lm_eval/<task>/<metric>_<filter>` (MLflow takes
no commas in keys), with the full results JSON and per-sample outputs written beside them."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from amrlhf.errors import AmrlhfError
from amrlhf.evaluation.sandbox import ALLOW_ENV, announce
from amrlhf.evaluation.suites import EvalSuite, check_limit
from amrlhf.evaluation.tasks import render_tasks
from amrlhf.tracking import RunWriter

log = logging.getLogger(__name__)


@dataclass
class EvalReport:
    metrics: dict[str, float]
    settings: dict
    tasks: dict[str, str]          # slot -> task actually run
    files: list[Path]
    seconds: float

    def table(self) -> str:
        lines = [f"{'metric':58s}{'value':>10s}{'stderr':>10s}"]
        for key, value in sorted(self.metrics.items()):
            if key.endswith("_stderr"):
                continue
            se = self.metrics.get(key + "_stderr")
            se_txt = f"{se:10.4f}" if se is not None and not math.isnan(se) else f"{'-':>10s}"
            lines.append(f"{key:58s}{value:10.4f}{se_txt}")
        shown = ", ".join(f"{k}={v}" for k, v in self.settings.items() if k not in ("include_path", "tasks"))
        lines.append(f"settings: {shown}")
        lines.append("tasks run: " + ", ".join(f"{s} -> {t}" for s, t in self.tasks.items()))
        return "\n".join(lines)


@contextmanager
def code_execution(allowed: bool, sandboxed: bool = False):
    """The suite's opt-in reaches the sandbox (amrlhf.evaluation.sandbox) through the environment, for
    the duration of one evaluation only; without it the variable is removed, so nothing inherited counts.
    `sandboxed`: the evaluation runs code in that sandbox, which says once here if its fallback is in force."""
    before = os.environ.pop(ALLOW_ENV, None)
    try:
        if allowed:
            os.environ[ALLOW_ENV] = "1"
            if sandboxed:
                announce()
        yield
    finally:
        os.environ.pop(ALLOW_ENV, None)
        if before is not None:
            os.environ[ALLOW_ENV] = before


def flatten(results: dict) -> dict[str, float]:
    """lm-eval's {"task": {"acc,none": x, "acc_stderr,none": y}} -> {"lm_eval/task/acc_none": x, ...}."""
    out = {}
    for task, metrics in results.items():
        for name, value in metrics.items():
            if "," not in name or not isinstance(value, int | float):
                continue
            metric, filt = name.split(",", 1)
            key = f"lm_eval/{task}/{metric}_{filt}"
            if metric.endswith("_stderr"):
                key = f"lm_eval/{task}/{metric[: -len('_stderr')]}_{filt}_stderr"
            out[key] = float(value)
    return out


def evaluate(model, tokenizer, suite: EvalSuite, *, out_dir: Path, limit: int | None = None) -> EvalReport:
    """Run the suite's tasks on `model` (in memory, not reloaded) with lm-eval's harness."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    check_limit(limit)
    resolved = suite.resolve()
    include = [p for p in (render_tasks(suite), suite.include_path) if p]
    manager = TaskManager(include_path=[str(p) for p in include] or None)
    names = [task for _, task, _ in resolved] + list(suite.tasks)
    missing = [n for n in names if n not in manager.all_tasks]
    if missing:
        raise AmrlhfError(f"unknown lm-eval task(s) {', '.join(missing)} (include_path: {suite.include_path})")
    device = str(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=suite.batch_size, max_length=suite.max_length,
              device=device)
    sandboxed = suite.source == "offline" and any(slot.runs_code for _, _, slot in resolved)
    with code_execution(suite.allow_code_execution, sandboxed):
        results = lm_eval.simple_evaluate(
            model=lm, tasks=names, task_manager=manager, limit=limit if limit is not None else suite.limit,
            num_fewshot=suite.num_fewshot, apply_chat_template=suite.apply_chat_template,
            gen_kwargs={"max_gen_toks": suite.max_gen_toks}, log_samples=True, bootstrap_iters=1000,
            random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
            confirm_run_unsafe_code=suite.allow_code_execution,
        )
    model.train(was_training)
    ran = {t: n for t, n in results.get("n-shot", {}).items() if n != suite.num_fewshot}
    if ran:  # lm-eval keeps a task's own `num_fewshot: 0` whatever is asked
        log.warning("num_fewshot %d was not applied to: %s", suite.num_fewshot,
                    ", ".join(f"{t} ran {n}-shot" for t, n in sorted(ran.items())))
    seconds = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {**suite.settings(), "limit": limit if limit is not None else suite.limit}
    samples = results.pop("samples", {})
    res_path = out_dir / "lm_eval_results.json"
    res_path.write_text(json.dumps({"settings": settings, **results}, indent=2, default=str))
    files = [res_path]
    for task, rows in samples.items():
        path = out_dir / f"samples_{task}.jsonl"
        path.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
        files.append(path)
    tasks = {slot: task for slot, task, _ in resolved}
    return EvalReport(flatten(results["results"]), settings, tasks, files, seconds)


def log_to_mlflow(writer: RunWriter, run_id: str, report: EvalReport, step: int = 0) -> None:
    """The report's metrics (NaN left out), its settings and task versions as parameters, its files."""
    writer.metrics(run_id, {k: v for k, v in report.metrics.items() if not math.isnan(v)}, step=step)
    writer.metrics(run_id, {"lm_eval/seconds": report.seconds}, step=step)
    params = {f"lm_eval.{k}": str(v)[:500] for k, v in report.settings.items()}
    params.update({f"lm_eval.task.{s}": t for s, t in report.tasks.items()})
    writer.params(run_id, params)
    writer.files(run_id, report.files, artifact_path="lm_eval")
