#!/usr/bin/env bash
# Every GPU row of benchmarks/RESULTS.md (issue 17) in one run of <= 9 minutes, one results file.
#
#   OUT=/some/dir bash benchmarks/gpu_suite.sh            # on the GPU machine, from the repo root
#   OUT=/tmp/suite bash benchmarks/gpu_suite.sh --dry-run  # same rows, tiny configs, on a CPU
#
# Rows (each under its own `timeout`, so one hung or slow row cannot eat the others' time):
#   dpo_gpt2    bench_dpo.py   preflens (fp32 head, and --head-precision bf16) vs TRL DPOTrainer side by
#                              side, gpt2-small-random, 32 pairs x 512, bf16, MFU
#   dpo_llama1b bench_dpo.py   preflens vs TRL, random Llama-3.2-1B shapes, 8 pairs x 512, bf16
#   ghost       bench_entanglement.py  ghost vs exact per-pair gradient inner products, 64 pairs x 256
#   scoring     bench_scoring.py       batched vs per-example response scoring, 256 pairs
#   memory      bench_memory.py        largest random Llama (8B/3B/1B/0.5B) per strategy: full,
#                                      full + activation checkpointing (FSDP2), LoRA
# Writes $OUT/gpu_suite_results.json (every row's JSON, exit status and seconds) and $OUT/logs/*.log.
set -u
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT/logs" "$OUT/rows"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}
B="$ROOT/benchmarks"
SUITE_START=$(date +%s)

row() {  # row NAME LIMIT_SECONDS COMMAND...  (the command writes $OUT/rows/NAME.json)
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/logs/suite.log"
  timeout -k 10 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  echo "   -> exit $rc after ${dt}s" | tee -a "$OUT/logs/suite.log"
  tail -n 12 "$OUT/logs/$name.log"
  printf '{"row": "%s", "exit": %d, "seconds": %d, "limit": %d}\n' "$name" "$rc" "$dt" "$limit" >>"$OUT/rows/status.jsonl"
}

if [ "$DRY" = 1 ]; then
  DEV="--device cpu"
  row dpo_gpt2 300 $PY "$B/bench_dpo.py" $DEV --model tiny-random --pairs 4 --seq 64 --steps 2 --warmup 1 \
      --threads 1 --head-precision fp32,bf16 --json-out "$OUT/rows/dpo_gpt2.json"
  row dpo_llama1b 300 $PY "$B/bench_dpo.py" $DEV --model llama-tiny-random --pairs 4 --seq 64 --steps 2 \
      --warmup 1 --threads 1 --json-out "$OUT/rows/dpo_llama1b.json"
  row ghost 300 $PY "$B/bench_entanglement.py" $DEV --model tiny-random --pairs 2 --tokens 32 \
      --methods ghost,exact --json-out "$OUT/rows/ghost.json"
  row scoring 300 $PY "$B/bench_scoring.py" $DEV --model gpt2-small-random --pairs 2 --batch-size 4 \
      --json-out "$OUT/rows/scoring.json"
  row memory 300 $PY "$B/bench_memory.py" --dry-run --timeout 120 --json-out "$OUT/rows/memory.json"
else
  DEV="--device cuda"
  row dpo_gpt2 135 $PY "$B/bench_dpo.py" $DEV --model gpt2-small-random --precision bf16 --pairs 32 --seq 512 \
      --steps 10 --warmup 3 --peak-tflops 989 --head-precision fp32,bf16 --json-out "$OUT/rows/dpo_gpt2.json"
  row dpo_llama1b 130 $PY "$B/bench_dpo.py" $DEV --model llama-1b-random --precision bf16 --pairs 8 --seq 512 \
      --steps 5 --warmup 2 --peak-tflops 989 --json-out "$OUT/rows/dpo_llama1b.json"
  row ghost 80 $PY "$B/bench_entanglement.py" $DEV --pairs 64 --tokens 256 --methods ghost,exact \
      --json-out "$OUT/rows/ghost.json"
  row scoring 50 $PY "$B/bench_scoring.py" $DEV --pairs 256 --json-out "$OUT/rows/scoring.json"
  row memory 145 $PY "$B/bench_memory.py" $DEV --precision bf16 --pairs 8 --seq 512 --steps 2 --timeout 55 \
      --json-out "$OUT/rows/memory.json"
fi

$PY - "$OUT" "$DRY" "$SUITE_START" <<'EOF'
import json, platform, sys, time
from pathlib import Path
out, dry, start = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
rows = {}
for line in (out / "rows" / "status.jsonl").read_text().splitlines():
    st = json.loads(line)
    f = out / "rows" / f"{st['row']}.json"
    st["result"] = json.loads(f.read_text()) if f.is_file() else None
    rows[st["row"]] = st
try:
    import torch
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    torch_version = torch.__version__
except Exception:  # noqa: BLE001
    gpu, torch_version = None, None
report = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "dry_run": dry, "gpu": gpu,
          "torch": torch_version, "host": platform.node(), "total_seconds": int(time.time()) - start, "rows": rows}
(out / "gpu_suite_results.json").write_text(json.dumps(report, indent=1))
bad = [k for k, v in rows.items() if v["exit"] != 0 or v["result"] is None]
print(f"suite: {len(rows)} rows in {report['total_seconds']} s; failed: {bad or 'none'}; -> {out / 'gpu_suite_results.json'}")
sys.exit(1 if bad else 0)
EOF
