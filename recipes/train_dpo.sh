#!/bin/sh
# Direct Preference Optimization on preference pairs: the lighter alternative to reward model + PPO.
# Usage: sh recipes/train_dpo.sh -d PAIRS [-m MODEL] -o OUT [extra qwen-tune dpo flags, e.g. --use_lora True --beta 0.1]
# Start from your SFT model (-m); without -m the embedded tiny Qwen2 model is used (a smoke test).
# Runs on every visible GPU (torchrun, bf16) if there is one, else on the CPU.
set -eu

usage() { echo "usage: sh $0 -d PAIRS [-m MODEL] -o OUT [extra qwen-tune dpo flags]" >&2; exit 2; }

HERE=$(cd "$(dirname "$0")" && pwd)
MODEL="" DATA="" OUT=""
# Our options come first; everything from the first other argument on goes to qwen-tune.
while [ $# -gt 0 ]; do
    case $1 in
        -h|--help) usage ;;
        -m) [ $# -ge 2 ] || usage; MODEL=$2; shift 2 ;;
        -d) [ $# -ge 2 ] || usage; DATA=$2; shift 2 ;;
        -o) [ $# -ge 2 ] || usage; OUT=$2; shift 2 ;;
        *) break ;;
    esac
done
[ -n "$DATA" ] && [ -n "$OUT" ] || usage

PYTHON=${PYTHON:-python}
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$GPUS" -gt 0 ]; then
    set -- --bf16 True "$@"
    LAUNCH="torchrun --nproc_per_node $GPUS -m qwen_tune dpo"
else
    LAUNCH="$PYTHON -m qwen_tune dpo"
fi
if [ -n "$MODEL" ]; then set -- --model_name_or_path "$MODEL" "$@"; fi

echo "+ $LAUNCH --config $HERE/train_dpo.yaml --data_path $DATA --output_dir $OUT $*" >&2
exec $LAUNCH --config "$HERE/train_dpo.yaml" --data_path "$DATA" --output_dir "$OUT" "$@"
