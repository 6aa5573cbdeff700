#!/usr/bin/env bash
# Distributed training on one or several nodes with torchrun.
#   bash tools/dist_train.sh CONFIG NUM_PROCS [train.py options]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT on every node.
# NCCL is used on GPUs; on CPU-only machines tools/train.py switches to gloo.
set -euo pipefail
CONFIG=$1
NPROCS=$2
shift 2
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
[[ -x "$ROOT/.venv/bin/python" && -z "${VIRTUAL_ENV:-}" ]] && PYTHON="$ROOT/.venv/bin/python"
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
    --nproc_per_node="$NPROCS" \
    "$ROOT/tools/train.py" "$CONFIG" --launcher pytorch "$@"
