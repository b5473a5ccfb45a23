#!/bin/sh
# GRPO under DeepSpeed on all local GPUs (or 2 CPU ranks): ZeRO-2, or ZeRO-3 with DS_CONFIG=recipes/ds_config_zero3.json.
#   sh recipes/train_grpo_ds.sh -m SFT_OUT -d PROMPTS [-o OUT] [more qwen-tune grpo options]
# Hyper-parameters and the reward functions come from recipes/train_grpo.yaml (run from the repository root).
USAGE="-m SFT_OUT -d PROMPTS [-o OUT] [more qwen-tune grpo options]"
. "$(dirname "$0")/_common.sh"
[ -z "$MODEL" ] && usage
. "$(dirname "$0")/_launch.sh"
[ -z "$OUT" ] && OUT=output_qwen_grpo
PRECISION=""
[ "$HAS_GPU" = 1 ] && PRECISION="--bf16 True"
run $LAUNCH -m qwen_tune grpo --config "$ROOT/recipes/train_grpo.yaml" --policy "$MODEL" --prompts "$DATA" --output_dir "$OUT" \
  $PRECISION --deepspeed "${DS_CONFIG:-$ROOT/recipes/ds_config_zero2.json}" "$@"
