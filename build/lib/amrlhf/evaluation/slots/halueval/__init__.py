"""HaluEval dialogue as 2-way multiple choice on the held-out split (`amrlhf prepare halueval_dialogue`)."""

import hashlib
import json
from pathlib import Path

from amrlhf.assets import resolve_local
from amrlhf.evaluation.slots.base import Slot, write_rows


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


def build(folder: Path) -> Path:
    return write_rows(folder / "halueval_dialogue_mc.jsonl",
                      halueval_mc_rows(resolve_local("local:halueval_dialogue/heldout", "data")))


SLOT = Slot("halueval", Path(__file__).parent, hub=None, offline="halueval_dialogue_mc", asset="halueval_dialogue",
            build=build)
