#!/bin/sh
# ORPO on preference pairs: SFT and preference in one stage, no reference model (it can start from a base model).
#   sh recipes/train_orpo.sh [-m MODEL] -d PAIRS [-o OUT] [extra qwen-tune orpo flags, e.g. --use_lora True --beta 0.1]
# Without -m the embedded tiny Qwen2 model is used (a smoke test).
# Runs on every visible GPU (torchrun, bf16) if there is one, else on the CPU.
. "$(dirname "$0")/_common.sh"
[ -z "$OUT" ] && OUT=output_qwen_orpo
launcher orpo
run $LAUNCH --config "$ROOT/recipes/train_orpo.yaml" ${MODEL:+--model_name_or_path "$MODEL"} \
  --data_path "$DATA" --output_dir "$OUT" $PRECISION "$@"
