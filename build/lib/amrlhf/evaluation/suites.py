"""Evaluation suites: which slots run, and every setting that changes the numbers, explicit.

A recipe names slots (`mmlu`, `gsm`, `humaneval`, `truthfulqa`, `halueval`, `adversarial`), not task
names, so it does not change between a machine with a hub and one without; the results name the
task actually run (`source: hub` runs lm-eval's built-in task, `source: offline` the project's own
task on data that `amrlhf prepare` builds, under its own honest name).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import yaml

from amrlhf.errors import AmrlhfError
from amrlhf.evaluation.slots import SLOTS, Slot


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_limit(limit) -> None:
    """Examples per task: a positive integer, or None for all of them (lm-eval would fail on 0 or a
    negative number deep inside, and compare a string with numbers)."""
    if limit is not None and (not _is_int(limit) or limit < 1):
        raise AmrlhfError(f"limit must be a positive integer (examples per task) or null for all, got {limit!r}")


@dataclass
class EvalSuite:
    slots: list[str] = field(default_factory=lambda: ["halueval", "adversarial", "mmlu"])
    source: Literal["offline", "hub"] = "offline"
    limit: int | None = 50
    num_fewshot: int = 0
    apply_chat_template: bool = False
    max_gen_toks: int = 16
    batch_size: int = 4
    max_length: int = 1024
    include_path: str | None = None  # extra task folders of the user's own
    tasks: list[str] = field(default_factory=list)  # extra task names (from include_path or built-in)
    allow_code_execution: bool = False  # opt-in for slots that run model-written code (docs/sandbox.md)

    def __post_init__(self) -> None:
        check_limit(self.limit)
        for name in ("max_gen_toks", "batch_size", "max_length", "num_fewshot"):
            low = 0 if name == "num_fewshot" else 1
            if not _is_int(getattr(self, name)) or getattr(self, name) < low:
                raise AmrlhfError(f"{name} must be an integer >= {low}, got {getattr(self, name)!r}")
        for name in ("apply_chat_template", "allow_code_execution"):
            if not isinstance(getattr(self, name), bool):
                raise AmrlhfError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("slots", "tasks"):
            if not isinstance(getattr(self, name), list) or not all(isinstance(x, str) for x in getattr(self, name)):
                raise AmrlhfError(f"{name} must be a list of names, got {getattr(self, name)!r}")
        if self.source not in ("offline", "hub"):
            raise AmrlhfError(f"source must be offline or hub, got {self.source!r}")
        if self.include_path is not None and not isinstance(self.include_path, str):
            raise AmrlhfError(f"include_path must be a folder path, got {self.include_path!r}")

    def settings(self) -> dict:
        return {k: v for k, v in asdict(self).items()}

    def resolve(self) -> list[tuple[str, str, Slot]]:
        """-> [(slot, task name, Slot)]; a clear error for an unknown slot or a missing task."""
        out = []
        for name in self.slots:
            if name not in SLOTS:
                raise AmrlhfError(f"unknown evaluation slot '{name}': known slots are {', '.join(SLOTS)}")
            slot = SLOTS[name]
            task = slot.hub if self.source == "hub" else slot.offline
            if task is None:
                other = "hub" if self.source == "offline" else "offline"
                raise AmrlhfError(f"slot '{name}' has no {self.source} task in this version (it has a {other} one: "
                                  f"set source: {other}, or drop the slot)")
            if slot.runs_code and not self.allow_code_execution:
                raise AmrlhfError(f"slot '{name}' executes model-written code: set `allow_code_execution: true` in "
                                  "the suite to run it (offline: in the project's sandbox, docs/sandbox.md)")
            out.append((name, task, slot))
        return out

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()[:12]


def load_suite(path: str | Path, limit: int | None = None) -> EvalSuite:
    """The suite in `path`, checked; `limit` (when given) overrides its per-task example limit."""
    p = Path(path)
    if not p.is_file():
        raise AmrlhfError(f"evaluation suite not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise AmrlhfError(f"{p}: not valid YAML: {exc}") from None
    unknown = set(raw) - set(EvalSuite.__dataclass_fields__)
    if unknown:
        raise AmrlhfError(f"{p}: unknown field(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(EvalSuite.__dataclass_fields__)}")
    if not isinstance(raw, dict):
        raise AmrlhfError(f"{p}: expected a mapping of suite fields")
    try:
        suite = EvalSuite(**raw)
    except AmrlhfError as exc:
        raise AmrlhfError(f"{p}: {exc}") from None
    if limit is not None:
        check_limit(limit)
        suite = replace(suite, limit=limit)
    suite.resolve()
    return suite
