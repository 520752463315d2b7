#!/usr/bin/env bash
# Creates .venv (python3 only needed) and installs amrlhf with the pinned stack.
# torch is installed FIRST and by exact version: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==$(grep -E '^torch==' constraints.txt | cut -d= -f3)"
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
echo "amrlhf installed in .venv ($(.venv/bin/python -c 'import torch, lightning, transformers; print(f"torch {torch.__version__}, lightning {lightning.__version__}, transformers {transformers.__version__}")'))"
