# Shared by the recipes: parse the seed's -m MODEL -d DATA -o OUT, keep the rest for finetune.py.
# Dot-sourced: consumes those flags from "$@", leaving the pass-through arguments; sets MODEL, DATA, OUT, HAS_GPU, ROOT.
MODEL=""; DATA=""; OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    -m|--model) MODEL="$2"; shift 2 ;;
    -d|--data) DATA="$2"; shift 2 ;;
    -o|--output) OUT="$2"; shift 2 ;;
    *) break ;;
  esac
done

if [ -z "$DATA" ]; then
  echo "usage: sh $0 [-m MODEL] -d DATA [-o OUT] [more finetune.py options]" >&2
  echo "  (without -m: the embedded tiny Qwen2 model)" >&2
  exit 2
fi
HAS_GPU=$(python -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
ROOT=$(cd "$(dirname "$0")/.." && pwd)

run() {
  echo "+ $*" >&2
  exec "$@"
}
