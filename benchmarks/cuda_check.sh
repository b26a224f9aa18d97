#!/usr/bin/env bash
# The checks that need a GPU, as one command that fits a lent machine's 10-minute call:
# the CUDA tests, then the CUDA measurement, step-overhead and loss-term benchmarks. Logs,
# JSON and Markdown go to $OUT (./cuda_check when OUT is unset), 11 files. From the
# repository root, on a machine with torch (CUDA), lightning, scikit-learn, pytest and
# pytest-timeout:
#
#   bash benchmarks/cuda_check.sh                  # 183 s on an H200 (2026-12-04, before
#                                                  # the loss-term step and rows)
#   DEVICE=cpu QUICK=1 bash benchmarks/cuda_check.sh   # the same steps on CPU, about
#                                                  # 20 s here (tests/test_benchmarks.py)
#
# Each step has its own time limit, so one hang costs its share, not the whole call; the
# exit status is the first failing step's. The *_cuda.json/md it writes replace those in
# benchmarks/results/, and their tables the README's CUDA tables.
set -uo pipefail
out=${OUT:-cuda_check}
device=${DEVICE:-cuda}
quick=${QUICK:+--quick}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

if [ "$device" != cpu ]; then
  "$python" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'" || exit 2
  nvidia-smi -L > "$out/device.txt" 2>&1
fi
status=0
step() {  # step LIMIT_SECONDS LOG COMMAND...: run, log, remember the first failure
  local limit=$1 log=$2
  shift 2
  timeout -k 10 "$limit" "$@" > "$out/$log" 2>&1
  local rc=$?
  echo "$log: exit $rc"
  tail -n 3 "$out/$log"
  if [ "$status" -eq 0 ]; then status=$rc; fi
}
step 240 test_cuda.log "$python" -m pytest -q -p no:cacheprovider tests/unit/test_cuda.py
step 150 measure.log "$python" benchmarks/measure_throughput.py --device "$device" \
  --sizes 10 50 200 $quick --out "$out"
step 150 step.log "$python" benchmarks/step_overhead.py --device "$device" --repeats 41 \
  $quick --out "$out"
step 90 loss.log "$python" benchmarks/loss_term.py --device "$device" --sizes 10 50 200 \
  $quick --out "$out"
exit "$status"
