#!/usr/bin/env bash
# Create (or reuse) .venv and install stablerl into it. Idempotent: re-runs only when
# pyproject.toml or this script changed. Sourced by scripts/run.sh and scripts/test.sh.
#
# PyTorch: an unpinned `torch` would pull a multi-GB CUDA build. On a machine without an NVIDIA
# GPU we install the pinned CPU build first (STABLERL_TORCH, default torch==2.13.0); the project's
# own `torch>=2.4` requirement is then already satisfied. Set STABLERL_TORCH_INDEX_URL to the
# PyTorch CPU wheel index on machines whose default index would serve a CUDA build of that pin.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python_bin="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
quiet_pip() {  # pip with this machine's harmless "local index location is ignored" noise filtered
  "${pip[@]}" "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}

stamp=.venv/.stablerl-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      torch_spec="${STABLERL_TORCH:-torch>=2.4}"      # GPU machine: the default (CUDA) build
    else
      torch_spec="${STABLERL_TORCH:-torch==2.13.0}"   # no GPU: the pinned CPU build
    fi
    echo "[setup] installing $torch_spec" >&2
    if [ -n "${STABLERL_TORCH_INDEX_URL:-}" ]; then
      quiet_pip --index-url "$STABLERL_TORCH_INDEX_URL" "$torch_spec"
    else
      quiet_pip "$torch_spec"
    fi
  fi
  echo "[setup] installing stablerl and its dependencies into .venv" >&2
  quiet_pip -e ".[dev]"
  echo "$want" > "$stamp"
fi
