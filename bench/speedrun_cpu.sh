#!/usr/bin/env bash
# The CPU speedrun, timed end to end: `python launch/pretrain.py --config configs/speedrun_cpu.yaml` N times.
#
#   bench/speedrun_cpu.sh                  # 5 runs
#   bench/speedrun_cpu.sh 3 --model.pos_emb=rope --train.optimizer=muon   # 3 runs with extra overrides
#
# The data is prepared first (untimed). Each run gets a fresh run directory; its wall time is taken from just
# before the process starts to just after it exits, and its loss is the final val loss of summary.json (the
# trainer's last evaluation: train.eval_iters batches of the validation split). Prints one row per run, then
# min and median, with the machine, the load average before each run and the thread setting. Run it on a quiet
# machine: other processes on the cores slow torch's threads 10-70x.
# Environment: SOURCE (the corpus; default ../shared/data/tinyshakespeare/input.txt), CONFIG, DATA_DIR (default:
# the config's data/<name>), OUT (run directories; default /tmp/speedrun_cpu), OMP_NUM_THREADS (default: unset,
# one thread per core).
set -euo pipefail
cd "$(dirname "$0")/.."

N=${1:-5}
shift $(($# > 0 ? 1 : 0))
CONFIG=${CONFIG:-configs/speedrun_cpu.yaml}
SOURCE=${SOURCE:-../shared/data/tinyshakespeare/input.txt}
OUT=${OUT:-/tmp/speedrun_cpu}
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1
ARGS=(--config "$CONFIG" --data.source="$SOURCE")
[[ -n "${DATA_DIR:-}" ]] && ARGS+=(--data.dir="$DATA_DIR")
ARGS+=("$@")

mkdir -p "$OUT"
python launch/prepare.py "${ARGS[@]}" >"$OUT/prepare.log" 2>&1 || { cat "$OUT/prepare.log"; exit 1; }

echo "# CPU speedrun: $(date -u +%Y-%m-%dT%H:%MZ), $(python -m dist_gpt.hardware), $(getconf _NPROCESSORS_ONLN) cores," \
    "torch $(python -c 'import torch; print(torch.__version__)'), OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}, commit $(git rev-parse --short HEAD 2>/dev/null || echo none)$(git diff --quiet 2>/dev/null || echo '+changes')"
echo "# python launch/pretrain.py ${ARGS[*]}"
echo
echo "| run | wall s | final val loss | steps | load before |"
echo "|---|---|---|---|---|"
RESULTS="$OUT/results.tsv"
: >"$RESULTS"
for i in $(seq 1 "$N"); do
    RUN="$OUT/run_$i"
    LOAD=$(cut -d' ' -f1 /proc/loadavg)
    START=$(date +%s.%N)
    if ! python launch/pretrain.py "${ARGS[@]}" --run.out_dir="$RUN" --run.resume=never --run.overwrite=true >"$OUT/run_$i.log" 2>&1; then
        echo "run $i failed; its log:" >&2
        tail -20 "$OUT/run_$i.log" >&2
        exit 1
    fi
    END=$(date +%s.%N)
    read -r VAL STEPS < <(python -c "import json, sys; s = json.load(open(sys.argv[1])); print(s['final_val_loss'], s['steps'])" "$RUN/summary.json")
    WALL=$(python -c "print(f'{$END - $START:.1f}')")
    printf "%s\t%s\t%s\n" "$WALL" "$VAL" "$STEPS" >>"$RESULTS"
    printf "| %d | %s | %.4f | %s | %s |\n" "$i" "$WALL" "$VAL" "$STEPS" "$LOAD"
done
python - "$RESULTS" <<'EOF'
import statistics, sys
rows = [line.split("\t") for line in open(sys.argv[1]).read().splitlines()]
wall, val = [float(r[0]) for r in rows], [float(r[1]) for r in rows]
print(f"\nval loss: min {min(val):.4f}, median {statistics.median(val):.4f}; wall s: min {min(wall):.1f}, median {statistics.median(wall):.1f}, max {max(wall):.1f} ({len(rows)} runs)")
EOF
