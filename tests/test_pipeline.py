"""The pipeline (the quickstart's shape) end to end on tiny assets, and the held-out summary math."""

import json
import signal

import mlflow
import pytest
import torch
import yaml
from conftest import ROOT, amrlhf, start_amrlhf, wait_for_metric

from amrlhf.evaluation import PairLogps, heldout_summary

pytestmark = pytest.mark.slow


def test_heldout_summary_hand_values():
    base = PairLogps(torch.tensor([-10.0, -10.0]), torch.tensor([-12.0, -12.0]), torch.tensor([2.0, 4.0]),
                     torch.tensor([4.0, 4.0]))
    pol = PairLogps(torch.tensor([-9.0, -11.0]), torch.tensor([-12.0, -11.0]), base.chosen_len, base.rejected_len)
    s = heldout_summary(base, pol, beta=0.5)
    # margins: 0.5 * ((1 - 0), (-1 - 1)) = (0.5, -1.0)
    assert s["implicit_margin"] == pytest.approx(-0.25) and s["implicit_margin_se"] == pytest.approx(0.75)
    assert s["implicit_acc"] == pytest.approx(0.5) and s["implicit_acc_se"] == pytest.approx(0.5)
    # length-normalised: -4.5 < -3 (0), -2.75 == -2.75 (tie: 0.5)
    assert s["lognorm_acc"] == pytest.approx(0.25)
    # shorter chosen: 2 < 4 (1), 4 == 4 (0.5)
    assert s["length_rule_acc"] == pytest.approx(0.75)
    same = heldout_summary(base, base, beta=0.5)
    assert same["implicit_acc"] == 0.5 and same["implicit_margin"] == 0.0  # before training: all ties


def test_pipeline_runs_prepare_fit_heldout_and_summary(tmp_path):
    pipe = {
        "name": "mini",
        "runs_root": str(tmp_path / "runs"),
        "prepare": ["tiny-llama", "tiny-arith"],
        "heldout": {"data": "local:tiny-arith/prefs_heldout", "max_length": 64, "batch_size": 4, "beta": 0.1},
        "fit": [{"name": "mini-dpo", "config": str(ROOT / "recipes/smoke/dpo.yaml"),
                 "args": ["--trainer.max_steps=3", "--tracking.log_checkpoint=false"]}],
    }
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(pipe))
    proc = amrlhf("run", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "implicit-reward accuracy (ties 0.5)" in proc.stdout
    assert "length-only rule: shorter response is chosen" in proc.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in proc.stdout
    summary = json.loads((tmp_path / "runs" / "mini" / "summary.json").read_text())
    res = summary["results"]["mini-dpo"]
    assert res["pairs"] == 16 and 0.0 <= res["implicit_acc"] <= 1.0
    assert summary["base"]["implicit_acc"] == 0.5
    run_id = summary["tracking"]["mini-dpo"]["run_id"]
    client = mlflow.MlflowClient(summary["tracking"]["mini-dpo"]["uri"])
    logged = client.get_run(run_id).data.metrics
    assert logged["eval/heldout/implicit_acc"] == pytest.approx(res["implicit_acc"])
    assert logged["eval/heldout/length_rule_acc"] == pytest.approx(res["length_rule_acc"])


def test_pipeline_stops_at_the_stage_a_sigterm_interrupted(tmp_path):
    smoke = str(ROOT / "recipes/smoke/dpo.yaml")
    long = ["--trainer.max_steps=100000", "--trainer.limit_val_batches=0", "--checkpoint_every=100000",
            "--tracking.log_checkpoint=false"]
    pipe = {"name": "stop", "runs_root": str(tmp_path / "runs"),
            "fit": [{"name": "first", "config": smoke, "args": long},
                    {"name": "second", "config": smoke, "args": ["--trainer.max_steps=1"]}]}
    path, log = tmp_path / "pipe.yaml", tmp_path / "run.log"
    path.write_text(yaml.safe_dump(pipe))
    proc = start_amrlhf("run", str(path), cwd=tmp_path, log=log)
    wait_for_metric(tmp_path / "runs" / "mlflow.db", "loss", proc, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 143, log.read_text()[-3000:]
    lines = [line for line in log.read_text().splitlines() if line.startswith("pipeline 'stop' stopped at stage")]
    assert len(lines) == 1 and "'first'" in lines[0] and "--ckpt_path last" in lines[0], log.read_text()[-3000:]
    assert (tmp_path / "runs" / "first" / "checkpoints" / "last.ckpt").exists()
    assert not (tmp_path / "runs" / "second").exists() and not (tmp_path / "runs" / "stop").exists()


def test_bad_pipeline_is_refused_with_a_clear_message(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: x\nfit:\n  - {config: recipes/nope.yaml}\n")
    proc = amrlhf("run", str(path), cwd=tmp_path)
    assert proc.returncode == 2 and "fit[0].config: recipe not found: recipes/nope.yaml" in proc.stderr
    path.write_text(f"name: x\nfit:\n  - {{config: {ROOT / 'recipes/smoke/dpo.yaml'}}}\n"
                    f"  - {{config: {ROOT / 'recipes/smoke/dpo.yaml'}, args: ['--model.init_args.nope=1']}}\n")
    proc = amrlhf("run", str(path), cwd=tmp_path)  # refused before the first fit runs
    assert proc.returncode == 2 and "fit[1] (" in proc.stderr and "does not parse" in proc.stderr
    assert not (tmp_path / "runs").exists()
