#!/usr/bin/env bash
# Accelerator benchmark of PixelDance (JAX): the paper-size train step (batch sweeps over remat
# policies and attention kernels) and the paper-size sampler (50 steps, classifier-free
# guidance, 16x256x256 videos, batch 1 and 8), on one GPU (H100, H200, ...) or a TPU host, in
# under 8 minutes (the default budget). Random weights: nothing is downloaded.
#
# Install (Python 3.11, from the repository root):
#   GPU:  pip install -e ".[dev,cuda12]"
#   TPU:  pip install -e ".[dev,tpu]"
# (`pip install -e .` is enough for the benchmark; `[dev]` adds pytest for
# tests/test_accelerator_benchmark.py.)
#
# Run (from anywhere; writes into the current directory):
#   bash benchmarks/accelerator.sh [RESULTS.jsonl] [--budget=SECONDS] [--step_timeout=SECONDS]
#       [any flag of benchmarks/accelerator.py, given to every measurement, e.g. --order=...,
#        --max_batch=16, --timed_steps=20, --mesh=1x1x1, --config.paper.data.frames=8]
#   # Check the whole thing end to end on a CPU in a few minutes (the unit-test model):
#   SIZE=unit_test bash benchmarks/accelerator.sh /tmp/cpu-check.jsonl
#
# What it does: asks `accelerator.py --plan` for the sweep (default order: remat none at batch
# 1 with XLA attention; the sampler at batch 1; remat none at batch 1 with the fused attention
# kernel (cudnn on GPU, splash on TPU); the sampler at batch 8; then the batch sweeps 2, 4, 8,
# ... of remat none, then of remat dots_saveable and nothing_saveable with the fused kernel,
# each sweep up to its first failure), then runs each measurement in its own process, one after
# the other, until the budget is spent. Each paper-size measurement is one trace and XLA compile
# (expect one to three minutes each on a GPU; the steps take seconds), so 8 minutes hold the
# first few measurements: the most informative come first. Give more time (--budget=1800) for
# the whole sweep, or choose (--order). The unit-test size takes about a minute a measurement
# on a 2-core CPU (8 measurements).
#
# Output:
#   RESULTS.jsonl (default ./accelerator-results.jsonl; an older file is kept as .bak): one JSON
#     line per measurement run, as accelerator.py prints it (every field is documented in its
#     header): step time, clips/s, TFLOP/step, TFLOP/s per device and MFU, peak memory, compile
#     time and the settings; sampler seconds per video. A measurement whose process died or
#     timed out gets a line from this script: its settings, "error" and "error_kind" ("timeout"
#     or "crash"). An out-of-memory error ("error_kind": "oom") ends that setting's batch sweep.
#   RESULTS.log: every measurement's log (stderr), for errors.
#   stdout: each JSON line as it comes, then a table of them all and what was not run.
#
# Environment (flags above win): BUDGET total seconds (480); STEP_TIMEOUT seconds per
# measurement (300); MIN_START seconds a measurement needs left to be started (60); SIZE
# (paper or unit_test); ORDER (accelerator.py --order); MAX_BATCH (largest batch of a sweep:
# paper 64, unit_test 2); PYTHON (python); XLA_PYTHON_CLIENT_MEM_FRACTION (GPU memory JAX may
# take: 0.9 here, JAX's default 0.75); JAX_COMPILATION_CACHE_DIR (a persistent compilation
# cache: a second run then skips most compiles, so its compile_s says little).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
results="accelerator-results.jsonl"
budget="${BUDGET:-480}"
step_timeout="${STEP_TIMEOUT:-300}"
min_start="${MIN_START:-60}"
reserve=5  # Seconds kept for the summary.
forward=()
for arg in "$@"; do
  case "$arg" in
    --budget=*) budget="${arg#*=}" ;;
    --step_timeout=*) step_timeout="${arg#*=}" ;;
    -*) forward+=("$arg") ;;
    *) results="$arg" ;;
  esac
done
log="${results%.jsonl}.log"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"

start=$SECONDS
elapsed() { printf '%d:%02d' $(((SECONDS - start) / 60)) $(((SECONDS - start) % 60)); }

if [[ -s "$results" ]]; then
  mv "$results" "$results.bak"
fi
: >"$results"
: >"$log"

plan=$(timeout --kill-after=10 120 "$python" "$here/accelerator.py" --plan \
  ${forward[@]+"${forward[@]}"} </dev/null 2>>"$log")
if [[ $? -ne 0 || -z "$plan" ]]; then
  echo "error: accelerator.py --plan failed; its log, $log:" >&2
  tail -n 20 "$log" >&2
  exit 1
fi
total=$(grep -c . <<<"$plan")
echo "$total measurements planned, budget ${budget} s; results -> $results, logs -> $log" >&2

failed=" "        # Settings with a failure: their larger batches are skipped.
after_failure=()  # "setting batch" skipped so.
not_reached=()    # "setting batch" left when the budget ran out.
index=0
while IFS=$'\t' read -r setting arguments settings; do
  index=$((index + 1))
  batch="${arguments##*--batch=}"
  batch="${batch%% *}"
  if [[ "$failed" == *" $setting "* ]]; then
    after_failure+=("$setting:$batch")
    continue
  fi
  remaining=$((budget - (SECONDS - start) - reserve))
  if ((remaining < min_start)); then
    not_reached+=("$setting:$batch")
    continue
  fi
  limit=$((remaining < step_timeout ? remaining : step_timeout))
  echo "==> [$index/$total, $(elapsed) elapsed] $setting batch $batch (timeout ${limit} s)" >&2
  echo "==> [$index/$total, $(elapsed)] accelerator.py $arguments ${forward[*]:-}" >>"$log"
  began=$SECONDS
  logged=$(wc -l <"$log")
  # shellcheck disable=SC2086  # $arguments is a list of flags without spaces.
  output=$(timeout --kill-after=10 "$limit" "$python" "$here/accelerator.py" $arguments \
    ${forward[@]+"${forward[@]}"} </dev/null 2>>"$log")
  status=$?
  took=$((SECONDS - began))
  line=$(grep -m1 '^{' <<<"$output")
  if [[ -z "$line" ]]; then
    if ((took >= limit)); then
      kind=timeout
      message="timed out after ${took} s (limit ${limit} s)"
      if ((limit < step_timeout)); then
        message="stopped at the end of the budget after ${took} s"
      fi
    else
      kind=crash
      message="the process exited with status ${status} after ${took} s without a result"
      message+=" (see the log)"
    fi
    line="${settings%\}}, \"total_s\": ${took}, \"error\": \"${message}\","
    line+=" \"error_kind\": \"${kind}\"}"
  fi
  echo "$line" >>"$results"
  echo "$line"
  if [[ "$line" != *'"error": null'* ]]; then
    if [[ "$line" != *"end of the budget"* ]]; then
      failed+="$setting "
    fi
    tail -n +$((logged + 1)) "$log" | grep -v '^\s*$' | tail -n 3 | sed 's/^/    log: /' >&2
  fi
done <<<"$plan"

echo >&2
"$python" - "$results" "${after_failure[*]:-}" "${not_reached[*]:-}" "$(elapsed)" <<'EOF'
"""A table of the results file, and what was not run."""
import json
import sys

path, after_failure, not_reached, wall = sys.argv[1:5]
rows = [json.loads(line) for line in open(path) if line.startswith("{")]


def cell(value, spec=""):
  if value is None:
    return "-"
  return format(value, spec) if isinstance(value, float) else str(value)


def status(row):
  if row.get("error") is None:
    return "ok"
  return f"{row.get('error_kind')}: {row['error'][:70]}"


measured = [row for row in rows if row.get("platform")]
if measured:
  first = measured[0]
  print(f"{first['size']} size on {first['devices']} x {first['device_kind']} "
        f"({first['platform']}), jax {first['jax_version']}; wall time {wall}")
train = [row for row in rows if row["measurement"] == "train"]
if train:
  print("\ntrain step (batch per device; TFLOP and MFU from XLA's count, >= where attention "
        "kernels count zero)")
  header = (f"{'remat':<17} {'attn':<6} {'batch':>5} {'step s':>8} {'clips/s':>8} "
            f"{'TFLOP/step':>10} {'TFLOP/s/d':>9} {'MFU':>7} {'peak GiB':>9} {'compile s':>9}  "
            "status")
  print(header)
  for row in train:
    bound = ">=" if row.get("flops_lower_bound") else ""
    mfu = row.get("mfu")
    print(f"{row['remat']:<17} {row['attention']:<6} {row['batch']:>5} "
          f"{cell(row.get('step_s'), '.3f'):>8} {cell(row.get('clips_per_s'), '.2f'):>8} "
          f"{cell(row.get('tflop_per_step'), '.4g'):>10} "
          f"{cell(row.get('tflops_per_device'), '.4g'):>9} "
          f"{(bound + format(100 * mfu, '.1f') + '%') if mfu is not None else '-':>7} "
          f"{cell(row.get('peak_memory_gib'), '.3g'):>9} {cell(row.get('compile_s'), '.1f'):>9}  "
          f"{status(row)}")
sample = [row for row in rows if row["measurement"] == "sample"]
if sample:
  steps = next((row["steps"] for row in sample if row.get("steps")), "?")
  print(f"\nsampler ({steps} steps, classifier-free guidance, whole program)")
  print(f"{'attn':<6} {'batch':>5} {'s/video':>8} {'run s':>8} {'first call s':>12} "
        f"{'compile s':>9} {'peak GiB':>9}  status")
  for row in sample:
    print(f"{row['attention']:<6} {row['batch']:>5} "
          f"{cell(row.get('seconds_per_video'), '.2f'):>8} {cell(row.get('run_s'), '.2f'):>8} "
          f"{cell(row.get('first_call_s'), '.1f'):>12} {cell(row.get('compile_s'), '.1f'):>9} "
          f"{cell(row.get('peak_memory_gib'), '.3g'):>9}  {status(row)}")
if after_failure:
  print(f"\nnot run, after a failure at a smaller batch: {after_failure}")
if not_reached:
  print(f"not run, out of budget (--budget=SECONDS for more): {not_reached}")
EOF
