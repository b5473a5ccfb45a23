#!/bin/sh
# Direct Preference Optimization on preference pairs: the lighter alternative to reward model + PPO.
#   sh recipes/train_dpo.sh [-m SFT_MODEL] -d PAIRS [-o OUT] [extra qwen-tune dpo flags, e.g. --use_lora True --beta 0.1]
# Start from your SFT model (-m); without -m the embedded tiny Qwen2 model is used (a smoke test).
# Runs on every visible GPU (torchrun, bf16) if there is one, else on the CPU.
. "$(dirname "$0")/_common.sh"
[ -z "$OUT" ] && OUT=output_qwen_dpo
launcher dpo
run $LAUNCH --config "$ROOT/recipes/train_dpo.yaml" ${MODEL:+--model_name_or_path "$MODEL"} \
  --data_path "$DATA" --output_dir "$OUT" $PRECISION "$@"
