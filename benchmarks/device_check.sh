#!/usr/bin/env bash
# The GPU check: jaxgpt's kernels and benchmarks on one NVIDIA GPU, in at most 8 minutes.
#
#   bash benchmarks/device_check.sh [--out DIR]        # on the GPU machine (default DIR: device_check)
#   bash benchmarks/device_check.sh --dry-run [--out DIR]   # the same steps on CPU, tiny shapes
#
# Runs jaxgpt from this source tree (PYTHONPATH=., nothing installed, nothing downloaded) with the
# system python3 (or $PYTHON), which must already have JAX with its CUDA plugin, flax, optax,
# orbax-checkpoint, tiktoken and transformers. Steps, each under `timeout` and all within a total
# of 470 s (a dry run: 3 times the limits):
#   env        versions and the device; JAX_PLATFORMS=cuda makes a machine without a GPU fail here
#   kernels    benchmarks/kernel_check.py: flash attention forward/backward and the decode kernel
#              against the XLA reference, compiled (JAXGPT_PALLAS_INTERPRET=0: no interpreter)
#   attention  jaxgpt bench attention, bfloat16, xla / cudnn / pallas at T = 1024, 2048, 4096
#   train      jaxgpt bench train --model gpt2 --dtype bfloat16 at B=16, T=1024 (tokens/s, MFU)
#   decode     jaxgpt bench decode --model gpt2, bfloat16, batch 1 and 8, 64 + 256 tokens, with
#              float32 parameters cast per step and with bfloat16 weights (--weights bfloat16)
#   report     benchmarks/device_check_report.py: checks every expected row is there and finite,
#              writes DIR/device_check.json and prints a short table
# The first failing step stops the script with a non-zero exit and its name; nothing is skipped.
# --dry-run runs the same steps on CPU with the Pallas interpreter on and tiny shapes (CI runs it:
# tests/test_device_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
OUT=device_check
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT="${2:?--out needs a directory}"; shift ;;
    -h|--help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "device_check: error: unknown argument '$1' (expected --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
if [ "$DRY_RUN" = 1 ]; then
  export JAX_PLATFORMS=cpu JAXGPT_PALLAS_INTERPRET=1
  MODEL=tiny; SEQS="16"; ATT=(--batch 1 --steps 1)
  TRAIN=(--batch 2 --seq 16 --steps 1); DECODE=(--seq 8 --steps 3)  # median of 3: one noisy repeat can make the step time negative
else
  export JAX_PLATFORMS=cuda JAXGPT_PALLAS_INTERPRET=0
  MODEL=gpt2; SEQS="1024 2048 4096"; ATT=(--batch 8 --steps 5)
  TRAIN=(--batch 16 --seq 1024 --steps 5); DECODE=(--steps 3)
fi
mkdir -p "$OUT"
# The GPU run must fit 8 minutes. A dry run shares a CPU with whatever else runs there (tiny
# shapes take about a minute on two idle cores), so its limits are three times as long.
SCALE=1
if [ "$DRY_RUN" = 1 ]; then SCALE=3; fi
TOTAL_S=$((470 * SCALE))
START=$SECONDS

# step NAME LIMIT_S COMMAND...: run COMMAND under timeout (its limit, capped by what is left of
# the total), output to $OUT/NAME.log; on failure print the log's tail and exit naming the step.
step() {
  local name="$1" limit=$(($2 * SCALE))
  shift 2
  local left=$((TOTAL_S - (SECONDS - START)))
  if [ "$limit" -gt "$left" ]; then limit="$left"; fi
  if [ "$limit" -lt 5 ]; then
    echo "device_check: FAILED before step '$name': the ${TOTAL_S} s budget is spent" >&2
    exit 1
  fi
  echo "== $name (limit ${limit} s): $*" >&2
  local t0=$SECONDS rc=0
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    tail -n 25 "$OUT/$name.log" >&2
    local why="exit $rc"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then why="over its ${limit} s limit"; fi
    echo "device_check: FAILED at step '$name' ($why); full log: $OUT/$name.log" >&2
    exit 1
  fi
  echo "   $name ok in $((SECONDS - t0)) s" >&2
}

JAXGPT=("$PYTHON" -m jaxgpt)
step env 60 "$PYTHON" -c "
import jax, jaxlib, flax, optax, orbax.checkpoint, tiktoken, transformers
print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__,
      'optax', optax.__version__, 'transformers', transformers.__version__)
print('devices', jax.devices())
print('platform', jax.default_backend())
"
step kernels 120 "$PYTHON" benchmarks/kernel_check.py --json "$OUT/kernels.json" \
  $([ "$DRY_RUN" = 1 ] && echo --tiny)
for T in $SEQS; do
  step "attention_T$T" 90 "${JAXGPT[@]}" bench attention --model "$MODEL" --dtype bfloat16 \
    --seq "$T" "${ATT[@]}" --json "$OUT/attention_T$T.json"
done
step train 150 "${JAXGPT[@]}" bench train --model "$MODEL" --dtype bfloat16 "${TRAIN[@]}" \
  --json "$OUT/train.json"
step decode 90 "${JAXGPT[@]}" bench decode --model "$MODEL" --dtype bfloat16 "${DECODE[@]}" \
  --json "$OUT/decode.json"
step decode_bf16_weights 90 "${JAXGPT[@]}" bench decode --model "$MODEL" --dtype bfloat16 \
  --weights bfloat16 "${DECODE[@]}" --json "$OUT/decode_bf16_weights.json"
step report 30 "$PYTHON" benchmarks/device_check_report.py "$OUT" \
  $([ "$DRY_RUN" = 1 ] && echo --dry-run)
cat "$OUT/report.log"
echo "device_check: all steps passed in $((SECONDS - START)) s; results in $OUT/device_check.json" >&2
