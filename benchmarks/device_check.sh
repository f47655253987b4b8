#!/usr/bin/env bash
# The GPU checks of issue 23, as device calls. Prepare here, after every code change (the
# device runs the carried wheel, not the checkout):
#
#   make venv && EXTRA="prometheus-client" bash ../shared/gpu/prepare-carry.sh
#   .venv/bin/python benchmarks/device_models.py minilm .gpucarry/minilm   # 45 MB, fp16
#
# then, as two calls back to back (the machine stays warm 30 s between them; 15 minutes of
# device time a session, a cold start ~1 minute of it):
#   run(command='STEPS="startup correct minilm bertbase" bash benchmarks/device_check.sh',
#       carry=[".gpucarry"], timeout_s=480)
#   run(command='STEPS="first generate" bash benchmarks/device_check.sh', carry=[".gpucarry"],
#       timeout_s=330)
# Measured on 2026-12-04 (H200, before this session's fixes): correct 126 s; bertbase at
# 100,000 rows 240 s and cut off in its old profiled extra run (gone now); first 2 x 28 s;
# generate cut off after 110 s (model.generate had not finished).
# STEPS picks steps (default all, in this order):
#   startup   a fresh process: seconds to import dask.distributed, torch, transformers,
#             create the CUDA context, load MiniLM and run its first batch
#   correct   correctness first (benchmarks/device_correct.py): embeddings vs
#             sentence-transformers fp32, greedy generation vs model.generate, score vs a
#             direct forward, on this device                      (CORRECT_ROWS rows)
#   minilm    bench MiniLM: st-best, engine, submit               (ROWS rows, 2 rounds)
#   bertbase  the same on a random BERT-base built on the device
#   compile   engine against engine-compile on MiniLM (engine.compile on GPU: pays or not)
#   first     a 4,000-row submit: wall clock, stages, first-batch timing in report.json
#   generate  bench --task generate, a random 24 x 1152 Llama (~0.5 B), batch 64, bf16,
#             prompts of 32..1024 tokens;
#             lepton-batch with CUDA graphs and lepton-batch-eager without (pay or not)
# Each step has its own timeout; results go to $OUT (JSON, logs) as they finish, so a
# call cut short still returns what ran. Try it on CPU first with tiny sizes (a Python
# 3.11 here cannot install the carry's cp312 wheels: run the checkout's venv instead):
#   DEVICE=cpu ROWS=300 GEN_ROWS=8 GEN_LAYERS=2 GEN_HIDDEN=128 CORRECT_ROWS=200 \
#     OUT=/tmp/dc PY=.venv/bin/python MINILM=.gpucarry/minilm bash benchmarks/device_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/device-out}
DEVICE=${DEVICE:-cuda}
ROWS=${ROWS:-100000}
STEPS=${STEPS:-startup correct minilm bertbase compile first generate}
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
    startup)
      step startup 90 "$PY" - "$MINILM" "$DEVICE" <<'PYEOF'
import sys, time
t0 = last = time.perf_counter()
def took(what):
    global last
    now = time.perf_counter()
    print(f"{what:<28} {now - last:6.2f} s   (total {now - t0:6.2f} s)", flush=True)
    last = now
import dask.distributed; took("import dask.distributed")
import torch; took("import torch")
import transformers; took("import transformers")
from transformers import BertModel; took("BertModel's module")
device = sys.argv[2]
if device == "cuda":
    torch.zeros(1, device="cuda"); torch.cuda.synchronize(); took("CUDA context")
from lepton_batch.engine import Engine, EngineConfig; took("import lepton_batch.engine")
eng = Engine(EngineConfig(model_dir=sys.argv[1], head="base", dtype="auto", device=device,
                          max_length=256), ["a first row", "and a second one"] * 32)
took(f"engine load + quality gate ({eng.quality.seconds if eng.quality else '-'} s)")
tok = eng.tokenize(["the first batch of the night"] * 256)
eng.embed(tok, "mean", True, 16384, 1024)
if device == "cuda":
    torch.cuda.synchronize()
took("first batch (256 rows)")
PYEOF
      ;;
    correct)
      step correct 150 "$PY" benchmarks/device_correct.py --device "$DEVICE" --model "$MINILM" \
        --rows "$CORRECT_ROWS" --json "$OUT/correct.json" ;;
    minilm)
      step bench-minilm 240 "${CLI[@]}" bench --device "$DEVICE" --model "$MINILM" \
        --rows "$ROWS" --repeats 2 --methods st-best,engine,submit \
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
from lepton_batch.bench.corpus import load_rows
raw, _ = load_rows("data/samples/", 4000)
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
