"""Evaluation slots, registered here and nowhere else. A slot is one folder of this package: its offline
lm-eval task YAML, the `!function` hooks it names (`amrlhf_task_fns.py`) and, in its `__init__.py`, the
builder of the data it reads (`SLOT`). Adding a suite: a folder like these and one line below
(docs/evaluation.md)."""

from amrlhf.evaluation.slots import adversarial, gsm, halueval, humaneval, mmlu, truthfulqa
from amrlhf.evaluation.slots.base import Slot

SLOTS: dict[str, Slot] = {s.SLOT.name: s.SLOT for s in (mmlu, halueval, adversarial, gsm, truthfulqa, humaneval)}

__all__ = ["SLOTS", "Slot"]
