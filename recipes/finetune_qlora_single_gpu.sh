#!/bin/sh
# Q-LoRA on one GPU (or the CPU): a 4-bit NF4 base (bitsandbytes) + LoRA, the seed's hyper-parameters.
#   sh recipes/finetune_qlora_single_gpu.sh [-m MODEL] -d DATA [-o OUT] [more finetune.py options]
. "$(dirname "$0")/_common.sh"
[ -z "$OUT" ] && OUT=output_qwen_qlora
# Hyper-parameters come from the YAML (one source, so the two cannot drift); without a GPU its bf16/fp16 becomes fp32.
run python "$ROOT/finetune.py" --config "$ROOT/recipes/finetune_qlora.yaml" ${MODEL:+--model_name_or_path "$MODEL"} \
  --data_path "$DATA" --output_dir "$OUT" "$@"
