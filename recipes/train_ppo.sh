#!/bin/sh
# RLHF stage 2: PPO on an SFT policy against a reward model (one process; for N ranks under DeepSpeed see README "RLHF stage 2: PPO").
#   sh recipes/train_ppo.sh -m SFT_OUT -r RM_OUT -d PROMPTS [-o OUT] [more qwen-tune ppo options]
# A LoRA run on a large model: add --use_lora True (the reference is the base with the adapter off).
# A rule-based reward instead of a model: leave out -r and add --reward_funcs my_rewards.py:score
USAGE="-m SFT_OUT -r RM_OUT -d PROMPTS [-o OUT] [more qwen-tune ppo options] (-r may be replaced by --reward_funcs FILE:FN)"
TAKES="-r"
. "$(dirname "$0")/_common.sh"
[ -z "$MODEL" ] && usage
[ -z "$OUT" ] && OUT=output_qwen_ppo
run python -m qwen_tune ppo --config "$ROOT/recipes/train_ppo.yaml" --policy "$MODEL" ${REWARD:+--reward_model "$REWARD"} \
  --prompts "$DATA" --output_dir "$OUT" "$@"
