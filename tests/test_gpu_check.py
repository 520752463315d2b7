"""benchmarks/gpu_check.py on the CPU: the reference probe's arithmetic worked by hand, the refusal without a GPU,
the summary of a failed stage, and the dry run of all three stages (tiny shapes; the FSDP stage's three fits with
Lightning's default strategy, since FSDP needs CUDA)."""

import json
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


class Fixed:
    def __init__(self, values):
        self.values = values

    def logps(self, module, batch, split):
        return self.values


def test_the_reference_probe_by_hand():
    """Two pairs: chosen rows 0-1, rejected rows 2-3; 3 positions, the last one padding. Live log-probs all -1;
    cached off by (+0.25, -0.5 | pad 9), (0, +0.125 | 9) on the chosen rows and (+0.125, 0 | 9), (-0.5, -0.5 | 9) on
    the rejected ones. Per token: max 0.5, mean (0.25 + 0.5 + 0 + 0.125 + 0.125 + 0 + 0.5 + 0.5) / 8 = 0.25; per
    sequence d = (-0.25, 0.125 | 0.125, -1.0): max 1.0; per pair beta |d_c - d_r| = 0.1 x (0.375, 1.125): max 0.1125;
    the live sequences' |log p| = 2. The padding's 9 is never read, and training gets the live values."""
    twin = gpu_check.TwinReference.__new__(gpu_check.TwinReference)
    live = torch.full((4, 3), -1.0)
    twin.live, twin.steps = Fixed(live), []
    twin.cached = Fixed(torch.tensor([[-0.75, -1.5, 8.0], [-1.0, -0.875, 8.0], [-0.875, -1.0, 8.0],
                                      [-1.5, -1.5, 8.0]]))
    batch = {"response_mask": torch.tensor([[1, 1, 0]] * 4), "index": torch.tensor([0, 1])}
    assert twin.logps(None, batch, "train") is live
    (s,) = twin.steps
    assert s["token_max"] == pytest.approx(0.5) and s["token_mean"] == pytest.approx(0.25)
    assert s["sequence_max"] == pytest.approx(1.0) and s["loss_bound"] == pytest.approx(0.1125)
    assert s["sequence_logp_mean"] == pytest.approx(2.0)


def test_the_bound_pairs_chosen_row_i_with_rejected_row_i():
    """Per-sequence d = (0, 0.5 | 0, 2) (chosen rows 0-1, rejected rows 2-3): chosen i against rejected i gives
    max(|0 - 0|, |0.5 - 2|) = 1.5, bound 0.15; pairing rows 0-1 and 2-3 (an interleaved layout) would give
    max(0.5, 2) = 2, bound 0.2."""
    twin = gpu_check.TwinReference.__new__(gpu_check.TwinReference)
    twin.live, twin.steps = Fixed(torch.zeros(4, 1)), []
    twin.cached = Fixed(torch.tensor([[0.0], [0.5], [0.0], [2.0]]))
    twin.logps(None, {"response_mask": torch.ones(4, 1, dtype=torch.long), "index": torch.tensor([0, 1])}, "train")
    assert twin.steps[0]["loss_bound"] == pytest.approx(0.15)


def test_resumed_metrics_are_read_across_the_two_runs(tmp_path):
    """CSVLogger files: the crashed run's steps, then the resumed run's (a step both logged takes the later)."""
    for folder, rows in (("b", [(0, "0.5"), (1, "0.4"), (2, "0.3")]), ("b2", [(2, "0.25"), (3, "0.2")])):
        (tmp_path / folder / "version_0").mkdir(parents=True)
        text = "epoch,loss,eval/loss,step\r\n" + "".join(f"0,{v},,{k}\r\n" for k, v in rows) + "0,,0.7,3\r\n"
        (tmp_path / folder / "version_0" / "metrics.csv").write_text(text)
    loss = gpu_check.csv_metrics([tmp_path / "b", tmp_path / "b2"], "loss")
    assert loss == {0: 0.5, 1: 0.4, 2: 0.25, 3: 0.2}
    assert gpu_check.csv_metrics([tmp_path / "b"], "eval/loss") == {3: 0.7}
    assert gpu_check.max_rel_diff({0: 2.0, 1: 1.0}, {0: 2.0, 1: 1.1}) == pytest.approx(0.1)
    assert gpu_check.max_rel_diff({}, {}) == float("inf")  # nothing logged is no agreement


def test_a_failed_stage_or_check_is_named_in_the_summary():
    text = gpu_check.summary({"dpo": {"error": "exit 1: CUDA out of memory", "seconds": 12.0},
                              "reference": {"steps": 8, "token_max": 0.1, "token_mean": 0.01, "sequence_max": 1.0,
                                            "sequence_logp_mean": 3000.0, "loss_bound": 0.05,
                                            "problems": ["loss_bound is not finite"], "seconds": 30.0}}, "H200")
    assert "# GPU check: H200" in text and "| dpo | 12 | FAILED: exit 1: CUDA out of memory |" in text
    assert "| reference | 30 | FAILED: loss_bound is not finite. 8 steps" in text


def test_bad_trl_path_is_refused(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.parse(["--out", str(tmp_path), "--trl-path", str(tmp_path)])
    assert exit_.value.code == 2 and "no trl/__init__.py there" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_a_real_run_is_one_error_line(capsys, tmp_path):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no CUDA device is visible") and "--dry-run" in err[0]


def test_the_dry_run_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "out"
    code = gpu_check.main(["--out", str(out), "--dry-run"])
    summary = (out / "gpu_check.md").read_text()
    assert code == 0, summary + (out / "stages.log").read_text()[-3000:]
    assert summary in capsys.readouterr().out and "FAILED" not in summary
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.md", "gpu_dpo.json", "gpu_dpo.txt",
                                                     "stages.log"]  # within what a device call brings back
    stages = json.loads((out / "gpu_check.json").read_text())["stages"]
    dpo, ref, fsdp = stages["dpo"], stages["reference"], stages["fsdp"]
    assert dpo["rows_run"] == 6 and not dpo["problems"] and "| DPO | ours | off | 1 |" in dpo["table"]
    assert ref["steps"] == 3 and ref["sequence_logp_mean"] > 10
    assert 0 <= ref["token_max"] < 0.05 and 0 <= ref["loss_bound"] < 0.05  # rows misaligned would be far apart
    assert fsdp["exit_codes"] == {"uninterrupted": 0, "crashed": 17, "resumed": 0} and not fsdp["problems"]
    assert fsdp["global_step"] == 6 and fsdp["keys_unwrapped"] and fsdp["exported"]
    assert fsdp["loss_max_rel_diff"] <= 1e-6 and fsdp["eval_loss_max_rel_diff"] <= 1e-6


def test_a_stage_past_its_limit_is_killed_and_reported(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.LIMITS, "reference", 0.5)
    t = time.monotonic()
    result = gpu_check.run_stage("reference", SimpleNamespace(dry_run=False, trl_path=None), tmp_path)
    assert result["error"] == "stopped at its limit of 0.5 s" and time.monotonic() - t < 30
    assert "==== reference: FAILED: stopped at its limit" in (tmp_path / "stages.log").read_text()
