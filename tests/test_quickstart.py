"""The quickstart's shape (a study of one seed and its before/after table) end to end on tiny assets, and the
held-out summary math."""

import json

import mlflow
import pytest
import torch
import yaml
from conftest import ROOT, amrlhf

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


def test_the_before_after_table_by_hand():
    """A one-seed study's table (the quickstart's): the base and each method, mean ± SE over pairs, kept
    fractions from training, the length-only rule; nothing for a study of several seeds."""
    from types import SimpleNamespace

    from amrlhf.study.report import format_before_after

    study = SimpleNamespace(seeds=[0], methods=[SimpleNamespace(name="dpo"), SimpleNamespace(name="am")],
                            heldout=SimpleNamespace(data="local:x/heldout"))
    keys = ("implicit_acc", "implicit_margin", "lognorm_acc")
    base = {"items": {**{f"eval/heldout/{k}": [0.5, 0.5] for k in keys[:1]},
                      "eval/heldout/implicit_margin": [0.0, 0.0], "eval/heldout/lognorm_acc": [0.0, 1.0],
                      "eval/heldout/length_rule_acc": [1.0, 0.5]}}
    cells = [{"method": "dpo", "metrics": {}, "items": {"eval/heldout/implicit_acc": [1.0, 0.0],
                                                        "eval/heldout/implicit_margin": [0.5, -1.0],
                                                        "eval/heldout/lognorm_acc": [1.0, 1.0]}},
             {"method": "am", "metrics": {"segments/kept_frac_chosen": 0.25},
              "items": {"eval/heldout/implicit_acc": [1.0, 1.0], "eval/heldout/implicit_margin": [0.25, 0.75],
                        "eval/heldout/lognorm_acc": [0.0, 0.5]}}]
    lines = format_before_after(study, cells, base).splitlines()
    assert lines[0].startswith("held-out local:x/heldout (2 pairs)") and lines[0].split()[-3:] == ["base", "dpo", "am"]
    rows = {line[:58].strip(): line[58:] for line in lines[2:]}
    # dpo margins 0.5, -1.0: mean -0.25, SE = sd / sqrt(2) = 1.0607 / 1.4142 = 0.75
    assert rows["implicit-reward margin"].split() == ["0.000", "±", "0.000", "-0.250", "±", "0.750", "0.500", "±",
                                                      "0.250"]
    assert rows["implicit-reward accuracy (ties 0.5)"].split()[:3] == ["0.500", "±", "0.000"]
    assert rows["kept fraction, chosen (training mean)"].split() == ["-", "1", "(all)", "0.250"]
    assert rows["length-only rule: shorter response is chosen"].split() == ["0.750", "±", "0.250"]
    study.seeds = [0, 1]
    assert format_before_after(study, cells, base) is None


def test_the_quickstart_is_a_study_of_one_seed_with_its_before_after_table(tmp_path):
    """The quickstart's shape on tiny assets: a setup fit, two methods of one seed, the base and both scored on
    the held-out split; the printed table is the quickstart's, its numbers those of the cells' own items."""
    from amrlhf.stats import mean_se

    cfg = yaml.safe_load((ROOT / "recipes" / "smoke" / "study.yaml").read_text())
    cfg.update(name="mini", runs_root=str(tmp_path / "runs"), seeds=[0], keep_checkpoints=True,
               setup=[{"name": "rm", "config": str(ROOT / "recipes/smoke/rm.yaml"), "export": True,
                       "args": ["--trainer.max_steps=2"]}])
    cfg["heldout"] = {k: v for k, v in cfg["heldout"].items() if k not in ("generate", "marked")}
    for m in cfg["methods"]:
        m["config"] = str(ROOT / m["config"])
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = amrlhf("study", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "runs" / "mini"
    assert (root / "rm" / "hf" / "config.json").exists()  # the setup fit, exported
    assert (root / "dpo-seed0" / "final.ckpt").exists()  # keep_checkpoints: the trained policies stay
    table = proc.stdout[proc.stdout.index("held-out local:arith_steps_conflicting/heldout"):].splitlines()
    assert table[0].split()[-3:] == ["base", "dpo", "am-dpo-oracle"]
    rows = {line[:58].strip(): line[58:].split() for line in table[2:8]}
    cell = json.loads((root / "dpo-seed0" / "cell.json").read_text())
    mean, se = mean_se(cell["items"]["eval/heldout/implicit_margin"])
    assert rows["implicit-reward margin"][3:6] == [f"{mean:.3f}", "±", f"{se:.3f}"]
    assert rows["implicit-reward accuracy (ties 0.5)"][:3] == ["0.500", "±", "0.000"]
    assert "length-only rule: shorter response is chosen" in rows
    assert "n/a (1 seed)" in proc.stdout and "mlflow ui --backend-store-uri sqlite:///" in proc.stdout
    client = mlflow.MlflowClient(f"sqlite:///{(tmp_path / 'runs').resolve()}/mlflow.db")
    logged = client.get_run(cell["run_id"]).data.metrics
    assert logged["eval/heldout/implicit_margin"] == pytest.approx(mean)
    assert logged["eval/heldout/implicit_margin_se"] == pytest.approx(se)  # what `amrlhf compare` shows for one run
