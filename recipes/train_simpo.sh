#!/bin/sh
# SimPO on preference pairs: length-normalised rewards with a target margin, no reference model.
#   sh recipes/train_simpo.sh [-m SFT_MODEL] -d PAIRS [-o OUT] [extra qwen-tune simpo flags, e.g. --use_lora True --simpo_gamma 0.5]
# Start from your SFT model (-m); without -m the embedded tiny Qwen2 model is used (a smoke test).
# Runs on every visible GPU (torchrun, bf16) if there is one, else on the CPU.
. "$(dirname "$0")/_common.sh"
[ -z "$OUT" ] && OUT=output_qwen_simpo
launcher simpo
run $LAUNCH --config "$ROOT/recipes/train_simpo.yaml" ${MODEL:+--model_name_or_path "$MODEL"} \
  --data_path "$DATA" --output_dir "$OUT" $PRECISION "$@"
