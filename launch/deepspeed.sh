#!/usr/bin/env bash
# Launch a dist-bregman job with the deepspeed launcher (DeepSpeed ZeRO configs).
#
#   launch/deepspeed.sh                                   # ZeRO-3, 2 processes here, CPU + gloo
#   CONFIG=configs/digits_zero1.yaml launch/deepspeed.sh --trainer.max_epochs=5
#   NPROC=8 ACCELERATOR=gpu launch/deepspeed.sh           # one node, 8 GPUs, NCCL
#   HOSTFILE=hosts NPROC=8 ACCELERATOR=gpu launch/deepspeed.sh   # several nodes (see
#                                                         # DeepSpeed's hostfile format)
# The launcher starts one process per GPU, or only one on CPU unless told --num_gpus: NPROC
# sets it either way. It defaults to port 29500, so a free port is chosen unless
# MASTER_PORT is set. --no_local_rank: Lightning reads LOCAL_RANK from the environment.
# With a hostfile, NNODES (default: every host listed) goes to the launcher and to the
# Trainer's num_nodes; dist-bregman reads each node's rank from the launcher (CROSS_RANK).
set -euo pipefail
cd "$(dirname "$0")/.."

NPROC=${NPROC:-2}
CONFIG=${CONFIG:-configs/digits_zero3.yaml}
ACCELERATOR=${ACCELERATOR:-cpu}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
DEEPSPEED=${DEEPSPEED:-$(dirname "$PYTHON")/deepspeed}
MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
if [ "$ACCELERATOR" = cpu ]; then
  export DS_ACCELERATOR=cpu
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions}
fi
hosts=()
if [ -n "${HOSTFILE:-}" ]; then
  NNODES=${NNODES:-$(grep -cvE '^[[:space:]]*(#|$)' "$HOSTFILE")}
  hosts=(--hostfile "$HOSTFILE" --num_nodes "$NNODES")
else
  NNODES=1
fi

exec "$DEEPSPEED" "${hosts[@]}" --num_gpus "$NPROC" --master_port "$MASTER_PORT" --no_local_rank \
  --module dist_bregman fit --config "$CONFIG" \
  --trainer.accelerator="$ACCELERATOR" --trainer.devices="$NPROC" --trainer.num_nodes="$NNODES" "$@"
