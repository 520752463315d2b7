"""A study YAML: a grid of methods x seeds at one budget, plus what to measure.

    name: controlled                   # cells run in <runs_root>/<name>/<method>-seed<k>/
    runs_root: runs
    prepare: [ASSET, ...]              # `amrlhf prepare` names (idempotent)
    setup:                             # fits run once before the cells (e.g. an in-domain reward model);
      - {name: rm, config: R.yaml, args: [...], export: true}   # export -> <runs_root>/<name>/rm/hf
    seeds: [0, 1, 2]
    seed_args: ["--seed_everything={seed}", "--data.init_args.seed={seed}"]   # the default
    common_args: ["--trainer.max_steps=40"]                                   # every cell
    baseline: dpo                      # the method deltas are paired against
    methods:
      - {name: dpo, config: recipes/dpo/x.yaml, args: [...]}
      - {name: am-dpo, config: recipes/dpo/y.yaml}
      - {name: am-x, config: [recipes/dpo/base.yaml, recipes/dpo/overlays/x.yaml]}   # overlays, merged in order
    heldout: {data, limit, max_length, batch_size, beta, spans, generate: {grader, limit, max_new_tokens},
              marked: {spans: {class_path: ...}, limit}}   # teacher-forced accuracy on marked spans
    eval: {suite: recipes/eval/quick.yaml, limit: 50}   # optional lm-eval suite per cell and the base
    keep_checkpoints: false            # delete a finished cell's checkpoints (a SmolLM2 one is ~1.6 GB)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from amrlhf.config_files import read_mapping
from amrlhf.errors import AmrlhfError
from amrlhf.study.heldout import Generation, Heldout, Marked

KEYS = {"name", "runs_root", "prepare", "setup", "seeds", "seed_args", "common_args", "baseline", "methods",
        "heldout", "eval", "keep_checkpoints"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAX_SEED = 2**32 - 1  # lightning.fabric.utilities.seed.max_seed_value


@dataclass
class Fit:
    """One fit of a study: `config` is a recipe, or a base recipe and overlays merged in order (LightningCLI's
    repeated `--config`: a later file sets only the keys it names)."""

    name: str
    config: str | list[str]
    args: list[str] = field(default_factory=list)
    export: bool = False

    @property
    def configs(self) -> list[str]:
        return [self.config] if isinstance(self.config, str) else list(self.config)

    def config_args(self) -> list[str]:
        return [arg for c in self.configs for arg in ("--config", c)]


@dataclass
class Study:
    path: Path
    name: str
    runs_root: Path
    methods: list[Fit]
    baseline: str
    seeds: list[int]
    heldout: Heldout
    prepare: list[str] = field(default_factory=list)
    setup: list[Fit] = field(default_factory=list)
    seed_args: list[str] = field(default_factory=lambda: ["--seed_everything={seed}", "--data.init_args.seed={seed}"])
    common_args: list[str] = field(default_factory=list)
    eval: dict | None = None
    keep_checkpoints: bool = False

    @property
    def dir(self) -> Path:
        return self.runs_root / self.name

    def cell_args(self, method: Fit, seed: int) -> list[str]:
        return [*map(str, method.args), *map(str, self.common_args), *(a.format(seed=seed) for a in self.seed_args)]


def _fits(path: Path, value, key: str) -> list[Fit]:
    if not isinstance(value, list) or (key == "methods" and not value):
        raise AmrlhfError(f"{path}: '{key}' must be a list of {{name, config, args}}")
    out = []
    for i, entry in enumerate(value):
        where = f"{path}: {key}[{i}]"
        if not isinstance(entry, dict) or "config" not in entry or "name" not in entry:
            raise AmrlhfError(f"{where} needs 'name' and 'config'")
        unknown = set(entry) - {"name", "config", "args", "export"}
        if unknown:
            raise AmrlhfError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        if not NAME.match(str(entry["name"])):
            raise AmrlhfError(f"{where}.name '{entry['name']}': letters, digits, '-', '_' and '.' only")
        config = entry["config"]
        if isinstance(config, list) and len(config) == 1:
            config = config[0]
        if not isinstance(config, str) and (not isinstance(config, list) or not config
                                            or not all(isinstance(c, str) for c in config)):
            raise AmrlhfError(f"{where}.config must be a recipe path or a list of them (a base recipe, then "
                              f"overlays), got {config!r}")
        for c in [config] if isinstance(config, str) else config:
            if not Path(c).is_file():
                raise AmrlhfError(f"{where}.config: recipe not found: {c}")
        if not isinstance(entry.get("args", []), list):
            raise AmrlhfError(f"{where}.args must be a list of command-line overrides")
        out.append(Fit(str(entry["name"]), config, list(entry.get("args") or []),
                       bool(entry.get("export", False))))
    names = [f.name for f in out]
    if len(set(names)) != len(names):
        raise AmrlhfError(f"{path}: '{key}' names must be unique, got {names}")
    return out


def _positive_int(path: Path, where: str, value, optional: bool = False):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AmrlhfError(f"{path}: {where} must be a positive integer{' or null' if optional else ''}, got {value!r}")
    return value


def _heldout(path: Path, value) -> Heldout:
    if not isinstance(value, dict) or "data" not in value:
        raise AmrlhfError(f"{path}: 'heldout' needs at least 'data' (the held-out preference rows)")
    value = dict(value)
    for key, optional in (("limit", True), ("max_length", False), ("batch_size", False)):
        if key in value:
            _positive_int(path, f"heldout.{key}", value[key], optional)
    if "beta" in value and (isinstance(value["beta"], bool) or not isinstance(value["beta"], int | float)
                            or not value["beta"] > 0):
        raise AmrlhfError(f"{path}: heldout.beta must be a positive number, got {value['beta']!r}")
    gen, marked = value.pop("generate", None), value.pop("marked", None)
    try:
        if gen is not None:
            if not isinstance(gen, dict) or "grader" not in gen:
                raise AmrlhfError(f"{path}: heldout.generate needs a 'grader' ({{class_path: ...}})")
            gen = Generation(**gen)
        if marked is not None:
            if not isinstance(marked, dict) or not isinstance(marked.get("spans"), dict) \
                    or "class_path" not in marked["spans"]:
                raise AmrlhfError(f"{path}: heldout.marked needs 'spans' ({{class_path: ...}})")
            marked = Marked(**marked)
        return Heldout(**value, generate=gen, marked=marked)
    except TypeError as exc:
        raise AmrlhfError(f"{path}: heldout: {exc}") from None


def load_study(path: str | Path) -> Study:
    path = Path(path)
    cfg = read_mapping(path, "study")
    unknown = set(cfg) - KEYS
    if unknown:
        raise AmrlhfError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(KEYS))})")
    for key in ("methods", "baseline", "heldout"):
        if key not in cfg:
            raise AmrlhfError(f"{path}: '{key}' is required")
    methods = _fits(path, cfg["methods"], "methods")
    if cfg["baseline"] not in [m.name for m in methods]:
        raise AmrlhfError(f"{path}: baseline '{cfg['baseline']}' is not one of the methods "
                          f"({', '.join(m.name for m in methods)})")
    seeds = cfg.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds) or len(set(seeds)) != len(seeds):
        raise AmrlhfError(f"{path}: 'seeds' must be a non-empty list of distinct integers, got {seeds!r}")
    if any(not 0 <= s <= MAX_SEED for s in seeds):
        raise AmrlhfError(f"{path}: 'seeds' must lie in [0, {MAX_SEED}] (the range a run's seed_everything takes), "
                          f"got {seeds!r}")
    for key in ("common_args",):
        if key in cfg and cfg[key] is not None and (not isinstance(cfg[key], list)
                                                     or not all(isinstance(a, str | int | float) for a in cfg[key])):
            raise AmrlhfError(f"{path}: '{key}' must be a list of command-line overrides (one per item), "
                              f"got {cfg[key]!r}")
    if "keep_checkpoints" in cfg and not isinstance(cfg["keep_checkpoints"], bool):
        raise AmrlhfError(f"{path}: 'keep_checkpoints' must be true or false (unquoted), got {cfg['keep_checkpoints']!r}")
    name = str(cfg.get("name") or path.stem)
    if not NAME.match(name):
        raise AmrlhfError(f"{path}: name '{name}': letters, digits, '-', '_' and '.' only")
    ev = cfg.get("eval")
    if ev is not None and (not isinstance(ev, dict) or "suite" not in ev or not Path(ev["suite"]).is_file()):
        raise AmrlhfError(f"{path}: 'eval' needs 'suite', an existing recipes/eval/*.yaml")
    study = Study(path, name, Path(cfg.get("runs_root", "runs")), methods, cfg["baseline"], seeds,
                  _heldout(path, cfg["heldout"]), list(cfg.get("prepare") or []),
                  _fits(path, cfg.get("setup") or [], "setup"), eval=ev,
                  common_args=list(cfg.get("common_args") or []), keep_checkpoints=bool(cfg.get("keep_checkpoints")))
    if "seed_args" in cfg:
        if not isinstance(cfg["seed_args"], list) or not any("{seed}" in str(a) for a in cfg["seed_args"]):
            raise AmrlhfError(f"{path}: 'seed_args' must be a list of overrides using {{seed}}")
        for i, arg in enumerate(cfg["seed_args"]):
            try:
                str(arg).format(seed=0)
            except (KeyError, IndexError, ValueError) as exc:
                raise AmrlhfError(f"{path}: seed_args[{i}] {arg!r}: only the placeholder {{seed}} is known "
                                  f"({type(exc).__name__}: {exc}); write a literal brace as {{{{ or }}}}") from None
        study.seed_args = [str(a) for a in cfg["seed_args"]]
    return study
