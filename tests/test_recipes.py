"""Every shipped recipe parses (types, class paths) and states the command that runs it."""

from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from amrlhf.lightning_cli import AmrlhfCLI
from amrlhf.study import load_study
from amrlhf.train import check_recipes


def _is_study(p: Path) -> bool:
    return p.read_text().startswith("# amrlhf study ")


TRAIN = sorted(p for p in (ROOT / "recipes").rglob("*.yaml")
               if p.parent.name not in ("quickstart", "eval", "overlays") and not _is_study(p))
OVERLAYS = sorted((ROOT / "recipes").rglob("overlays/*.yaml"))
STUDIES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if _is_study(p))


def test_the_contract_smoke_recipes_exist():
    assert {p.stem for p in (ROOT / "recipes" / "smoke").glob("*.yaml")} >= {"sft", "rm", "dpo", "am_dpo", "am_sft",
                                                                        "ppo", "am_ppo", "grpo", "am_grpo", "rloo"}
    assert ROOT / "recipes" / "quickstart" / "dpo_halueval.yaml" in STUDIES  # the quickstart is a study


@pytest.mark.parametrize("path", TRAIN, ids=lambda p: str(p.relative_to(ROOT)))
def test_training_recipe_parses_and_names_its_command(path: Path, capsys, monkeypatch):
    rel = path.relative_to(ROOT)
    assert path.read_text().splitlines()[0] == f"# amrlhf fit --config {rel}"
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_:
        AmrlhfCLI(args=["fit", "--config", str(rel), "--print_config"])
    assert exit_.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


@pytest.mark.parametrize("path", OVERLAYS, ids=lambda p: str(p.relative_to(ROOT)))
def test_overlay_names_its_base_and_parses_over_it(path: Path, capsys, monkeypatch):
    """An overlay's first line is the command that composes it over its base recipe; that command parses."""
    rel = path.relative_to(ROOT)
    words = path.read_text().splitlines()[0].split()
    assert words[:3] == ["#", "amrlhf", "fit"] and words[-2:] == ["--config", str(rel)], words
    configs = words[4::2]
    assert words[3::2] == ["--config"] * len(configs) and len(configs) >= 2 and all((ROOT / c).is_file() for c in configs)
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_:
        AmrlhfCLI(args=["fit", *words[3:], "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    for key, value in (yaml.safe_load(path.read_text()).get("model", {}).get("init_args") or {}).items():
        if not isinstance(value, dict):  # the overlay's plain settings (mask_side, ...) reach the composed recipe
            assert printed["model"]["init_args"][key] == value, key


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: str(p.relative_to(ROOT)))
def test_study_and_every_cell_recipe_parse(path: Path, monkeypatch):
    """A study names its command, and every setup fit and method (with its overrides and the seed's)
    parses as a recipe, as `amrlhf study` checks before it trains anything."""
    rel = path.relative_to(ROOT)
    assert path.read_text().splitlines()[0] == f"# amrlhf study {rel}"
    monkeypatch.chdir(ROOT)
    study = load_study(rel)
    assert len(study.seeds) >= 2 or path.parent.name == "quickstart"  # the quickstart: one seed, one table
    assert study.baseline in [m.name for m in study.methods] and study.heldout.data.endswith("/heldout")
    check_recipes(rel, [{"config": f.config, "args": f.args} for f in study.setup] +
                  [{"config": m.config, "args": study.cell_args(m, study.seeds[0])} for m in study.methods])


def test_a_study_fit_that_does_not_parse_is_named_with_the_refusal(tmp_path):
    """`amrlhf study` checks every fit's recipe first: a refused one is one error naming the study, the fit and
    what the parser refused (not "see the message above" after a usage dump)."""
    from amrlhf.errors import AmrlhfError

    bad = tmp_path / "old.yaml"
    bad.write_text((ROOT / "recipes" / "smoke" / "rm.yaml").read_text().replace("    model:\n", "    policy:\n", 1))
    with pytest.raises(AmrlhfError) as err:
        check_recipes(Path("s.yaml"), [{"config": str(ROOT / "recipes" / "smoke" / "dpo.yaml")}, {"config": str(bad)}])
    assert str(err.value).startswith(f"s.yaml: fit[1] ({bad}) does not parse: {bad}: model: amrlhf.modules.RewardModule:"
                                     " RewardModule takes no 'policy'")
