#!/usr/bin/env bash
# Multi-node (or single-node, multi-process) launch of launch/train.py.
#
# Run the SAME command on every node, from the repository root, with the same arguments (a relaunch
# after a failure resumes from the newest complete checkpoint); every node
# needs the repo, the installed environment, and the prepared corpus cache (the local rank 0 of each
# node prepares it on first use: `stateless-opt-data prepare` beforehand avoids the race), and
# checkpoint.dir must be on a filesystem all nodes share.
#
#   # 2 nodes x 8 GPUs, FSDP2, static rendezvous (node ranks given explicitly):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.1.2.3 MASTER_PORT=29500 bash launch/multinode.sh \
#       -c configs/llama_130m.yaml --backend fsdp2          # on the first node
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.1.2.3 MASTER_PORT=29500 bash launch/multinode.sh \
#       -c configs/llama_130m.yaml --backend fsdp2          # on the second node
#
#   # elastic c10d rendezvous (node ranks assigned by the rendezvous; leave NODE_RANK unset):
#   NNODES=2 RDZV_ENDPOINT=10.1.2.3:29400 RDZV_ID=run42 bash launch/multinode.sh -c configs/llama_350m.yaml --backend ddp
#
#   # DeepSpeed ZeRO through torchrun (deepspeed.init_distributed reads torchrun's environment):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.1.2.3 bash launch/multinode.sh -c configs/llama_130m.yaml \
#       --backend deepspeed --backend.deepspeed_config configs/<zero json>
#
#   # ... or through DeepSpeed's own launcher, started once on the first node; it reaches the other
#   # hosts of HOSTFILE ("host slots=8" lines) over passwordless ssh/pdsh:
#   LAUNCHER=deepspeed HOSTFILE=hostfile MASTER_ADDR=10.1.2.3 bash launch/multinode.sh -c ... --backend deepspeed ...
#
# Environment (defaults in brackets):
#   NNODES [1]            number of nodes
#   NODE_RANK             this node's rank, 0..NNODES-1 (static rendezvous); unset: c10d rendezvous
#   MASTER_ADDR [127.0.0.1], MASTER_PORT [29500]   node 0's address/port (static rendezvous)
#   RDZV_ENDPOINT [MASTER_ADDR:MASTER_PORT], RDZV_ID [stateless_opt]   c10d rendezvous
#   NPROC_PER_NODE        processes per node [visible GPUs, else 2 CPU processes]
#   MAX_RESTARTS [0]      torchrun restarts the workers up to this many times after a failure; each
#                         restart resumes from the newest complete checkpoint (--resume auto). Uses
#                         the c10d rendezvous (node ranks assigned by it) with a fresh store per restart
#   LAUNCHER [torchrun]   torchrun | deepspeed
#   HOSTFILE              DeepSpeed launcher hostfile (LAUNCHER=deepspeed)
#   NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME   set these to the inter-node interface if needed
#   DRY_RUN=1             print the command instead of running it
set -euo pipefail

cd "$(dirname "$0")/.."

NNODES="${NNODES:-1}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
LAUNCHER="${LAUNCHER:-torchrun}"
PYTHON="${PYTHON:-python}"

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')"
fi
# One OpenMP thread per rank unless the caller chose (launch.train sets torch threads itself on CPU).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

case "$LAUNCHER" in
  torchrun)
    cmd=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE"
         --max-restarts "${MAX_RESTARTS:-0}")
    if [[ "${MAX_RESTARTS:-0}" != "0" ]]; then
      # Restarts need the c10d rendezvous (the static one never restarts the other nodes' workers) with
      # a fresh store per restart: torchrun otherwise reuses one and a restarted process group can read
      # the previous attempt's addresses (pytorch#135712). Node ranks then come from the rendezvous.
      export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
      [[ -n "${NODE_RANK:-}" ]] && echo "multinode.sh: MAX_RESTARTS=$MAX_RESTARTS: c10d rendezvous, NODE_RANK ignored" >&2
      cmd+=(--rdzv-backend c10d --rdzv-endpoint "${RDZV_ENDPOINT:-$MASTER_ADDR:$MASTER_PORT}"
            --rdzv-id "${RDZV_ID:-stateless_opt}")
    elif [[ -n "${NODE_RANK:-}" ]]; then
      cmd+=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
    else
      cmd+=(--rdzv-backend c10d --rdzv-endpoint "${RDZV_ENDPOINT:-$MASTER_ADDR:$MASTER_PORT}"
            --rdzv-id "${RDZV_ID:-stateless_opt}")
    fi
    cmd+=(-m launch.train "$@")
    ;;
  deepspeed)
    cmd=(deepspeed --num_nodes "$NNODES" --num_gpus "$NPROC_PER_NODE"
         --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
    [[ -n "${HOSTFILE:-}" ]] && cmd+=(--hostfile "$HOSTFILE")
    cmd+=(--no_local_rank --module launch.train "$@")   # ranks come from the environment
    ;;
  *)
    echo "LAUNCHER must be torchrun or deepspeed, got '$LAUNCHER'" >&2
    exit 2
    ;;
esac

if [[ "${DRY_RUN:-0}" == "1" ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
