#!/usr/bin/env bash
# The main job on the embedded default: install, then `amrlhf study recipes/quickstart/dpo_halueval.yaml`
# (prepare assets, DPO on SmolLM2-135M-Instruct with HaluEval dialogue, before/after table).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh
echo "install: $(( $(date +%s) - start )) s"
exec .venv/bin/amrlhf study recipes/quickstart/dpo_halueval.yaml
