#!/bin/sh
# On-policy distillation: the model (-m, the student) learns to answer like a larger teacher with the same tokenizer, on
# its own sampled replies to the prompts (-d).
#   sh recipes/train_distill.sh [-m STUDENT] -d PROMPTS [-o OUT] --teacher TEACHER [extra qwen-tune distill flags,
#   e.g. --use_lora True, --beta 0.5, --lmbda 0.5 --seq_kd True]
# Without -m the embedded tiny Qwen2 model is the student (a smoke test).
# Runs on every visible GPU (torchrun, bf16) if there is one, else on the CPU.
USAGE="[-m STUDENT] -d PROMPTS [-o OUT] --teacher TEACHER [more qwen-tune distill options]"
. "$(dirname "$0")/_common.sh"
[ -z "$OUT" ] && OUT=output_qwen_distill
launcher distill
run $LAUNCH --config "$ROOT/recipes/train_distill.yaml" ${MODEL:+--model_name_or_path "$MODEL"} \
  --data_path "$DATA" --output_dir "$OUT" $PRECISION "$@"
