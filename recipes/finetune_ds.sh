#!/bin/sh
# Full-parameter fine-tuning under DeepSpeed ZeRO-3 on all local GPUs (or 2 CPU ranks), the seed's hyper-parameters.
#   sh recipes/finetune_ds.sh [-m MODEL] -d DATA [-o OUT] [more finetune.py options]
#   multi-node: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host0 MASTER_PORT=6001 sh recipes/finetune_ds.sh ...
# DS_CONFIG=recipes/ds_config_zero3_offload.json also offloads parameters and optimizer state to CPU memory.
. "$(dirname "$0")/_common.sh"
. "$(dirname "$0")/_launch.sh"
[ -z "$OUT" ] && OUT=output_qwen
PRECISION=""
[ "$HAS_GPU" = 1 ] && PRECISION="--bf16 True"
run $LAUNCH "$ROOT/finetune.py" ${MODEL:+--model_name_or_path "$MODEL"} --data_path "$DATA" --output_dir "$OUT" $PRECISION \
  --num_train_epochs 3 --per_device_train_batch_size 1 --per_device_eval_batch_size 1 \
  --gradient_accumulation_steps 16 --eval_strategy no --save_strategy steps --save_steps 1000 \
  --save_total_limit 10 --learning_rate 1e-5 --weight_decay 0.1 --adam_beta2 0.95 --warmup_ratio 0.01 \
  --lr_scheduler_type cosine --logging_steps 1 --model_max_length 512 --lazy_preprocess True \
  --gradient_checkpointing True --deepspeed "${DS_CONFIG:-$ROOT/recipes/ds_config_zero3.json}" "$@"
