#!/usr/bin/env bash
# GPU benchmarks through launch/pretrain.py (the user's code path), one prepared script, under 8 minutes on one H100/H200:
#   (a) the lecture model (configs/shakespeare_char.yaml) for its 5000 steps: wall time, best val loss, time to val <= 1.47;
#   (b) GPT-2 124M (configs/gpt2_124m.yaml, bf16 + torch.compile) on random tokens: tokens/s and MFU, 2^19 tokens per step;
#   (c) peak GPU memory of each (the trainer's "peak GPU memory" line).
# Results: $OUT/gpu_results.md (Markdown, with the device name, torch version and date), the two logs and metrics files.
#
#   bench/gpu.sh prepare            # here, on a CPU machine with the full environment (`datasets` tokenizes): writes bench/out/gpu/
#   bench/gpu.sh run                # on the GPU machine: trains on what prepare wrote; needs no `datasets` and no `wandb`
#   bench/gpu.sh --dry-run          # prepare + run at tiny sizes on the CPU (bench/out/gpu_dry/), a check that the script works
#
# The device machine of this workplace (torch 2.11, accelerate, safetensors, tokenizers, no datasets, no wandb, no network):
# prepare here, then run there with the prepared folder carried (it is git-ignored, about 15 MB), e.g. through the device tool:
#   run(command="bash bench/gpu.sh run", carry=["bench/out/gpu"], timeout_s=600)
# The run stage points PYTHONPATH at the checkout (dist_gpt need not be installed there) and uses `python3` (or $PYTHON).
# The random-token corpus is text over 50,257 distinct CJK characters, so the char tokenizer gives GPT-2-sized ids
# drawn uniformly: the same tokenizer, data loader and training loop a user's run goes through.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
STAGE=all
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        prepare | run | all) STAGE=$arg ;;
        *) echo "usage: bench/gpu.sh [--dry-run] [prepare|run|all]" >&2; exit 2 ;;
    esac
done
PYTHON=${PYTHON:-python3}
SOURCE=${SOURCE:-../shared/data/tinyshakespeare/input.txt}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1 PYTHONUNBUFFERED=1
if ((DRY)); then
    DATA=bench/out/gpu_dry
    RANDOM_CHARS=300000
    # the same steps at tiny sizes: 2 x 2 x 64 models, a few steps, no compile
    LECTURE=(--model.n_layer=2 --model.n_head=2 --model.n_embd=64 --model.block_size=64 --train.batch_size=8 --train.max_steps=20
        --train.eval_interval=10 --train.eval_iters=4 --train.checkpoint_interval=10 --train.sample_tokens=16 --train.compile=false)
    GPT2=(--model.n_layer=2 --model.n_head=2 --model.n_embd=64 --model.block_size=128 --train.batch_size=2 --train.tokens_per_step=1024
        --train.max_steps=6 --train.compile=false)
    GPT2_STEPS=6
else
    DATA=bench/out/gpu
    RANDOM_CHARS=2000000
    LECTURE=()
    GPT2=(--train.max_steps=30)
    GPT2_STEPS=30
fi
OUT=${OUT:-$DATA/results}
WORK=${WORK:-/tmp/dist_gpt_gpu_bench}

prepare() {
    mkdir -p "$DATA"
    rm -f "$DATA/input.txt"
    cp "$SOURCE" "$DATA/input.txt"
    "$PYTHON" - "$RANDOM_CHARS" "$DATA/random.txt" <<'EOF'
import sys
import numpy as np
n, path = int(sys.argv[1]), sys.argv[2]
letters = np.r_[np.arange(0x4E00, 0xA000), np.arange(0x20000, 0x20000 + 50257 - (0xA000 - 0x4E00))]  # 50,257 CJK characters
ids = np.random.default_rng(0).integers(0, len(letters), n)
text = "".join(map(chr, letters[ids]))
with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(text[i : i + 1023] for i in range(0, n, 1023)) + "\n")
EOF
    "$PYTHON" launch/prepare.py --config configs/shakespeare_char.yaml --data.source="$DATA/input.txt" --data.dir="$DATA/shakespeare_char"
    "$PYTHON" launch/prepare.py --config configs/gpt2_124m.yaml "${RANDOM_DATA[@]}"
    du -sh "$DATA"
}

RANDOM_DATA=(--data.name=random_tokens --data.tokenizer=char --data.source="$DATA/random.txt" --data.dir="$DATA/random_tokens" --data.val_fraction=0.02 --data.num_proc=1)

# time_run NAME ARGS...: launch/pretrain.py in a fresh run directory, timed from start to exit; prints the wall seconds
time_run() {
    local name=$1
    shift
    rm -rf "${WORK:?}/$name"
    local start end
    start=$(date +%s.%N)
    if ! "$PYTHON" launch/pretrain.py "$@" --run.out_dir="$WORK/$name" --log.wandb=false --log.progress=false >"$OUT/$name.log" 2>&1; then
        echo "$name failed; the end of its log:" >&2
        tail -30 "$OUT/$name.log" >&2
        exit 1
    fi
    end=$(date +%s.%N)
    cp "$WORK/$name/metrics.jsonl" "$OUT/${name}_metrics.jsonl"
    "$PYTHON" -c "print(f'{$end - $start:.1f}')"
}

run() {
    if [[ ! -f "$DATA/shakespeare_char/meta.json" || ! -f "$DATA/random_tokens/meta.json" ]]; then
        echo "error: $DATA is not prepared: run \`bench/gpu.sh $( ((DRY)) && echo '--dry-run ')prepare\` first (where \`datasets\` is installed) and carry $DATA" >&2
        exit 2
    fi
    mkdir -p "$OUT" "$WORK"
    "$PYTHON" -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU (no CUDA)', '| torch', torch.__version__)" | tee "$OUT/device.txt"
    echo "(a) lecture model, configs/shakespeare_char.yaml ${LECTURE[*]}"
    LECTURE_WALL=$(time_run lecture --config configs/shakespeare_char.yaml --data.source="$DATA/input.txt" --data.dir="$DATA/shakespeare_char" "${LECTURE[@]}")
    echo "(b) GPT-2 124M on random tokens, configs/gpt2_124m.yaml ${GPT2[*]}"
    GPT2_WALL=$(time_run gpt2 --config configs/gpt2_124m.yaml "${RANDOM_DATA[@]}" --train.eval_interval=1000000 --train.eval_iters=1 \
        --train.checkpoint_interval=1000000 --train.sample_tokens=0 --train.log_interval=1 --train.warmup_steps=10 "${GPT2[@]}")
    "$PYTHON" - "$OUT" "$WORK" "$LECTURE_WALL" "$GPT2_WALL" "$GPT2_STEPS" "${LECTURE[*]}" "${GPT2[*]}" <<'EOF' | tee "$OUT/gpu_results.md"
import json, re, statistics, sys, time
from pathlib import Path
out, work, lecture_wall, gpt2_wall, gpt2_steps, lecture_args, gpt2_args = sys.argv[1:]
out, work = Path(out), Path(work)

def rows(name):
    return [json.loads(line) for line in (out / f"{name}_metrics.jsonl").read_text().splitlines()]

def peak(name):
    m = re.search(r"peak GPU memory \(process 0\): ([\d.]+) GiB allocated, ([\d.]+) GiB reserved", (out / f"{name}.log").read_text())
    return f"{m[1]} GiB allocated, {m[2]} GiB reserved" if m else "n/a (no CUDA)"

def header(name):
    return next(line for line in (out / f"{name}.log").read_text().splitlines() if line.startswith("world size"))

lec = json.loads((work / "lecture" / "summary.json").read_text())
evals = [r for r in rows("lecture") if r.get("val_loss") is not None]
hit = next((r for r in evals if r["val_loss"] <= 1.47), None)
gpt2 = [r for r in rows("gpt2") if r.get("train_loss") is not None and r["step"] > min(5, int(gpt2_steps) // 2)]  # after compile and warm-up
tok = [r["tokens_per_s"] for r in gpt2]
mfu = [r["mfu"] for r in gpt2 if "mfu" in r]
print(f"## GPU benchmarks, {time.strftime('%Y-%m-%d')}: {(out / 'device.txt').read_text().strip()}\n")
print("| benchmark | result |\n|---|---|")
print(f"| (a) lecture model `configs/shakespeare_char.yaml {lecture_args}` | {lec['steps']} steps, best val {lec['best_val_loss']:.4f} (final {lec['final_val_loss']:.4f}); "
      f"wall {lecture_wall} s for the whole process, {lec['wall_s']:.1f} s in the loop; val <= 1.47 "
      + (f"first at step {hit['step']}, {hit['elapsed_s']:.1f} s into the loop" if hit else "not reached") + " |")
print(f"| (a) peak memory | {peak('lecture')} |")
print(f"| (b) GPT-2 124M, random tokens `configs/gpt2_124m.yaml {gpt2_args}` | tokens/s min {min(tok):,.0f} / median {statistics.median(tok):,.0f} over steps {gpt2[0]['step']}-{gpt2[-1]['step']}; "
      + (f"MFU median {statistics.median(mfu):.1%} (max {max(mfu):.1%})" if mfu else "MFU n/a (CPU or unknown GPU)") + f"; wall {gpt2_wall} s |")
print(f"| (b) peak memory | {peak('gpt2')} |")
print(f"\nsetup (a): {header('lecture')}\nsetup (b): {header('gpt2')}")
EOF
}

case "$STAGE" in
    prepare) prepare ;;
    run) run ;;
    all) prepare && run ;;
esac
