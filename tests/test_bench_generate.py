"""The generation benchmark runs end to end on the tiny model and prints its paired table; bad arguments are
refused."""

import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_generate  # noqa: E402


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_generate.main(["--rounds", "0"])
    assert exit_.value.code == 2 and "--rounds must be >= 1" in capsys.readouterr().err


def test_both_sides_run_and_the_table_pairs_them(tiny_assets, capsys):
    bench_generate.main(["--model", "local:tiny-llama", "--data", "local:tiny-arith/sft_train", "--rounds", "2",
                         "--new-tokens", "4", "--threads", "1"])
    out = capsys.readouterr().out
    assert "round 0 (warm-up)" in out and "round 2: ours" in out
    assert "| paired ratio per round: mean (min-max) |" in out
    row = next(line for line in out.splitlines() if line.startswith("| tokens generated |"))
    ours, theirs = (float(x) for x in row.split("|")[2:4])
    assert 0 < ours <= 2 * 4 * 4 and 0 < theirs <= 2 * 4 * 4  # 2 prompts x 4 samples x <= 4 tokens
