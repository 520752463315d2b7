"""Offline lm-eval tasks: the YAMLs in the top-level eval/ folder, rendered with absolute data paths
into a folder that lm-eval's TaskManager includes, beside the data files they read."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from amrlhf.assets import resolve_local
from amrlhf.errors import AmrlhfError
from amrlhf.evaluation.adversarial import adversarial_rows
from amrlhf.evaluation.suites import EvalSuite
from amrlhf.paths import cache_dir

TASK_YAMLS = Path(__file__).resolve().parents[2] / "eval"
HOOKS = "amrlhf_task_fns.py"  # `!function` hooks, resolved by lm-eval beside the rendered YAMLs
PREPARED = {"gsm_style": "local:gsm_style/test", "truthfulqa_mc_bigbench": "local:truthfulqa_bigbench/test",
            "humaneval_sandboxed": "local:humaneval/test"}
FEWSHOT = {"gsm_style": "local:gsm_style/train"}  # __FEWSHOT__: a few-shot pool kept apart from the test rows


def halueval_mc_rows(heldout: Path) -> list[dict]:
    """Held-out HaluEval dialogue pairs as 2-way multiple choice (the order fixed by a hash)."""
    rows = []
    for line in heldout.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        turns = []
        for m in r["prompt"]:
            who = {"system": "", "user": "[Human]: ", "assistant": "[Assistant]: "}[m["role"]]
            turns.append(who + m["content"])
        query = "\n".join(turns) + "\n[Assistant]:"
        flip = int(hashlib.sha256(query.encode()).hexdigest(), 16) % 2
        choices = [" " + r["chosen"], " " + r["rejected"]]  # the one space (the YAML: target_delimiter "")
        rows.append({"query": query, "choices": choices[::-1] if flip else choices, "gold": 1 if flip else 0})
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def data_file(task: str, folder: Path) -> Path:
    if task == "adversarial_tricks":
        return _write(folder / "adversarial_tricks.jsonl", adversarial_rows(200, seed=0))
    if task == "halueval_dialogue_mc":
        return _write(folder / "halueval_dialogue_mc.jsonl",
                      halueval_mc_rows(resolve_local("local:halueval_dialogue/heldout", "data")))
    if task == "mmlu_0shot_offline":
        return resolve_local("local:mmlu/test", "data")
    if task in PREPARED:
        return resolve_local(PREPARED[task], "data")
    raise AmrlhfError(f"no offline data for task '{task}'")


def render_tasks(suite: EvalSuite) -> Path | None:
    """The include folder for lm-eval (None when every task is built in)."""
    offline = [task for _, task, _ in suite.resolve()] if suite.source == "offline" else []
    if not offline:
        return None
    folder = cache_dir("eval_tasks") / suite.key()
    folder.mkdir(parents=True, exist_ok=True)
    for task in offline:
        text = (TASK_YAMLS / f"{task}.yaml").read_text().replace("__DATA__", str(data_file(task, folder)))
        if task in FEWSHOT:
            text = text.replace("__FEWSHOT__", str(resolve_local(FEWSHOT[task], "data")))
        (folder / f"{task}.yaml").write_text(text)
    shutil.copyfile(TASK_YAMLS / HOOKS, folder / HOOKS)
    return folder
