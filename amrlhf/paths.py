"""Where local assets and caches live, and how `local:` ids resolve."""

from __future__ import annotations

import os
from pathlib import Path

from amrlhf.errors import AmrlhfError

LOCAL_PREFIX = "local:"


def home() -> Path:
    """`$AMRLHF_HOME`, default `~/.cache/amrlhf`."""
    return Path(os.environ.get("AMRLHF_HOME", Path.home() / ".cache" / "amrlhf")).expanduser()


def cache_dir(kind: str) -> Path:
    path = home() / "cache" / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_local_id(name: str) -> bool:
    return isinstance(name, str) and name.startswith(LOCAL_PREFIX)


def resolve_local(name: str, kind: str) -> Path:
    """`local:ID[/PART]` -> `$AMRLHF_HOME/<kind>s/ID[/PART]`, checked to exist.

    For data, `local:halueval_dialogue/train` resolves to `.../data/halueval_dialogue/train.jsonl`.
    """
    from amrlhf import assets  # local import: assets imports heavy modules lazily too

    ident = name[len(LOCAL_PREFIX):]
    asset, _, part = ident.partition("/")
    if asset not in assets.REGISTRY:
        known = ", ".join(sorted(assets.REGISTRY))
        raise AmrlhfError(f"unknown asset id '{name}': known local assets are {known}")
    root = assets.asset_dir(asset)
    if not assets.is_prepared(asset):
        raise AmrlhfError(f"asset '{asset}' is not prepared under {home()}: run `amrlhf prepare {asset}`")
    assets.check_intact(asset)
    if kind == "data":
        path = root / f"{part or 'train'}.jsonl"
        if not path.exists():
            parts = sorted(p.stem for p in root.glob("*.jsonl"))
            raise AmrlhfError(f"'{name}': asset '{asset}' has no part '{part}' (parts: {', '.join(parts)})")
        return path
    return root
