#!/bin/sh
# KTO on replies labelled desirable (true) or undesirable (false) one at a time (thumbs up / down): no pairs needed.
#   sh recipes/train_kto.sh [-m SFT_MODEL] -d REPLIES [-o OUT] [extra qwen-tune kto flags, e.g. --use_lora True --beta 0.1]
# Start from your SFT model (-m); without -m the embedded tiny Qwen2 model is used (a smoke test).
# Runs on every visible GPU (torchrun, bf16) if there is one, else on the CPU.
. "$(dirname "$0")/_common.sh"
[ -z "$OUT" ] && OUT=output_qwen_kto
launcher kto
run $LAUNCH --config "$ROOT/recipes/train_kto.yaml" ${MODEL:+--model_name_or_path "$MODEL"} \
  --data_path "$DATA" --output_dir "$OUT" $PRECISION "$@"
