"""GSM-style grade-school word problems, offline. NOT GSM8K: the problems are generated from
symbolic templates by reasoning-gym's `gsm_symbolic` generator (`reasoning-gym==0.1.25`, Apache-2.0),
deterministically from a seed, with worked solutions that end in `#### n` as GSM8K's do.

reasoning-gym's package `__init__` imports every generator and needs a dozen packages (cellpylib,
pycosat, ...) that are no dependency of this project; `gsm_symbolic` itself needs only the standard
library. So `amrlhf prepare gsm_style` runs a short script in a separate, isolated interpreter with
the extracted wheel on `sys.path` and stub parent packages, which loads just that generator.

Scoring: the model's answer is the number after `#### ` if it writes one, else the last number it
writes; both sides are normalised (`1,200` = `$1200` = `1200.0` -> `1200`) and compared exactly.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import tempfile
import zipfile
from decimal import Decimal, InvalidOperation
from pathlib import Path

from amrlhf.errors import AmrlhfError

log = logging.getLogger(__name__)

REASONING_GYM_PKG = "reasoning-gym==0.1.25"
# name: (rows, seed); item i uses Random(seed + i), so train's seed starts past test's range (no shared draws)
SPLITS = {"test": (1000, 0), "train": (200, 10_000)}  # train: a pool of few-shot examples only
NO_ANSWER = "[no answer]"
_MARKED = re.compile(r"####\s*(-?[$\d.,]*\d)")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")

GENERATE = r"""
import json, sys, types
root = sys.argv[1]
sys.path.insert(0, root)
for name in ("reasoning_gym", "reasoning_gym.arithmetic", "reasoning_gym.coaching"):
    mod = types.ModuleType(name)
    mod.__path__ = [root + "/" + name.replace(".", "/")]
    sys.modules[name] = mod
from reasoning_gym.factory import create_dataset
import reasoning_gym.arithmetic.gsm_symbolic
for item in create_dataset("gsm_symbolic", seed=int(sys.argv[2]), size=int(sys.argv[3])):
    print(json.dumps({"question": item["question"], "answer": item["answer"],
                      "answer_cot": item["metadata"]["answer_cot"]}))
"""


def normalise_number(text: str) -> str | None:
    """'1,200' / '$1200' / '1200.0' / '-3.50' -> '1200' / '1200' / '1200' / '-3.5'; None if not a number."""
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str:
    """The model's final answer: the number after `#### `, else the last number; NO_ANSWER if none."""
    marked = _MARKED.findall(text)
    candidates = marked or _NUMBER.findall(text)
    for raw in reversed(candidates):
        number = normalise_number(raw)
        if number is not None:
            return number
    return NO_ANSWER


def row(item: dict, line: int) -> dict:
    """A generated item -> {"question", "answer" (worked solution ending `#### n`, n normalised), "target" (n)}."""
    cot = item.get("answer_cot")
    target = normalise_number(str(item.get("answer", "")))
    if not isinstance(cot, str) or target is None:
        raise AmrlhfError(f"gsm_symbolic output line {line}: field 'answer_cot'/'answer' missing or not a number")
    if extract_answer(cot) != target:
        raise AmrlhfError(f"gsm_symbolic output line {line}: worked solution ends in "
                          f"{extract_answer(cot)!r}, answer is {target!r}")
    head, _, _ = cot.rstrip().rpartition("####")
    answer = f"{head}#### {target}" if head else f"{cot.rstrip()}\n#### {target}"
    return {"question": item["question"], "answer": answer, "target": target}


def generate(wheel_root: Path, seed: int, size: int) -> list[dict]:
    """Run reasoning-gym's gsm_symbolic from an extracted wheel in an isolated interpreter."""
    proc = subprocess.run([sys.executable, "-I", "-c", GENERATE, str(wheel_root), str(seed), str(size)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AmrlhfError(f"reasoning-gym gsm_symbolic failed: {proc.stderr.strip()[-500:]}")
    return [row(json.loads(x), i) for i, x in enumerate(proc.stdout.splitlines(), 1) if x.strip()]


def build(out: Path) -> dict:
    """`amrlhf prepare gsm_style`: test (1000 problems, seed 0) and train (200, seed 10000; few-shot pool)."""
    from amrlhf.assets import fetch_wheel

    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        wheel = fetch_wheel(REASONING_GYM_PKG, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(Path(tmp) / "wheel", [n for n in zf.namelist() if n.startswith("reasoning_gym/")])
        for split, (size, seed) in SPLITS.items():
            rows = generate(Path(tmp) / "wheel", seed, size)
            with open(out / f"{split}.jsonl", "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)
            counts[split] = len(rows)
    return {"source": REASONING_GYM_PKG, "generator": "gsm_symbolic (difficulty 1.0)", "rows": counts,
            "seeds": {k: v[1] for k, v in SPLITS.items()}, "licence": "Apache-2.0 (reasoning-gym)",
            "note": "GSM-style problems generated from templates; not GSM8K"}
