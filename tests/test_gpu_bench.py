"""benchmarks/gpu_dpo.py on the CPU: its argument checks, where TRL comes from, the MFU and table arithmetic,
and a dry run of our rows (tiny shape, 1 warm-up + 1 timed step). TRL's rows run in the dry run only where trl
is installed (`pip install -e .[compare]`): fetching it needs the network, which the tests never use."""

import importlib.util
import json
import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_common  # noqa: E402
import gpu_dpo  # noqa: E402


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--pairs", "0"], "--pairs must be >= 1"),
    (["--response", "0"], "--response must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--peak-flops", "0"], "--peak-flops must be > 0"),
    (["--budget", "-5"], "--budget must be > 0"),
    (["--row-seconds", "0"], "--row-seconds must be > 0"),
    (["--shape", "gpt5"], "invalid choice"),
    (["--precision", "fp8"], "invalid choice"),
    (["--trl-path", "/no/such/folder"], "no trl/__init__.py there"),
    (["--trl-path", "/tmp", "--no-trl"], "contradict each other"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_dpo.parse(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_dry_run_replaces_the_sizes():
    args = gpu_dpo.parse(["--dry-run", "--shape", "qwen05b", "--steps", "10"])
    assert (args.shape, args.pairs, args.prompt, args.response, args.warmup, args.steps) == ("tiny", 2, 32, 32, 1, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_timed_run_without_a_gpu_is_one_error_line(capsys):
    assert gpu_dpo.main(["--no-trl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no CUDA device is visible") and "--dry-run" in err[-1]


def test_trl_not_found_says_why(monkeypatch, tmp_path):
    def no_network(version, marker):
        raise RuntimeError(f"pip download trl=={version} failed: no network")

    monkeypatch.setattr(gpu_common, "_trl_installed", lambda: False)
    folder, why = gpu_common.find_trl(None, no_network)
    assert folder is None and "no --trl-path" in why and "no network" in why
    assert gpu_common.find_trl(str(tmp_path), no_network) == (str(tmp_path), f"--trl-path {tmp_path}")
    broken = tmp_path / "broken"
    (broken / "trl").mkdir(parents=True)
    (broken / "trl" / "__init__.py").write_text("import no_such_module_for_the_test\n")
    with pytest.raises(ImportError, match="import trl failed: ModuleNotFoundError.*datasets, dill"):
        gpu_common.import_trl(str(broken))
    assert str(broken) not in sys.path
    sys.modules.pop("trl", None)


def test_peak_flops_and_mfu():
    assert gpu_common.peak_flops("NVIDIA H200")[0] == 989e12
    assert gpu_common.peak_flops("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert gpu_common.peak_flops("NVIDIA H100 PCIe")[0] == 756e12
    assert gpu_common.peak_flops("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert gpu_common.peak_flops("NVIDIA L40S")[0] == 362e12
    assert gpu_common.peak_flops("CPU") == (None, "unknown device 'CPU': pass --peak-flops")
    assert gpu_common.peak_flops("NVIDIA H200", 5e14) == (5e14, "--peak-flops")
    # 8 x 0.5e9 params x 8192 tokens = 3.2768e13 FLOP in 0.1 s on a 989e12 card
    assert gpu_common.mfu(500_000_000, 8192, 0.1, 989e12) == pytest.approx(3.2768e14 / 989e12)
    assert gpu_common.mfu(500_000_000, 8192, 0.1, None) is None


def test_table_and_ratios():
    def row(impl, gc, sps, peak):
        return {"variant": "DPO", "impl": impl, "gc": gc, "timed_steps": 10, "s_per_step": sps,
                "tokens_per_s": 8192 / sps, "peak_gib": peak, "mfu": 0.4, "loss_finite": True}

    rows = [row("ours", False, 0.1, 20.0), row("TRL", False, 0.2, 25.0), row("ours", True, 0.15, 10.0),
            {"variant": "DPO", "impl": "TRL", "gc": True, "not_run": "--no-trl"}]
    text = gpu_common.table(rows)
    assert "| DPO | ours | off | 10 | 0.1000 | 81,920 | 20.00 | 40.0% | True |" in text
    assert all(len(line.strip("|").split("|")) == 9 for line in text.splitlines())
    assert "| DPO | TRL | on | not run: --no-trl |" in text
    assert gpu_common.ratios(rows) == ["ours/TRL, gradient checkpointing off: tokens/s 2.00x, peak memory 0.80x",
                                       "ours/TRL, gradient checkpointing on: n/a (TRL not run)"]
    # the in-backward row against our checkpointed DPO row and TRL's (0.16 s, 8 GiB against 0.15 s, 10 GiB; 0.3 s, 16)
    rows[3] = row("TRL", True, 0.3, 16.0)
    rows.append(dict(row("ours", True, 0.16, 8.0), variant="DPO in backward"))
    assert gpu_common.ratios(rows)[1:] == [
        "ours/TRL, gradient checkpointing on: tokens/s 2.00x, peak memory 0.62x",
        "ours in backward/ours, gradient checkpointing on: tokens/s 0.94x, peak memory 0.80x",
        "ours in backward/TRL, gradient checkpointing on: tokens/s 1.88x, peak memory 0.50x"]


def _dry_run(tmp_path, *extra) -> dict:
    out = tmp_path / "gpu_dpo.json"
    assert gpu_dpo.main(["--dry-run", "--peak-flops", "1e12", "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_dry_run_of_our_rows(tmp_path, capsys):
    result = _dry_run(tmp_path, "--no-trl")
    ours = [r for r in result["rows"] if r["impl"] == "ours"]
    assert [(r["variant"], r["gc"]) for r in ours] == [("DPO", False), ("DPO", True), ("DPO in backward", True),
                                                       ("AM-DPO cached", False), ("AM-DPO online", False),
                                                       ("DPO padded", False)]
    assert [r.get("computed_tokens_per_step") for r in ours] == [2 * (32 + 2 * 32)] * 5 + [None]  # packed, padded
    for r in ours:
        assert "not_run" not in r, r
        assert r["timed_steps"] == 1 and r["s_per_step"] > 0 and r["loss_finite"] and 0 < r["mfu"]
        assert r["tokens_per_s"] == pytest.approx(2 * 2 * 64 / r["s_per_step"])
    assert [r["not_run"] for r in result["rows"] if r["impl"] == "TRL"] == ["--no-trl", "--no-trl"]
    assert result["settings"]["tokens_per_step"] == 256 and result["settings"]["compile"] == "off"
    printed = capsys.readouterr().out
    assert "torch.compile off, fused AdamW off, cached reference log-probs off" in printed
    assert "| DPO | TRL | off | not run: --no-trl |" in printed


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed (the [compare] extra)")
def test_dry_run_with_trl(tmp_path):
    rows = _dry_run(tmp_path, "--cached-ref", "--fused-adamw")["rows"]
    assert all("not_run" not in r and r["loss_finite"] for r in rows), rows
