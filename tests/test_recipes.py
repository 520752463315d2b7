"""Every shipped recipe parses (types, class paths) and states the command that runs it."""

from pathlib import Path

import pytest
from conftest import ROOT

from amrlhf.lightning_cli import AmrlhfCLI
from amrlhf.pipeline import _load

TRAIN = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if p.parent.name not in ("quickstart", "eval"))
PIPELINES = sorted((ROOT / "recipes" / "quickstart").glob("*.yaml"))


def test_the_contract_smoke_recipes_exist():
    assert {p.stem for p in (ROOT / "recipes" / "smoke").glob("*.yaml")} >= {"sft", "rm", "dpo", "am_dpo", "am_sft",
                                                                        "ppo", "am_ppo"}
    assert PIPELINES


@pytest.mark.parametrize("path", TRAIN, ids=lambda p: str(p.relative_to(ROOT)))
def test_training_recipe_parses_and_names_its_command(path: Path, capsys, monkeypatch):
    rel = path.relative_to(ROOT)
    assert path.read_text().splitlines()[0] == f"# amrlhf fit --config {rel}"
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_:
        AmrlhfCLI(args=["fit", "--config", str(rel), "--print_config"])
    assert exit_.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_pipeline_parses_and_names_its_command(path: Path, monkeypatch):
    assert path.read_text().splitlines()[0] == f"# amrlhf run {path.relative_to(ROOT)}"
    monkeypatch.chdir(ROOT)
    cfg = _load(path.relative_to(ROOT))
    assert cfg["fit"] and cfg["heldout"]["data"].endswith("/heldout")
