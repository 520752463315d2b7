"""The generation benchmark runs end to end on the tiny model and prints its paired table; bad arguments are
refused; the benchmarks' child runner forwards the arguments and reads the result back."""

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


def test_a_benchmark_child_gets_every_argument_but_the_excluded(tmp_path, capsys):
    """bench_ppo.run_child (GRPO, PPO and DPO's children): `--child IMPL MODEL` and each argument forwarded, the
    child's RESULT line read back; a child that fails gives None and the last line of its stderr."""
    import argparse

    import bench_ppo

    script = tmp_path / "child.py"
    script.write_text("import json, sys\n"
                      "if '--fail=1' in sys.argv: sys.exit('boom: the child failed')\n"
                      "print('noise'); print('RESULT ' + json.dumps(sys.argv[1:]))\n")
    args = argparse.Namespace(models=["tiny"], impls=["ours"], child=None, steps=3, map_large_mb=0.25, fail=0)
    got, why = bench_ppo.run_child(str(script), "ours", "tiny", args, exclude=("models", "impls", "child"))
    assert got == ["--child", "ours", "tiny", "--steps=3", "--map-large-mb=0.25", "--fail=0"] and why == ""
    args.fail = 1
    assert bench_ppo.run_child(str(script), "trl", "tiny", args, exclude=("models", "impls", "child")) == \
        (None, "boom: the child failed")
    assert "trl/tiny did not run: boom: the child failed" in capsys.readouterr().err
    with pytest.raises(TypeError, match="--impls: run_child forwards numbers and strings only"):
        bench_ppo.run_child(str(script), "ours", "tiny", args)  # a list it would pass as "['ours']"
