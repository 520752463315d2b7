"""Offline lm-eval tasks: each slot's task YAML (amrlhf/evaluation/slots/<slot>/, package data, so any install
runs them from any folder), rendered with absolute data paths into a folder that lm-eval's TaskManager
includes, beside the data files they read and the hooks they name."""

from __future__ import annotations

from pathlib import Path

from amrlhf.evaluation.suites import EvalSuite
from amrlhf.paths import cache_dir


def render_tasks(suite: EvalSuite) -> Path | None:
    """The include folder for lm-eval (None when every task is built in)."""
    offline = [slot for _, _, slot in suite.resolve()] if suite.source == "offline" else []
    if not offline:
        return None
    folder = cache_dir("eval_tasks") / suite.key()
    folder.mkdir(parents=True, exist_ok=True)
    for slot in offline:
        slot.render(folder)
    return folder
