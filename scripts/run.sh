#!/usr/bin/env bash
# Set everything up and run stablerl's main job on the embedded default (CPU only):
# cold start (SFT) if no checkpoint exists, RL with MiniRL on the built-in task, evaluation,
# and a summary. Extra arguments are config overrides, e.g. `bash scripts/run.sh train.steps=50`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/stablerl train "$@"
