#!/usr/bin/env bash
# The whole GPU measurement in one call: environment, the ~1B preset in bfloat16 with each speed
# lever (one process per variant, so peak memory is per variant), the SFT/DPO/generation paths,
# and a profile of the best configuration. Results (JSON, JSONL history, logs) go to $OUT.
#
#   OUT=runs/gpu_bench bash tools/gpu_bench.sh            # everything (~10 min on one H100)
#   bash tools/gpu_bench.sh check final        # only some phases: check levers more attention stages final profile
#
# Environment knobs: PRESET (1b), BATCH (8), STEPS (10), PYTHON (python3), EXTRA (more overrides).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_bench}
PRESET=${PRESET:-1b}
BATCH=${BATCH:-8}
STEPS=${STEPS:-10}
PY=${PYTHON:-python3}
EXTRA=${EXTRA:-}
PHASES=${*:-check levers more attention stages final profile}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
BF16="model.dtype=bfloat16 model.param_dtype=float32"
BEST=${BEST:-"model.attention=cudnn model.loss_chunk_size=1024 model.scan_layers=false"}

bench() {  # bench NAME STAGE [overrides...]
  local name=$1 stage=$2; shift 2
  echo "=== $name ($stage): $*" | tee -a "$OUT/log.txt"
  $PY -m jaxllm.cli bench --preset "$PRESET" --stage "$stage" --batch-size "$BATCH" --steps "$STEPS" --warmup 3 \
      --json "$OUT/$name.json" --history "$OUT/history.jsonl" --variant "$name:$*" $EXTRA 2>&1 \
      | grep -v "^  round" | tee -a "$OUT/log.txt"
}

if [[ " $PHASES " == *" check "* ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/env.txt"
  $PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" | tee -a "$OUT/env.txt"
  bench check_tiny pretrain model.preset=tiny $BF16 model.attention=cudnn model.loss_chunk_size=64
fi
SCANNED="model.attention=cudnn model.loss_chunk_size=1024"
if [[ " $PHASES " == *" levers "* ]]; then  # one lever at a time, scanned layers unless named
  bench xla_unfused pretrain $BF16 model.attention=xla
  bench cudnn_unfused pretrain $BF16 model.attention=cudnn
  bench cudnn_fused pretrain $BF16 $SCANNED
  bench cudnn_fused_unscanned pretrain $BF16 $SCANNED model.scan_layers=false
  bench cudnn_fused_remat_dots pretrain $BF16 $SCANNED model.remat=dots
  bench cudnn_fused_nodonate pretrain $BF16 $SCANNED donate=false
fi
if [[ " $PHASES " == *" more "* ]]; then  # on top of the best
  bench best_batch16 pretrain $BF16 $BEST train.batch_size=16
  bench best_remat_dots pretrain $BF16 $BEST model.remat=dots
  bench best_unfused pretrain $BF16 model.attention=cudnn model.scan_layers=false
fi
if [[ " $PHASES " == *" final "* ]]; then  # the headline numbers
  bench best pretrain $BF16 $BEST
  bench best_batch16 pretrain $BF16 $BEST train.batch_size=16
  $PY -m jaxllm.cli bench --preset "$PRESET" --stage generate --batch-size "$BATCH" --steps 5 --warmup 1 \
      --prompt-len 512 --new-tokens 256 --json "$OUT/generate.json" --history "$OUT/history.jsonl" \
      --variant "generate:$BF16" $EXTRA 2>&1 | grep -v "^  round" | tee -a "$OUT/log.txt"
fi
if [[ " $PHASES " == *" attention "* ]]; then
  $PY tools/attention_bench.py 2>&1 | grep -v "^W\|^I" | tee -a "$OUT/log.txt" | tee "$OUT/attention.txt"
fi
if [[ " $PHASES " == *" stages "* ]]; then
  bench sft sft $BF16 $BEST
  bench dpo dpo $BF16 $BEST train.batch_size=$((BATCH / 2))  # pairs: 2x the rows
  $PY -m jaxllm.cli bench --preset "$PRESET" --stage generate --batch-size "$BATCH" --steps 5 --warmup 1 \
      --prompt-len 512 --new-tokens 256 --json "$OUT/generate.json" --history "$OUT/history.jsonl" \
      --variant "generate:$BF16" $EXTRA 2>&1 | grep -v "^  round" | tee -a "$OUT/log.txt"
fi
if [[ " $PHASES " == *" profile "* ]]; then
  $PY -m jaxllm.cli bench --preset "$PRESET" --batch-size "$BATCH" --steps 3 --warmup 2 --profile "$OUT/trace" \
      --no-history --json "$OUT/profile.json" --variant "profile:$BF16 $BEST" $EXTRA 2>&1 \
      | grep -v "^  round" | tee -a "$OUT/log.txt"
  # Keep only the perfetto trace's summary (the raw trace is large).
  find "$OUT/trace" -name "*.xplane.pb" -delete 2>/dev/null
fi
echo "=== summary" | tee -a "$OUT/log.txt"
$PY - "$OUT" <<'PYEOF' | tee -a "$OUT/log.txt"
import json, sys
from pathlib import Path
from jaxllm.bench.report import format_table
records = [r for f in sorted(Path(sys.argv[1]).glob("*.json")) for r in json.loads(f.read_text())["results"]]
print(format_table(records))
PYEOF
