"""GSM-style word problems (NOT GSM8K; `amrlhf prepare gsm_style`), few-shot pool kept apart from the test rows;
lm-eval's `gsm8k` on a hub."""

from pathlib import Path

from amrlhf.evaluation.slots.base import Slot, prepared

SLOT = Slot("gsm", Path(__file__).parent, hub="gsm8k", offline="gsm_style", asset="gsm_style",
            build=prepared("local:gsm_style/test"), fewshot=prepared("local:gsm_style/train"))
