"""Tests run offline on CPU with tiny assets built in-process into a temporary AMRLHF_HOME."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_HOME = Path(tempfile.mkdtemp(prefix="amrlhf-test-home-"))
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


def amrlhf(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess."""
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "amrlhf", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**base, **(env or {})})


def recipe(name: str) -> str:
    return str(ROOT / "recipes" / "smoke" / f"{name}.yaml")
