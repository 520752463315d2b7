"""TruthfulQA multiple choice as BIG-bench ships it (`bigbench==1.0.0`, `benchmark_tasks/truthful_qa/
task_mc.json`, Apache-2.0): 299 of TruthfulQA's 817 questions, each with one true answer among 2-5
choices (so mc1-style accuracy; there is no mc2 here). The prompt is BIG-bench's own: its six-question
`task_prefix` (the same few-shot block lm-eval's truthfulqa_mc1 uses), then `Q: ...\\nA:`; each choice
is scored by log-likelihood as stored, `" " + answer` (the task YAML sets `target_delimiter: ""`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from amrlhf.errors import AmrlhfError

log = logging.getLogger(__name__)

BIGBENCH_PKG = "bigbench==1.0.0"
TASK_DIR = "bigbench/benchmark_tasks/truthful_qa/"
TASK_FILE = "task_mc.json"


def mc_rows(task: dict, source: str = TASK_FILE) -> tuple[list[dict], int]:
    """BIG-bench task JSON -> ([{"query", "question", "choices", "gold"}], rows skipped). A row is skipped
    (and counted) unless exactly one choice scores 1; a malformed example names its index and field."""
    prefix = task.get("task_prefix", "")
    q_pre, a_pre = task.get("example_input_prefix", "\nQ: "), task.get("example_output_prefix", "\nA: ")
    rows, skipped = [], 0
    for i, ex in enumerate(task.get("examples") or []):
        scores = ex.get("target_scores")
        if not isinstance(ex.get("input"), str):
            raise AmrlhfError(f"{source}: example {i}: field 'input' missing or not text")
        if not isinstance(scores, dict) or not scores:
            raise AmrlhfError(f"{source}: example {i}: field 'target_scores' missing or empty")
        choices = list(scores)
        golds = [j for j, c in enumerate(choices) if scores[c] == 1]
        if len(golds) != 1:
            skipped += 1
            continue
        rows.append({"query": f"{prefix}{q_pre}{ex['input']}{a_pre.rstrip()}", "question": ex["input"],
                     "choices": [" " + c for c in choices], "gold": golds[0]})
    if not rows:
        raise AmrlhfError(f"{source}: no multiple-choice examples with exactly one true answer")
    return rows, skipped


def build(out: Path) -> dict:
    """`amrlhf prepare truthfulqa_bigbench`: stream only truthful_qa/ out of the 358 MB sdist."""
    import tempfile

    from amrlhf.assets import fetch_sdist_members

    with tempfile.TemporaryDirectory() as tmp:
        info = fetch_sdist_members(BIGBENCH_PKG, TASK_DIR, Path(tmp))
        task = json.loads((Path(tmp) / TASK_FILE).read_text(encoding="utf-8"))
    rows, skipped = mc_rows(task, f"{TASK_DIR}{TASK_FILE}")
    if skipped:
        log.warning("truthfulqa_bigbench: %d examples without exactly one true answer skipped", skipped)
    with open(out / "test.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return {**info, "file": f"{TASK_DIR}{TASK_FILE}", "rows": len(rows), "skipped_not_single_answer": skipped,
            "licence": "Apache-2.0 (BIG-bench); TruthfulQA: Apache-2.0",
            "note": "BIG-bench's 299-question TruthfulQA MC subset; mc1-style accuracy"}
