"""Where local assets and caches live, and how `local:` ids resolve."""

from __future__ import annotations

import os
from pathlib import Path

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
