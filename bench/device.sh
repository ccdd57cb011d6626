#!/usr/bin/env bash
# The checks a session lent a GPU runs, in priority order, as one device command.
#
# The device tool gives a session about 15 minutes of GPU time in all (start-up included) and at most 10 minutes
# per command, so this script budgets itself (BUDGET seconds, default 540) and skips what no longer fits instead
# of being killed half-way. Prepare the data here, then run it there:
#
#   mkdir -p .data/en && cp ../shared/data/en/{wiki,news}.{train,valid}.jsonl.xz .data/en/    # 35 MB, git-ignored
#   run(command="bash bench/device.sh", carry=[".data"], timeout_s=600)
#
# 1. bench/throughput.py --size gpt2-base: tokens/s and MFU per depth 1, 3, 6, 12 (issue 6's >= 45 % MFU), then
#    at depth 12 with the chunked output layer + loss (--loss-chunk 4096), at batch 16 and 32.
# 2. bench/growth.py --size gpt-small with scratch, the default stack (3 -> 6 -> 12), one growth (3 -> 12 at 60 %),
#    progressive and Apollo (10/20/50 %, WSD):
#    does the CPU size's ranking of the methods hold on the paper's GPT shape?
# 3. If time is left: bench/growth.py --size bert-small (scratch, apollo, stack) for issue 7's GLUE comparison,
#    which `python bench/glue.py .../{scratch,apollo,stack}` runs in a second command.
# Small outputs (logs, metrics, compare tables and plots) are copied to $OUT; checkpoints stay on the device.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-bench/out/device}
DATA=${DATA:-.data/en}
BUDGET=${BUDGET:-540}
WORK=${WORK:-bench/out/device-work}  # git-ignored: kept while the device stays warm, for a second command
mkdir -p "$OUT" "$WORK"
t0=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - t0))); }

step() {  # step NAME NEEDED_SECONDS COMMAND...: runs COMMAND if NEEDED_SECONDS remain, never past the budget
    local name=$1 need=$2
    shift 2
    local remaining
    remaining=$(left)
    if ((remaining < need)); then
        echo "[device] skip $name: ${remaining}s of the budget left, it needs about ${need}s" | tee -a "$OUT/summary.txt"
        return 1
    fi
    echo "[device] $name (${remaining}s left)" | tee -a "$OUT/summary.txt"
    local s=$(date +%s)
    timeout "$((remaining - 5))" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "[device] $name: exit $rc after $(($(date +%s) - s))s" | tee -a "$OUT/summary.txt"
    tail -n 25 "$OUT/$name.log"
    return $rc
}

collect() {  # copy the small outputs of a growth bench folder into $OUT
    local src=$1 dst=$OUT/$(basename "$1")
    [ -d "$src" ] || return 0
    mkdir -p "$dst"
    for run in "$src"/*/; do
        [ -f "$run/metrics.jsonl" ] || continue
        mkdir -p "$dst/$(basename "$run")"
        cp "$run"/{metrics.jsonl,config.json,data.json,model.json} "$dst/$(basename "$run")/" 2>/dev/null
    done
    [ -d "$src/compare" ] && cp -r "$src/compare" "$dst/"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} 2>&1 | tee "$OUT/summary.txt"
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"; then
    echo "[device] no CUDA device: this script is for a lent GPU (the CPU size runs with bench/growth.py --size cpu)" \
        | tee -a "$OUT/summary.txt"
    exit 3
fi
if [ ! -f "$DATA/wiki.train.jsonl.xz" ]; then
    echo "[device] $DATA lacks the wiki/news splits: copy them and pass carry=[\".data\"] (see the top of this file)" \
        | tee -a "$OUT/summary.txt"
    exit 2
fi

step throughput-gpt2-base 120 python bench/throughput.py --size gpt2-base --depths 1,3,6,12 --steps 10 \
    --out "$OUT/throughput-gpt2-base.json"
# the same model at full depth with the chunked output layer + loss (never the whole 16k x 50k logits), and with
# twice the batch that the memory saved allows: does it move MFU towards the 45 % target?
step throughput-gpt2-base-chunked 50 python bench/throughput.py --size gpt2-base --depths 12 --steps 10 \
    --plain-only --loss-chunk 4096 --out "$OUT/throughput-gpt2-base-chunked.json"
step throughput-gpt2-base-chunked-b32 50 python bench/throughput.py --size gpt2-base --depths 12 --steps 10 \
    --plain-only --loss-chunk 4096 --batch 32 --out "$OUT/throughput-gpt2-base-chunked-b32.json"
step growth-gpt-small 300 python bench/growth.py --size gpt-small --data-dir "$DATA" --out "$WORK/growth-gpt-small" \
    --methods scratch stack oneshot3-wsd progressive-wsd apollo-wsd-mean
collect "$WORK/growth-gpt-small"
step growth-bert-small 240 python bench/growth.py --size bert-small --data-dir "$DATA" \
    --out "$WORK/growth-bert-small" --methods scratch apollo stack
collect "$WORK/growth-bert-small"
echo "[device] done after $(($(date +%s) - t0))s" | tee -a "$OUT/summary.txt"
