#!/bin/sh
# Q-LoRA (NF4 4-bit base + LoRA) under DeepSpeed ZeRO-2 on all local GPUs (or 2 CPU ranks).
#   sh recipes/finetune_qlora_ds.sh [-m MODEL] -d DATA [-o OUT] [more finetune.py options]
. "$(dirname "$0")/_common.sh"
. "$(dirname "$0")/_launch.sh"
[ -z "$OUT" ] && OUT=output_qwen_qlora
# Hyper-parameters come from the YAML (one source, so the two cannot drift); without a GPU its bf16/fp16 becomes fp32.
run $LAUNCH "$ROOT/finetune.py" --config "$ROOT/recipes/finetune_qlora.yaml" ${MODEL:+--model_name_or_path "$MODEL"} \
  --data_path "$DATA" --output_dir "$OUT" \
  --deepspeed "${DS_CONFIG:-$ROOT/recipes/ds_config_zero2.json}" "$@"
