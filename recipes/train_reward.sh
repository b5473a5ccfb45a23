#!/bin/sh
# Train a reward model, Qwen's two stages in one go:
#   stage 1 (preference model pretraining) on -d PMP_DATA, then, with -f, stage 2 (fine-tuning on
#   high-quality comparisons) on FINETUNE_DATA starting from stage 1's output (written to OUT/pmp).
#   sh recipes/train_reward.sh [-m MODEL] -d PMP_DATA [-f FINETUNE_DATA] [-o OUT] [extra qwen-tune rm flags]
# Without -m it starts from the embedded tiny Qwen2 model (a smoke test). Extra flags go to both stages.
# Runs on every visible GPU (torchrun, bf16) if there is one, else on the CPU.
set -e
TAKES="-f"
. "$(dirname "$0")/_common.sh"
[ -z "$OUT" ] && OUT=output_qwen_rm
launcher rm

stage() {  # stage START DATA OUTPUT_DIR [extra flags]
  start=$1 data=$2 dir=$3
  shift 3
  echo "+ $LAUNCH --config $ROOT/recipes/train_reward.yaml ${start:+--model_name_or_path $start} --data_path $data --output_dir $dir${PRECISION:+ $PRECISION} $*" >&2
  $LAUNCH --config "$ROOT/recipes/train_reward.yaml" ${start:+--model_name_or_path "$start"} --data_path "$data" --output_dir "$dir" $PRECISION "$@"
}

if [ -z "$FINETUNE" ]; then
  stage "$MODEL" "$DATA" "$OUT" "$@"
else
  stage "$MODEL" "$DATA" "$OUT/pmp" "$@"
  stage "$OUT/pmp" "$FINETUNE" "$OUT" "$@"
fi
