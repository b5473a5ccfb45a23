#!/bin/sh
# Train a reward model, Qwen's two stages in one go:
#   stage 1 (preference model pretraining) on -d PMP_DATA, then, with -f, stage 2 (fine-tuning on
#   high-quality comparisons) on FINETUNE_DATA starting from stage 1's output.
# Usage: sh recipes/train_reward.sh -d PMP_DATA [-f FINETUNE_DATA] [-m MODEL] -o OUT [extra qwen-tune rm flags]
# Without -m it starts from the embedded tiny Qwen2 model (a smoke test). Extra flags go to both stages.
# Runs on every visible GPU (torchrun, bf16) if there is one, else on the CPU.
set -eu

usage() { echo "usage: sh $0 -d PMP_DATA [-f FINETUNE_DATA] [-m MODEL] -o OUT [extra qwen-tune rm flags]" >&2; exit 2; }

HERE=$(cd "$(dirname "$0")" && pwd)
MODEL="" DATA="" FINETUNE="" OUT=""
# Our options come first; everything from the first other argument on goes to qwen-tune.
while [ $# -gt 0 ]; do
    case $1 in
        -h|--help) usage ;;
        -m) [ $# -ge 2 ] || usage; MODEL=$2; shift 2 ;;
        -d) [ $# -ge 2 ] || usage; DATA=$2; shift 2 ;;
        -f) [ $# -ge 2 ] || usage; FINETUNE=$2; shift 2 ;;
        -o) [ $# -ge 2 ] || usage; OUT=$2; shift 2 ;;
        *) break ;;
    esac
done
[ -n "$DATA" ] && [ -n "$OUT" ] || usage

PYTHON=${PYTHON:-python}
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$GPUS" -gt 0 ]; then
    set -- --bf16 True "$@"
    LAUNCH="torchrun --nproc_per_node $GPUS -m qwen_tune rm"
else
    LAUNCH="$PYTHON -m qwen_tune rm"
fi

stage() {  # stage START DATA OUTPUT_DIR [extra flags]
    start=$1 data=$2 dir=$3
    shift 3
    if [ -n "$start" ]; then set -- --model_name_or_path "$start" "$@"; fi
    echo "+ $LAUNCH --config $HERE/train_reward.yaml --data_path $data --output_dir $dir $*" >&2
    $LAUNCH --config "$HERE/train_reward.yaml" --data_path "$data" --output_dir "$dir" "$@"
}

if [ -z "$FINETUNE" ]; then
    stage "$MODEL" "$DATA" "$OUT" "$@"
else
    stage "$MODEL" "$DATA" "$OUT/pmp" "$@"
    stage "$OUT/pmp" "$FINETUNE" "$OUT" "$@"
fi
