#!/bin/sh
# Full-parameter fine-tuning under DeepSpeed ZeRO-3 on all local GPUs (or 2 CPU ranks), the seed's hyper-parameters.
#   sh recipes/finetune_ds.sh [-m MODEL] -d DATA [-o OUT] [more finetune.py options]
#   multi-node: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host0 MASTER_PORT=6001 sh recipes/finetune_ds.sh ...
. "$(dirname "$0")/_common.sh"
. "$(dirname "$0")/_launch.sh"
[ -z "$OUT" ] && OUT=output_qwen
# Hyper-parameters come from the YAML (one source, so the two cannot drift); without a GPU its bf16/fp16 becomes fp32.
run $LAUNCH "$ROOT/finetune.py" --config "$ROOT/recipes/finetune_full.yaml" ${MODEL:+--model_name_or_path "$MODEL"} \
  --data_path "$DATA" --output_dir "$OUT" \
  --deepspeed "${DS_CONFIG:-$ROOT/recipes/ds_config_zero3.json}" "$@"
