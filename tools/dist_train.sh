#!/usr/bin/env bash
# Distributed training on one or several nodes with torchrun.
#   bash tools/dist_train.sh CONFIG NUM_PROCS [train.py options]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT on every node.
# NCCL is used on GPUs; on CPU-only machines tools/train.py switches to gloo.
set -euo pipefail
CONFIG=$1
NPROCS=$2
shift 2
exec bash "$(dirname "${BASH_SOURCE[0]}")/dist_run.sh" train.py "$NPROCS" "$CONFIG" "$@"
