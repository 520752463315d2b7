"""TruthfulQA multiple choice from BIG-bench's copy (`amrlhf prepare truthfulqa_bigbench`); lm-eval's
`truthfulqa_mc2` on a hub."""

from pathlib import Path

from amrlhf.evaluation.slots.base import Slot, prepared

SLOT = Slot("truthfulqa", Path(__file__).parent, hub="truthfulqa_mc2", offline="truthfulqa_mc_bigbench",
            asset="truthfulqa_bigbench", build=prepared("local:truthfulqa_bigbench/test"))
