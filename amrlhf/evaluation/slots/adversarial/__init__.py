"""Adversarial trick questions, generated here (no asset): amrlhf.evaluation.adversarial."""

from pathlib import Path

from amrlhf.evaluation.adversarial import adversarial_rows
from amrlhf.evaluation.slots.base import Slot, write_rows


def build(folder: Path) -> Path:
    return write_rows(folder / "adversarial_tricks.jsonl", adversarial_rows(200, seed=0))


SLOT = Slot("adversarial", Path(__file__).parent, hub=None, offline="adversarial_tricks", asset=None, build=build)
