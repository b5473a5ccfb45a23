#!/bin/sh
# Direct Preference Optimization on preference pairs: the lighter alternative to reward model + PPO.
#   sh recipes/train_dpo.sh [-m SFT_MODEL] -d PAIRS [-o OUT] [extra qwen-tune dpo flags, e.g. --use_lora True --beta 0.1]
# Start from your SFT model (-m); without -m the embedded tiny Qwen2 model is used (a smoke test).
# Runs on every visible GPU (torchrun, bf16) if there is one, else on the CPU.
. "$(dirname "$0")/_common.sh"
[ -z "$OUT" ] && OUT=output_qwen_dpo
if [ "$HAS_GPU" = 1 ]; then
  set -- --bf16 True "$@"
  LAUNCH="torchrun --nproc_per_node $GPUS -m qwen_tune dpo"
else
  LAUNCH="python -m qwen_tune dpo"
fi
run $LAUNCH --config "$ROOT/recipes/train_dpo.yaml" ${MODEL:+--model_name_or_path "$MODEL"} \
  --data_path "$DATA" --output_dir "$OUT" "$@"
