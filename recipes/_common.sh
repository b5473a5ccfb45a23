# Shared by the recipes: parse the seed's -m MODEL -d DATA -o OUT (and -f FINETUNE_DATA for the reward
# model's second stage), keep the rest for qwen-tune.
# Dot-sourced: consumes those flags from "$@", leaving the pass-through arguments;
# sets MODEL, DATA, FINETUNE, OUT, GPUS, HAS_GPU, ROOT.
MODEL=""; DATA=""; FINETUNE=""; OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    -m|--model) MODEL="$2"; shift 2 ;;
    -d|--data) DATA="$2"; shift 2 ;;
    -o|--output) OUT="$2"; shift 2 ;;
    -f|--finetune) FINETUNE="$2"; shift 2 ;;
    *) break ;;
  esac
done

if [ -z "$DATA" ]; then
  echo "usage: sh $0 [-m MODEL] -d DATA [-o OUT] [more qwen-tune options]" >&2
  echo "  (without -m: the embedded tiny Qwen2 model)" >&2
  exit 2
fi
GPUS=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
HAS_GPU=$([ "$GPUS" -gt 0 ] && echo 1 || echo 0)
ROOT=$(cd "$(dirname "$0")/.." && pwd)

run() {
  echo "+ $*" >&2
  exec "$@"
}
