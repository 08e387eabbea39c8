#!/usr/bin/env bash
# What the CPU test suite cannot run, on one GPU with no network, in under 8 minutes (the server's
# weight transfer runs over NCCL only with a second GPU for the server: NCCL refuses two ranks of
# one communicator on one device; on one GPU it goes over stablerl's gloo engine, and says so):
#   bash scripts/gpu_check.sh            (in the environment with stablerl[vllm] installed)
# Each check runs in its own process under its own timeout (a failure or hang in one never stops
# the others) and the script ends with one pass/fail table with the figures each check measured.
# Exit status: 0 if every check passed, 1 otherwise. Work files go to ${GPU_CHECK_DIR:-a temp dir}.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
WORK=${GPU_CHECK_DIR:-$(mktemp -d -t stablerl-gpu-check-XXXXXX)}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}

# name  timeout_s  (budget: 7.5 min in all)
CHECKS=(
  "nccl 30"
  "fsdp2_bf16 45"
  "vllm_inprocess_r3 90"
  "vllm_server_r3 120"
  "fp8_rollouts 60"
  "sleep_wake 90"
  "train_compile 120"
)
declare -a ROWS
failed=0
for entry in "${CHECKS[@]}"; do
  read -r name limit <<<"$entry"
  log="$WORK/$name.log"
  start=$(date +%s%N)
  # its own session, so a timeout kills everything it started (vLLM servers included)
  timeout --kill-after=10 "$limit" setsid "$PY" scripts/gpu_check.py "$name" "$WORK/$name" >"$log" 2>&1
  rc=$?
  secs=$(awk -v a="$start" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
  result=$(grep -a '^RESULT ' "$log" | tail -1 | cut -c8-)
  if [ $rc -eq 0 ]; then
    status=PASS
  else
    failed=1
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="FAIL (timeout ${limit}s)"; else status="FAIL (rc $rc)"; fi
    [ -z "$result" ] && result=$(grep -a -E 'Error|error|assert' "$log" | tail -1 | cut -c1-160)
  fi
  ROWS+=("| $name | $status | $secs | $result |")
  echo "$name: $status ($secs s)" >&2
done

echo
echo "GPU check: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), logs in $WORK"
echo "| check | result | seconds | figures |"
echo "|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
exit $failed
