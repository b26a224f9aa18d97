#!/usr/bin/env bash
# Launch a dist-bregman job with torchrun (Lightning picks up torchrun's environment).
#
#   launch/torchrun.sh                                   # 2 processes here, CPU + gloo
#   launch/torchrun.sh --trainer.max_epochs=5            # extra args go to `dist-bregman fit`
#   NPROC=8 ACCELERATOR=gpu launch/torchrun.sh           # one node, 8 GPUs, NCCL
#   NNODES=2 RDZV_ENDPOINT=node0:29400 NPROC=8 ACCELERATOR=gpu launch/torchrun.sh
#                                                        # the same on every node
# Several nodes meet through a c10d rendezvous at RDZV_ENDPOINT, which hands out the node
# ranks itself, in the order the nodes join (torchrun ignores --node_rank there, warning).
set -euo pipefail
cd "$(dirname "$0")/.."

NPROC=${NPROC:-2}
NNODES=${NNODES:-1}
CONFIG=${CONFIG:-configs/digits_ddp.yaml}
ACCELERATOR=${ACCELERATOR:-cpu}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

if [ "$NNODES" -eq 1 ]; then
  rendezvous=(--standalone)   # a free port on this host: concurrent jobs do not collide
else
  rendezvous=(--nnodes="$NNODES" --rdzv_backend=c10d
              --rdzv_endpoint="${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port}"
              --rdzv_id="${RDZV_ID:-dist_bregman}")
fi

exec "$PYTHON" -m torch.distributed.run "${rendezvous[@]}" --nproc_per_node="$NPROC" \
  -m dist_bregman fit --config "$CONFIG" \
  --trainer.accelerator="$ACCELERATOR" --trainer.devices="$NPROC" --trainer.num_nodes="$NNODES" \
  "$@"
