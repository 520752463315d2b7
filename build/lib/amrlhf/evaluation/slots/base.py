"""What an evaluation slot is: a folder of this package holding its offline lm-eval task YAML (and the
`!function` hooks the YAML names, in `amrlhf_task_fns.py`), with the builder of the data it reads."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from amrlhf.assets import resolve_local

HOOKS = "amrlhf_task_fns.py"  # lm-eval resolves `!function amrlhf_task_fns.NAME` beside the task YAML


@dataclass(frozen=True)
class Slot:
    """hub: lm-eval's built-in task where a hub is reachable; offline: the project's task (`<offline>.yaml` in
    `folder`) on data `build(out_folder)` returns (prepared by `amrlhf prepare <asset>`, or generated);
    fewshot: the few-shot pool's data file (`__FEWSHOT__`), if the YAML has one; runs_code: the task executes
    model-written code (a suite must opt in)."""

    name: str
    folder: Path
    hub: str | None
    offline: str | None
    asset: str | None
    build: Callable[[Path], Path] | None = None
    fewshot: Callable[[], Path] | None = None
    runs_code: bool = False

    @property
    def task_yaml(self) -> Path:
        return self.folder / f"{self.offline}.yaml"

    def render(self, out: Path) -> Path:
        """The offline task, its data paths filled in, into out/<name>/ (with its hooks, if any)."""
        target = out / self.name
        target.mkdir(parents=True, exist_ok=True)
        text = self.task_yaml.read_text().replace("__DATA__", str(self.build(target)))
        if self.fewshot is not None:
            text = text.replace("__FEWSHOT__", str(self.fewshot()))
        (target / self.task_yaml.name).write_text(text)
        if (self.folder / HOOKS).exists():
            shutil.copyfile(self.folder / HOOKS, target / HOOKS)
        return target


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def prepared(local_id: str) -> Callable[..., Path]:
    """A builder reading a prepared asset's part (`local:ASSET/PART`)."""
    return lambda *_: resolve_local(local_id, "data")
