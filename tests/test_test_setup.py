"""The test suite's own set-up (conftest.py)."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import ROOT


def test_a_test_run_leaves_no_amrlhf_home_behind(tmp_path):
    """conftest.py gives each pytest process a temporary AMRLHF_HOME (tiny assets built into it); the process
    removes it when it exits, so repeated runs do not fill the temporary directory."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                           str(tmp_path / "base"), f"{Path(__file__)}::test_the_home_is_a_fresh_temporary_folder"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout
    assert not list(tmp.glob("amrlhf-test-home-*"))


def test_the_home_is_a_fresh_temporary_folder(tiny_assets):
    """(Also what the run above selects.) The assets are built into a folder of the temporary directory."""
    home = Path(os.environ["AMRLHF_HOME"])
    assert home == tiny_assets and home.is_dir() and any(home.iterdir())
    assert home.parent == Path(tempfile.gettempdir()) and home.name.startswith("amrlhf-test-home-")
