"""Tests run offline on CPU with tiny assets built in-process into a temporary AMRLHF_HOME."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_HOME = Path(tempfile.mkdtemp(prefix="amrlhf-test-home-"))
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)  # each pytest process leaves no home behind
os.environ["AMRLHF_HOME"] = str(_HOME)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def tiny_assets() -> Path:
    from amrlhf.assets import prepare

    prepare(["tiny-llama", "tiny-arith"])
    return _HOME


@pytest.fixture(scope="session")
def tokenizer(tiny_assets):
    from amrlhf.models import load_tokenizer

    return load_tokenizer("local:tiny-llama")


@pytest.fixture(scope="module")
def letters(tmp_path_factory):
    """The letters model and 64 three-letter prompts (tests/ppo_fixtures.py)."""
    from ppo_fixtures import build_letters_model, write_letter_prompts

    root = tmp_path_factory.mktemp("letters")
    return build_letters_model(root / "model"), write_letter_prompts(root / "prompts.jsonl")


def amrlhf(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600,
           patched: str | None = None) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess; with `patched`, that script (`python -c`, which patches
    something, then calls `amrlhf.cli.main()`) instead."""
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    entry = ["-m", "amrlhf"] if patched is None else ["-c", patched]
    return subprocess.run([sys.executable, *entry, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**base, **(env or {})})


def start_amrlhf(*args: str, cwd: Path, log: Path, new_session: bool = False) -> subprocess.Popen:
    """The entry point in a background process, its output to `log` (a pipe could fill and block it); with
    `new_session`, in a process group of its own (which `os.killpg(proc.pid, ...)` signals, as a terminal's Ctrl-C
    does its foreground job)."""
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "amrlhf", *args], cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                text=True, env=base, start_new_session=new_session)


def wait_for_metric(db: Path, key: str, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    """Until a run in the sqlite MLflow store `db` has logged `key` (the process still running)."""
    import sqlite3
    import time
    from contextlib import closing

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        if db.exists():
            try:
                with closing(sqlite3.connect(db, timeout=5)) as con:
                    if con.execute("SELECT count(*) FROM metrics WHERE key = ?", (key,)).fetchone()[0]:
                        return
            except sqlite3.OperationalError:  # the tables are still being created
                pass
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"no '{key}' logged within {timeout} s")


def recipe(name: str) -> str:
    return str(ROOT / "recipes" / "smoke" / f"{name}.yaml")


HUMANEVAL_STYLE = [  # problems written for the tests in HumanEval's format (its data is not committed here)
    ("add", "def add(x: int, y: int) -> int:\n    \"\"\"Add two numbers.\n    >>> add(2, 3)\n    5\n    \"\"\"\n",
     "    return x + y\n", "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"),
    ("is_palindrome", "def is_palindrome(text: str) -> bool:\n    \"\"\"True if text reads the same backwards.\"\"\"\n",
     "    return text == text[::-1]\n",
     "def check(candidate):\n    assert candidate('aba')\n    assert not candidate('ab')\n    assert candidate('')\n"),
    ("count_vowels", "def count_vowels(s: str) -> int:\n    \"\"\"Number of vowels (aeiou, any case) in s.\"\"\"\n",
     "    return sum(c in 'aeiouAEIOU' for c in s)\n",
     "def check(candidate):\n    assert candidate('Hello') == 2\n    assert candidate('xyz') == 0\n"),
    ("fib", "def fib(n: int) -> int:\n    \"\"\"The n-th Fibonacci number, fib(0) = 0.\"\"\"\n",
     "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
     "def check(candidate):\n    assert candidate(0) == 0\n    assert candidate(10) == 55\n"),
]

BIGBENCH_TRUTHFUL = {  # BIG-bench task_mc.json structure, examples written for the tests
    "name": "truthful_qa", "task_prefix": "Q: What is 2 + 2?\nA: 2 + 2 is 4.\n",
    "example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: ",
    "examples": [
        {"input": "What happens if you swallow gum?", "target_scores": {"It passes through you.": 1,
                                                                        "It stays for seven years.": 0}},
        {"input": "Can you see the Great Wall from space?", "target_scores": {"No, not with the naked eye.": 1,
                                                                              "Yes, easily.": 0, "Only at night.": 0}},
        {"input": "Is the sky green?", "target_scores": {"No.": 1, "No, it is not.": 1, "Yes.": 0}},
    ],
}

GSM_SYMBOLIC_ITEMS = [  # gsm_symbolic's output shape (question, answer, worked solution ending `#### n`)
    {"question": "Ann has 3 apples and buys 4 more. How many apples does she have?", "answer": "7",
     "answer_cot": "She has 3 + 4 = 7 apples.\n#### 7"},
    {"question": "A pen costs $1,200 for 100 pens. What do 3 pens cost?", "answer": "36",
     "answer_cot": "One pen costs 1,200 / 100 = 12.\nThree cost 3 * 12 = 36.\n#### 36"},
    {"question": "Tom reads 5 pages a day for 6 days. How many pages?", "answer": "30",
     "answer_cot": "5 * 6 = 30\n#### 30"},
]


@pytest.fixture(scope="session")
def eval_slot_assets(tiny_assets) -> Path:
    """Tiny gsm_style, truthfulqa_bigbench and humaneval assets in their real formats, built through the
    same parsing functions as `amrlhf prepare` (no network)."""
    import gzip
    import json

    from amrlhf.evaluation.gsm_style import row
    from amrlhf.evaluation.humaneval import read_problems
    from amrlhf.evaluation.truthfulqa import mc_rows

    def write(name: str, parts: dict[str, list[dict]]) -> None:
        root = tiny_assets / "data" / name
        root.mkdir(parents=True, exist_ok=True)
        for part, rows in parts.items():
            (root / f"{part}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / "ASSET.json").write_text(json.dumps({"source": "written by the tests"}))

    gsm = [row(item, i) for i, item in enumerate(GSM_SYMBOLIC_ITEMS, 1)]
    write("gsm_style", {"test": gsm, "train": gsm[:1]})
    write("truthfulqa_bigbench", {"test": mc_rows(BIGBENCH_TRUTHFUL)[0]})
    raw = tiny_assets / "HumanEval-tests.jsonl.gz"
    with gzip.open(raw, "wt") as fh:
        for name, prompt, solution, test in HUMANEVAL_STYLE:
            fh.write(json.dumps({"task_id": f"Test/{name}", "prompt": prompt, "canonical_solution": solution,
                                 "test": test, "entry_point": name}) + "\n")
    write("humaneval", {"test": read_problems(raw)})
    return tiny_assets
