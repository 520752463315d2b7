"""Reading the project's own YAML files (studies): one clear error naming the file."""

from __future__ import annotations

from pathlib import Path

import yaml

from amrlhf.errors import AmrlhfError


def read_mapping(path: Path, what: str) -> dict:
    """A YAML file whose top level is a mapping, or one clear error naming the file."""
    if not path.is_file():
        raise AmrlhfError(f"{what} file not found: {path}")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise AmrlhfError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(cfg, dict):
        raise AmrlhfError(f"{path}: expected a mapping at the top level")
    return cfg
