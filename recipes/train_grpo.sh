#!/bin/sh
# RL with verifiable rewards: GRPO on an SFT policy (TRL's GRPOTrainer; all GPUs under torchrun when there are any).
#   sh recipes/train_grpo.sh -m SFT_OUT -d PROMPTS [-o OUT] [more qwen-tune grpo options]
# The reward functions come from the YAML (recipes/grpo_rewards.py); replace them with --reward_funcs my.py:fn,...
# A LoRA run on a large model: add --use_lora True.
USAGE="-m SFT_OUT -d PROMPTS [-o OUT] [more qwen-tune grpo options]"
. "$(dirname "$0")/_common.sh"
[ -z "$MODEL" ] && usage
[ -z "$OUT" ] && OUT=output_qwen_grpo
launcher grpo
# the YAML names recipes/grpo_rewards.py relative to the repository root: run it from there (or pass --reward_funcs)
run $LAUNCH --config "$ROOT/recipes/train_grpo.yaml" --policy "$MODEL" --prompts "$DATA" --output_dir "$OUT" $PRECISION "$@"
