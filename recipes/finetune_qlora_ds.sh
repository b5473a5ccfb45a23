#!/bin/sh
# Q-LoRA (NF4 4-bit base + LoRA) under DeepSpeed ZeRO-2 on all local GPUs (or 2 CPU ranks).
#   sh recipes/finetune_qlora_ds.sh [-m MODEL] -d DATA [-o OUT] [more finetune.py options]
. "$(dirname "$0")/_common.sh"
. "$(dirname "$0")/_launch.sh"
[ -z "$OUT" ] && OUT=output_qwen_qlora
PRECISION=""
[ "$HAS_GPU" = 1 ] && PRECISION="--fp16 True"
run $LAUNCH "$ROOT/finetune.py" ${MODEL:+--model_name_or_path "$MODEL"} --data_path "$DATA" --output_dir "$OUT" $PRECISION \
  --num_train_epochs 5 --per_device_train_batch_size 2 --per_device_eval_batch_size 1 \
  --gradient_accumulation_steps 8 --eval_strategy no --save_strategy steps --save_steps 1000 \
  --save_total_limit 10 --learning_rate 2e-4 --weight_decay 0.1 --adam_beta2 0.95 --warmup_ratio 0.01 \
  --lr_scheduler_type cosine --logging_steps 1 --model_max_length 512 --lazy_preprocess True \
  --gradient_checkpointing True --use_lora True --q_lora True --deepspeed "${DS_CONFIG:-$ROOT/recipes/ds_config_zero2.json}" "$@"
