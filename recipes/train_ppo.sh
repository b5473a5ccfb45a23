#!/bin/sh
# RLHF stage 2: PPO on an SFT policy against a reward model (one process; for N ranks under DeepSpeed see README "RLHF stage 2: PPO").
#   sh recipes/train_ppo.sh SFT_OUT RM_OUT PROMPTS [OUTPUT_DIR] [extra qwen-tune ppo flags...]
# A LoRA run on a large model: add --use_lora True (the reference is the base with the adapter off).
# A rule-based reward instead of a model: replace --reward_model with --reward_fn my_rewards.py:score
set -eu
POLICY=${1:?usage: sh recipes/train_ppo.sh SFT_OUT RM_OUT PROMPTS [OUTPUT_DIR] [flags...]}
REWARD_MODEL=${2:?reward model directory (qwen-tune rm output)}
PROMPTS=${3:?prompts file: conversations ending with a user turn}
OUTPUT_DIR=${4:-output_qwen_ppo}
shift $(( $# < 4 ? $# : 4 ))
DIR=$(cd "$(dirname "$0")" && pwd)

python -m qwen_tune ppo --config "$DIR/train_ppo.yaml" \
    --policy "$POLICY" \
    --reward_model "$REWARD_MODEL" \
    --prompts "$PROMPTS" \
    --output_dir "$OUTPUT_DIR" \
    "$@"
