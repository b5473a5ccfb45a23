#!/bin/sh
# Every recipe for a few steps on a real Qwen shape (random weights: nothing is downloaded), each output reloaded
# in a fresh process and made to answer (or, the reward model, to score). Made for a GPU machine: the recipes use
# every local GPU (torchrun, bf16, ZeRO-2/3 over NCCL, bitsandbytes 4-bit on CUDA). On a CPU it checks the same
# path on 2 gloo ranks (use the embedded shape there: 6 minutes on 2 cores).
#   sh bench/gpu_smoke.sh [SHAPE] [WORK_DIR]       SHAPE: qwen2.5-0.5b (default), qwen3-0.6b, embedded
# Prints one line per recipe (seconds, and the reload's first words) and the device, and exits non-zero if any failed.
set -u
SHAPE=${1:-qwen2.5-0.5b}
WORK=${2:-/tmp/qwen_tune_gpu_smoke}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
mkdir -p "$WORK"
python bench/shapes.py "$SHAPE" "$WORK/$SHAPE" > "$WORK/shape.txt" || exit 1
MODEL=$(tail -n 1 "$WORK/shape.txt")  # its last line (libraries may print before it)
FEW="--max_steps 3 --save_strategy no --report_to none --overwrite_output_dir True"
SFT=data/sft_example.json
FAILED=0

step() {  # step NAME OUTPUT_DIR COMMAND...: run a recipe, then reload its output
  name=$1 out=$2
  shift 2
  start=$(date +%s)
  if "$@" > "$WORK/$name.log" 2>&1 && reply=$(python bench/reload_check.py "$out" 2>> "$WORK/$name.log"); then
    echo "ok    $name  $(( $(date +%s) - start )) s  reloaded: $reply"
  else
    echo "FAIL  $name  (log: $WORK/$name.log)"
    FAILED=1
  fi
}

python -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only', '|', torch.__version__)"
step lora "$WORK/lora" sh recipes/finetune_lora_single_gpu.sh -m "$MODEL" -d $SFT -o "$WORK/lora" $FEW
step qlora "$WORK/qlora" sh recipes/finetune_qlora_single_gpu.sh -m "$MODEL" -d $SFT -o "$WORK/qlora" $FEW
step full-zero3 "$WORK/full-zero3" sh recipes/finetune_ds.sh -m "$MODEL" -d $SFT -o "$WORK/full-zero3" $FEW
step full-zero2 "$WORK/full-zero2" env DS_CONFIG=recipes/ds_config_zero2.json \
  sh recipes/finetune_ds.sh -m "$MODEL" -d $SFT -o "$WORK/full-zero2" $FEW
step lora-zero2 "$WORK/lora-zero2" sh recipes/finetune_lora_ds.sh -m "$MODEL" -d $SFT -o "$WORK/lora-zero2" $FEW
step qlora-zero2 "$WORK/qlora-zero2" sh recipes/finetune_qlora_ds.sh -m "$MODEL" -d $SFT -o "$WORK/qlora-zero2" $FEW
step rm "$WORK/rm" sh recipes/train_reward.sh -m "$MODEL" -d data/preference_example.jsonl -o "$WORK/rm" $FEW
step dpo "$WORK/dpo" sh recipes/train_dpo.sh -m "$WORK/full-zero3" -d data/preference_example.jsonl -o "$WORK/dpo" \
  --use_lora True $FEW
step ppo "$WORK/ppo" sh recipes/train_ppo.sh -m "$WORK/full-zero3" -r "$WORK/rm" -d data/prompts_example.jsonl -o "$WORK/ppo" \
  --per_device_train_batch_size 4 --max_new_tokens 16 --ppo_epochs 1 --overwrite_output_dir True
step grpo "$WORK/grpo" sh recipes/train_grpo.sh -m "$WORK/full-zero3" -d data/grpo_example.jsonl -o "$WORK/grpo" \
  --max_steps 2 --max_completion_length 16 --report_to none --overwrite_output_dir True
exit $FAILED
