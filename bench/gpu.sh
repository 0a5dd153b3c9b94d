#!/usr/bin/env bash
# The GPU verification (issue #13): dist_gpt's GPU path proved in two commands of about 6 minutes each on one GPU.
#
#   bench/gpu.sh prepare     here, where `datasets` is installed: Tiny Shakespeare and a GPT-2-vocabulary random-token
#                            corpus tokenized into bench/out/gpu/ (git-ignored, about 15 MB): carry it to the GPU machine
#   bench/gpu.sh part1       on the GPU: environment + torch.compile smoke test; the lecture model (5000 steps, bf16 +
#                            compile); its strict load, sample.py (KV cache on/off) and evaluate.py; kill + resume with compile
#   bench/gpu.sh part2       on the GPU: environment + smoke test; GPT-2 124M compile on/off (tokens/s, MFU); FSDP2
#                            (checkpoint, resume, plain load, val); fp16 + loss scaling vs bf16
#   bench/gpu.sh run         part1 then part2 in one command
#   bench/gpu.sh --dry-run   prepare + both parts at tiny sizes on the CPU (bench/out/gpu_dry/), as the test suite does
#
# Results: $OUT/gpu_results.md and $OUT/gpu_results.json, one row per check (PASS / FAIL / TIMEOUT / SKIP, its numbers),
# written when each check starts and ends; logs in $OUT/logs/PART/, each run's metrics in $OUT/runs/. OUT defaults to
# DATA/results. Run directories go to $GPU_WORK (default /tmp/dist_gpt_gpu; DATA/work in a dry run); GPU_DATA moves
# DATA; GPU_BUDGET caps a part's seconds (default 350; checks that would start later read SKIP); GPU_ONLY=check,...
# reruns only those checks of a part, keeping the other rows in $OUT. The run stages need torch, accelerate,
# safetensors and tokenizers, not `datasets` or `wandb`. Through this workplace's device tool:
#   run(command="bash bench/gpu.sh part1", carry=["bench/out/gpu"], timeout_s=420)
#   run(command="bash bench/gpu.sh part2", carry=["bench/out/gpu"], timeout_s=420)
# The checks themselves: bench/gpu_checks.py.
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: bench/gpu.sh [--dry-run] [prepare|part1|part2|run|all]   (default: all = prepare, part1, part2)"; }
DRY=()
STAGE=all
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=(--dry-run) ;;
        prepare | part1 | part2 | run | all) STAGE=$arg ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
PYTHON=${PYTHON:-python3}
if ((${#DRY[@]})); then
    DATA=${GPU_DATA:-bench/out/gpu_dry}
    WORK=${GPU_WORK:-$DATA/work}
    export CUDA_VISIBLE_DEVICES=""  # a dry run is the CPU path, on any machine
else
    DATA=${GPU_DATA:-bench/out/gpu}
    WORK=${GPU_WORK:-/tmp/dist_gpt_gpu}
fi
OUT=${OUT:-$DATA/results}
ARGS=(--data "$DATA" --out "$OUT" --work "$WORK" "${DRY[@]}" ${GPU_BUDGET:+--budget "$GPU_BUDGET"} ${GPU_ONLY:+--only "$GPU_ONLY"})
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# Whatever happens, a results table under $OUT: the checks write it themselves; this covers a crash before they start.
on_exit() {
    local rc=$?
    if [[ $STAGE != prepare && ! -f $OUT/gpu_results.md ]]; then
        mkdir -p "$OUT"
        printf '## dist_gpt GPU verification\n\nbench/gpu.sh %s ended (exit %s) before any check ran; see its output.\n' "$STAGE" "$rc" >"$OUT/gpu_results.md"
    fi
}
trap on_exit EXIT

status=0
step() { "$PYTHON" bench/gpu_checks.py "$@" "${ARGS[@]}" || status=$?; }
case "$STAGE" in
    prepare) step prepare ${SOURCE:+--source "$SOURCE"} ;;
    part1 | part2) step "$STAGE" ;;
    run) step part1; step part2 ;;
    all) step prepare ${SOURCE:+--source "$SOURCE"} && ((status == 0)) && { step part1; step part2; } ;;
esac
exit "$status"
