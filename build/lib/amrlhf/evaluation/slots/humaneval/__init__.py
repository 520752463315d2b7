"""HumanEval, completions run in the project's sandbox (`amrlhf prepare humaneval`; docs/sandbox.md);
lm-eval's `humaneval` on a hub. Runs model-written code: a suite must opt in."""

from pathlib import Path

from amrlhf.evaluation.slots.base import Slot, prepared

SLOT = Slot("humaneval", Path(__file__).parent, hub="humaneval", offline="humaneval_sandboxed", asset="humaneval",
            build=prepared("local:humaneval/test"), runs_code=True)
