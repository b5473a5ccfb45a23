# Shared by the recipes: parse the seed's -m MODEL -d DATA -o OUT (and -f FINETUNE_DATA for the reward
# model's second stage, -r REWARD_MODEL for PPO's), keep the rest for qwen-tune.
# Dot-sourced: consumes those flags from "$@", leaving the pass-through arguments;
# sets MODEL, DATA, FINETUNE, REWARD, OUT, GPUS, HAS_GPU, ROOT (and `launcher COMMAND`, LAUNCH and PRECISION).
# A recipe may set USAGE first (its own usage line); -f and -r are refused unless it names them in TAKES
# (e.g. TAKES="-r"), so that neither is silently ignored.
MODEL=""; DATA=""; FINETUNE=""; REWARD=""; OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    -m|--model) MODEL="$2"; shift 2 ;;
    -d|--data) DATA="$2"; shift 2 ;;
    -o|--output) OUT="$2"; shift 2 ;;
    -f|--finetune) FINETUNE="$2"; shift 2 ;;
    -r|--reward_model) REWARD="$2"; shift 2 ;;
    *) break ;;
  esac
done

usage() {
  if [ -n "$USAGE" ]; then
    echo "usage: sh $0 $USAGE" >&2
  else
    echo "usage: sh $0 [-m MODEL] -d DATA [-o OUT] [more qwen-tune options]" >&2
    echo "  (without -m: the embedded tiny Qwen2 model)" >&2
  fi
  exit 2
}
for flag in -f -r; do
  case "$flag" in -f) value=$FINETUNE ;; *) value=$REWARD ;; esac
  case " $TAKES " in
    *" $flag "*) ;;
    *) [ -n "$value" ] && { echo "$0 takes no $flag (only train_reward.sh takes -f, train_ppo.sh -r)" >&2; usage; } ;;
  esac
done
[ -z "$DATA" ] && usage
GPUS=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
HAS_GPU=$([ "$GPUS" -gt 0 ] && echo 1 || echo 0)
ROOT=$(cd "$(dirname "$0")/.." && pwd)

run() {
  echo "+ $*" >&2
  exec "$@"
}

# How a single-machine recipe runs `qwen-tune COMMAND`: on every visible GPU (torchrun) in bf16, else on the CPU in fp32.
# Sets LAUNCH and PRECISION (the dtype flag, before the user's own so that theirs wins).
launcher() {
  if [ "$HAS_GPU" = 1 ]; then
    LAUNCH="torchrun --nproc_per_node $GPUS -m qwen_tune $1"; PRECISION="--bf16 True"
  else
    LAUNCH="python -m qwen_tune $1"; PRECISION=""
  fi
}
