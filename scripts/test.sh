#!/usr/bin/env bash
# Installs what the tests need (scripts/setup.sh) and runs the whole suite, offline, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check amrlhf tests benchmarks
exec .venv/bin/python -m pytest -q "$@"
