"""The GRPO benchmark's argument checks and table, without running either side."""

import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_grpo  # noqa: E402


@pytest.mark.parametrize("argv,message", [
    (["--generations", "1"], "--generations must be >= 2"),
    (["--prompts", "1", "--generations", "3"], "must be even"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--beta", "-1"], "--beta and --max-grad-norm must be >= 0"),
    (["--max-grad-norm", "-1"], "--beta and --max-grad-norm must be >= 0"),
    (["--optimizer-in-backward", "1"], "--optimizer-in-backward 1 needs --max-grad-norm 0"),
    (["--models", "gpt5"], "invalid choice"),
    (["--map-large-mb", "-1"], "between 0 (off) and 32 MiB; got -1"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_grpo.parse(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_summary_and_ratio_table():
    raw = {"times": [2.0, 4.0], "gen": [{"s": 1.0, "new": 30, "prompt": 70}, {"s": 3.0, "new": 50, "prompt": 70}],
           "loads": [1.0, 2.0], "peak_rss_mb": 900.0, "import_rss_mb": 400.0}
    ours = bench_grpo.summary(raw)
    assert ours["s/step"] == 3.0 and ours["tokens/s"] == pytest.approx(110 / 3) and ours["gen tokens/s"] == 20.0
    trl = dict(ours, **{"s/step": 6.0})
    text = bench_grpo.table({"ours": ours, "trl": trl})
    assert "| s/step | 3.000 | 6.000 | 0.50 |" in text
    assert "| peak RSS MB | 900.0 | n/a | n/a |" in bench_grpo.table({"ours": ours, "trl": "did not run"})
    assert bench_grpo.digit_share("", "a1b2") == 0.5


def test_map_large_mb_gives_our_side_the_callback_and_names_it_in_the_heading():
    from amrlhf.callbacks import MapLargeAllocations

    off, on = bench_grpo.parse([]), bench_grpo.parse(["--map-large-mb", "0.25"])
    assert bench_grpo.mapping_callbacks(off.map_large_mb) == []
    (callback,) = bench_grpo.mapping_callbacks(on.map_large_mb)
    assert isinstance(callback, MapLargeAllocations) and callback.threshold == 1 << 18
    assert bench_grpo.ours_settings(off) == ""
    assert bench_grpo.ours_settings(on) == "; ours with MapLargeAllocations(0.25 MiB)"
    both = bench_grpo.parse(["--map-large-mb", "1", "--max-grad-norm", "0", "--optimizer-in-backward", "1"])
    assert bench_grpo.ours_settings(both) == "; ours with optimizer_in_backward and MapLargeAllocations(1 MiB)"


def test_both_sides_run_the_same_adamw_kernel_and_the_heading_names_a_fused_one():
    plain, fused = bench_grpo.parse([]), bench_grpo.parse(["--fused-adamw", "1"])
    assert bench_grpo.trl_optim(plain) == "adamw_torch"  # torch.optim.AdamW's default kernel, as ours
    assert bench_grpo.trl_optim(fused) == "adamw_torch_fused"
    assert bench_grpo.ours_settings(fused) == "; fused AdamW on both sides"
    fused_mapped = bench_grpo.parse(["--fused-adamw", "1", "--map-large-mb", "1"])
    assert bench_grpo.ours_settings(fused_mapped) == "; fused AdamW on both sides; ours with MapLargeAllocations(1 MiB)"
    with pytest.raises(SystemExit):
        bench_grpo.parse(["--fused-adamw", "2"])
