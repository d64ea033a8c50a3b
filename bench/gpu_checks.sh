#!/usr/bin/env bash
# The GPU checks, in one run (< 8 min on one CUDA GPU), each bench's JSON line printed as it finishes:
#   1. sampler_overhead: Studio.inpaint vs PaintByExamplePipeline, SD1.5-shaped base, fp16, 25 steps, 512 px
#   2. real_shape: Paint by Example shapes, bf16 frozen base + bf16-mixed training at the paper's batch 16 vs a plain
#      diffusers+PEFT loop, then export, register, three placements and the swap on the GPU
#   3. swap: slots vs diffusers hot-swap (bench/swap.py has no device option: its UNet stays on the CPU)
#
#   bash bench/gpu_checks.sh            # needs CUDA; refuses (exit 2) without it
#   bash bench/gpu_checks.sh --quick    # the --quick form of each bench, on whatever device is present (CPU-safe)
#
# PYTHON=.venv/bin/python to pick the interpreter. Output: the benches' own lines, then one JSON line per bench.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE
quick=0
[ "${1:-}" = "--quick" ] && quick=1
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [ $quick = 0 ]; then
    echo "gpu_checks: no CUDA device here; 'bash bench/gpu_checks.sh --quick' runs the CPU-safe smoke form" >&2
    exit 2
  fi
fi
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', '| torch', torch.__version__)"

status=0
run() {  # run NAME SECONDS ARGS...: the bench under a time limit; its last line must be JSON
  local name=$1 limit=$2; shift 2
  local out; out=$(mktemp)
  local t0=$SECONDS
  timeout "$limit" "$PY" "$@" 2>"$out.err" | tee "$out" | sed "s/^/  [$name] /" >&2
  local rc=${PIPESTATUS[0]}
  local last; last=$(tail -n 1 "$out")
  if [ "$rc" = 0 ] && [ "${last:0:1}" = "{" ]; then
    echo "$last"
  else
    echo "{\"bench\": \"$name\", \"error\": \"exit $rc after $((SECONDS - t0)) s\"}"
    tail -n 20 "$out.err" >&2
    status=1
  fi
  rm -f "$out" "$out.err"
}

if [ $quick = 1 ]; then
  run sampler_overhead 120 bench/sampler_overhead.py --quick
  run real_shape 300 bench/real_shape.py --quick
  run swap 120 bench/swap.py --quick
else
  run sampler_overhead 120 bench/sampler_overhead.py --fp16 --steps 25 --repeats 3
  run real_shape 270 bench/real_shape.py --precision bf16-mixed --base-dtype bfloat16 --batch 16 --steps 8 \
    --warmup 2 --repeats 2 --place-steps 25
  run swap 90 bench/swap.py --repeats 5
fi
exit $status
