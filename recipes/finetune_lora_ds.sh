#!/bin/sh
# LoRA under DeepSpeed ZeRO-2 (DS_CONFIG=recipes/ds_config_zero3.json for ZeRO-3) on all local GPUs (or 2 CPU ranks).
#   sh recipes/finetune_lora_ds.sh [-m MODEL] -d DATA [-o OUT] [more finetune.py options]
. "$(dirname "$0")/_common.sh"
. "$(dirname "$0")/_launch.sh"
[ -z "$OUT" ] && OUT=output_qwen_lora
# Hyper-parameters come from the YAML (one source, so the two cannot drift); without a GPU its bf16/fp16 becomes fp32.
run $LAUNCH "$ROOT/finetune.py" --config "$ROOT/recipes/finetune_lora.yaml" ${MODEL:+--model_name_or_path "$MODEL"} \
  --data_path "$DATA" --output_dir "$OUT" \
  --deepspeed "${DS_CONFIG:-$ROOT/recipes/ds_config_zero2.json}" "$@"
