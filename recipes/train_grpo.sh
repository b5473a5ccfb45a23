#!/bin/sh
# RL with verifiable rewards: GRPO on an SFT policy (TRL's GRPOTrainer; all GPUs under torchrun when there are any).
#   sh recipes/train_grpo.sh SFT_OUT PROMPTS [OUTPUT_DIR] [extra qwen-tune grpo flags...]
# The reward functions come from the YAML (recipes/grpo_rewards.py); replace them with --reward_funcs my.py:fn,...
# A LoRA run on a large model: add --use_lora True.
set -eu
POLICY=${1:?usage: sh recipes/train_grpo.sh SFT_OUT PROMPTS [OUTPUT_DIR] [flags...]}
PROMPTS=${2:?prompts file: conversations ending with a user turn, plus the fields the rewards read}
OUTPUT_DIR=${3:-output_qwen_grpo}
shift $(( $# < 3 ? $# : 3 ))
ROOT=$(cd "$(dirname "$0")/.." && pwd)
GPUS=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$GPUS" -gt 0 ]; then
  set -- --bf16 True "$@"
  LAUNCH="torchrun --nproc_per_node $GPUS -m qwen_tune grpo"
else
  LAUNCH="python -m qwen_tune grpo"
fi
# the YAML names recipes/grpo_rewards.py relative to the repository root: run it from there (or pass --reward_funcs)
echo "+ $LAUNCH --config $ROOT/recipes/train_grpo.yaml --policy $POLICY --prompts $PROMPTS --output_dir $OUTPUT_DIR $*" >&2
exec $LAUNCH --config "$ROOT/recipes/train_grpo.yaml" --policy "$POLICY" --prompts "$PROMPTS" --output_dir "$OUTPUT_DIR" "$@"
