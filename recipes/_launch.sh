# Shared by the multi-process recipes: a torchrun launch from the seed's environment variables.
# Dot-sourced after _common.sh. NPROC_PER_NODE defaults to every local GPU, or 2 CPU ranks (gloo) without one.
if [ -z "$NPROC_PER_NODE" ]; then
  NPROC_PER_NODE=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6001}
if [ "$HAS_GPU" != 1 ]; then
  # CPU ranks: one thread each, so that N ranks share the cores instead of fighting over them.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
LAUNCH="torchrun --nproc_per_node $NPROC_PER_NODE --nnodes $NNODES --node_rank $NODE_RANK --master_addr $MASTER_ADDR --master_port $MASTER_PORT"
