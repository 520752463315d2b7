"""MMLU, 0-shot, offline on the prepared test split (`amrlhf prepare mmlu`); lm-eval's `mmlu` on a hub."""

from pathlib import Path

from amrlhf.evaluation.slots.base import Slot, prepared

SLOT = Slot("mmlu", Path(__file__).parent, hub="mmlu", offline="mmlu_0shot_offline", asset="mmlu",
            build=prepared("local:mmlu/test"))
