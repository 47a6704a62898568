#!/usr/bin/env bash
# Translation runs side by side on one GPU machine: one process per line of RUNS_FILE ("NAME FLAGS...", # for
# comments), each with one CPU thread and its model and embedded memory on cuda, after a smoke run on a tiny
# slice (20 steps straight, and 10 steps then 10 more resumed: the two must report the same losses and BLEU).
#
#   DATA=DIR OUT_DIR=DIR [DEADLINE=SECONDS] [WHEELS=DIR] trainers/translation_gpu.sh RUNS_FILE
#
# DATA: the Multi30k files (as --data-dir). DEVICE: cuda (default), or cpu to try the script without a GPU.
# VOCABULARY: a directory with vocabulary.en.model and vocabulary.de.model (as a CPU run writes them), passed to the
# listed runs as --vocabulary-dir: the GPU machine's sentencepiece trains another vocabulary from the same lines, and
# runs compare like with like across machines only on one. DEADLINE: runs still going that many seconds after the
# start are stopped (for a lent machine; default: none). WHEELS: as in benchmarks/gpu_env.sh. Each run writes
# OUT_DIR/NAME/ (checkpoint.pt, metrics.jsonl, evaluation.json, ...) and OUT_DIR/NAME.log; with ARCHIVE=FILE,
# every run's metrics.jsonl, evaluation.json and log are also packed into FILE (a .tar.gz).
set -uo pipefail
cd "$(dirname "$0")/.."
runs_file=$(realpath "$1")
started=$SECONDS
source benchmarks/gpu_env.sh
mkdir -p "$OUT_DIR"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
device=${DEVICE:-cuda}
train=("$python" -m lifelong_memory.trainers.translation --data-dir "$DATA" --device "$device" --memory-device "$device"
       --threads 1)

tiny=(--train-pairs 300 --test-pairs 40 --validation-pairs 20 --vocab-size 300 --embedding-dim 16 --hidden 32
      --key-dim 16 --memory-size 2048 --choose-k 8 --batch-size 20 --validate-every 10 --checkpoint-every 10
      --beam 2 --context-training)
smoke=$OUT_DIR/smoke
"${train[@]}" "${tiny[@]}" --steps 20 --out-dir "$smoke/straight" >"$smoke.log" 2>&1 &&
    "${train[@]}" "${tiny[@]}" --steps 10 --out-dir "$smoke/resumed" >>"$smoke.log" 2>&1 &&
    "${train[@]}" "${tiny[@]}" --steps 20 --out-dir "$smoke/resumed" --resume >>"$smoke.log" 2>&1 ||
    { tail -n 30 "$smoke.log"; echo "translation_gpu: the smoke run failed"; exit 1; }
"$python" - "$smoke" <<'EOF'
import json, sys
from pathlib import Path
def metrics(run):
    rows = [json.loads(line) for line in (Path(sys.argv[1]) / run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k not in ("cpu_s", "step_cpu_ms")} for m in rows]
same = metrics("straight") == metrics("resumed")
print(f"smoke: trained and evaluated; resumed run {'identical to' if same else 'DIFFERS from'} the straight one")
EOF

pids=()
launched=$(date +%s)
while read -r name flags; do
    [[ -z $name || $name == \#* ]] && continue
    limit=()
    if [[ -n ${DEADLINE:-} ]]; then
        left=$((DEADLINE - (SECONDS - started)))
        ((left > 0)) || { echo "$name: not started, the deadline has passed"; continue; }
        limit=(timeout "$left")
    fi
    (
        # shellcheck disable=SC2086  # the flags are words
        "${limit[@]}" "${train[@]}" ${VOCABULARY:+--vocabulary-dir "$VOCABULARY"} $flags --out-dir "$OUT_DIR/$name" >"$OUT_DIR/$name.log" 2>&1
        echo "$name: exit status $? after $(($(date +%s) - launched)) s"
    ) &
    pids+=($!)
    echo "started $name: $flags"
done <"$runs_file"
wait "${pids[@]}"
for log in "$OUT_DIR"/*.log; do
    name=$(basename "$log" .log)
    [[ $name == smoke ]] && continue
    if [[ -f $OUT_DIR/$name/evaluation.json ]]; then echo "$name: done"; else echo "$name: stopped"; fi
    grep -E '^step ' "$log" | tail -n 1
done
if [[ -n ${ARCHIVE:-} ]]; then
    (cd "$OUT_DIR" && tar czf "$ARCHIVE" --ignore-failed-read ./*.log ./*/metrics.jsonl ./*/evaluation.json)
fi
