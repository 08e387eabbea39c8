#!/usr/bin/env bash
# Set everything up and run stablerl's main job on the embedded default (CPU only).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/stablerl lab "$@"
