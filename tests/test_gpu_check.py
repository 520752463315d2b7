"""benchmarks/gpu_check.py on the CPU: the reference probe's arithmetic worked by hand, the refusal without a GPU,
the summary of a failed stage, and the dry run of all three stages (tiny shapes; the FSDP stage's three fits with
Lightning's default strategy, since FSDP needs CUDA)."""

import json
import sys
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
    """One pair (chosen row 0, rejected row 1), 3 positions, the last one padding. Live log-probs all -1; cached
    off by (0.25, -0.5 | pad 9) on the chosen row and (0.125, 0 | pad 9) on the rejected one. Per token: max 0.5,
    mean (0.25 + 0.5 + 0.125 + 0) / 4; per sequence d = (-0.25, 0.125): max 0.25; beta |d_c - d_r| = 0.0375;
    the live sequences' |log p| = 2. The padding's 9 is never read, and training gets the live values."""
    twin = gpu_check.TwinReference.__new__(gpu_check.TwinReference)
    live = torch.full((2, 3), -1.0)
    twin.live, twin.steps = Fixed(live), []
    twin.cached = Fixed(torch.tensor([[-0.75, -1.5, 8.0], [-0.875, -1.0, 8.0]]))
    batch = {"response_mask": torch.tensor([[1, 1, 0], [1, 1, 0]]), "index": torch.tensor([0])}
    assert twin.logps(None, batch, "train") is live
    (s,) = twin.steps
    assert s["token_max"] == pytest.approx(0.5) and s["token_mean"] == pytest.approx(0.875 / 4)
    assert s["sequence_max"] == pytest.approx(0.25) and s["loss_bound"] == pytest.approx(0.1 * 0.375)
    assert s["sequence_logp_mean"] == pytest.approx(2.0)


def test_a_failed_stage_is_named_in_the_summary():
    text = gpu_check.summary({"dpo": {"error": "exit 1: CUDA out of memory", "seconds": 12.0}}, "H200")
    assert "# GPU check: H200" in text and "| dpo | 12 | failed: exit 1: CUDA out of memory |" in text


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
    assert gpu_check.main(["--out", str(out), "--dry-run"]) == 0, (out / "gpu_check.md").read_text()
    summary = (out / "gpu_check.md").read_text()
    assert summary == capsys.readouterr().out.strip() + "\n" and "failed" not in summary
    dpo = json.loads((out / "dpo.json").read_text())
    assert dpo["rows_run"] == 5 and dpo["all_finite"] and "| DPO | ours | off | 1 |" in dpo["table"]
    ref = json.loads((out / "reference.json").read_text())
    assert ref["steps"] == 3 and all(ref[k] >= 0 for k in ("token_max", "sequence_max", "loss_bound"))
    assert ref["sequence_logp_mean"] > 0
    fsdp = json.loads((out / "fsdp.json").read_text())
    assert fsdp["exit_codes"] == {"uninterrupted": 0, "crashed": 17, "resumed": 0}
    assert fsdp["global_step"] == 6 and fsdp["keys_unwrapped"] and fsdp["exported"]
    assert fsdp["loss_max_rel_diff"] <= 1e-6


def test_a_stage_past_its_limit_is_reported(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.LIMITS, "reference", 0.01)
    args = SimpleNamespace(dry_run=False, trl_path=None)
    result = gpu_check.run_stage("reference", args, tmp_path)
    assert result["error"] == "stopped at its limit of 0.01 s" and result["seconds"] >= 0
