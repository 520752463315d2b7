import math

import mlflow
import pytest
from conftest import amrlhf


def test_compare_groups_seeds_with_standard_errors_and_deltas(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("cmp", artifact_location=(tmp_path / "art").as_uri())
    values = {"dpo-seed0": 0.6, "dpo-seed1": 0.8, "am-dpo-seed0": 0.7, "am-dpo-seed1": 0.9}
    for name, v in values.items():
        run = client.create_run(exp, run_name=name)
        client.log_metric(run.info.run_id, "eval/heldout/implicit_acc", v)
        client.set_terminated(run.info.run_id)
    out = tmp_path / "cmp.png"
    proc = amrlhf("compare", "--experiment", "cmp", "--metrics", "eval/heldout/implicit_acc", "--baseline", "dpo",
                  "--out", str(out), "--tracking_uri", uri, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    se = math.sqrt(((0.6 - 0.7) ** 2 + (0.8 - 0.7) ** 2) / 1 / 2)  # sample std / sqrt(n), n = 2
    assert f"0.700±{se:.3f} (n=2)" in proc.stdout
    assert f"0.800±{se:.3f} (n=2) Δ+0.100±{math.sqrt(2) * se:.3f}" in proc.stdout
    assert out.exists() and out.stat().st_size > 1000
    runs = client.search_runs([exp], filter_string="tags.`amrlhf.kind` = 'compare'")
    assert len(runs) == 1
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} == {"cmp.png", "cmp.txt"}
    bad = amrlhf("compare", "--experiment", "nope", "--tracking_uri", uri, cwd=tmp_path)
    assert bad.returncode == 2 and "no MLflow experiment 'nope'" in bad.stderr


pytestmark = pytest.mark.slow
