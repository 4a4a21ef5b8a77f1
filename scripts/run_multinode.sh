#!/usr/bin/env bash
# Several nodes without a scheduler: run this on every node, with the same MASTER_ADDR.
#
#   node 0:  NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash scripts/run_multinode.sh model_name=... input_data_path=...
#   node 1:  NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 bash scripts/run_multinode.sh model_name=... input_data_path=...
#
# The c10d rendezvous at MASTER_ADDR:MASTER_PORT forms one world of NNODES x NPROC_PER_NODE ranks.
# engine_options.dp_master_ip / dp_master_port given as overrides are used as MASTER_ADDR / MASTER_PORT.
# Input and output_dir must be the same path on every node (a shared filesystem): every rank reads
# its batches from the input, rank 0 writes the output.
#
# Environment (defaults in brackets):
#   NNODES            nodes [1]          NODE_RANK   this node's index, 0..NNODES-1 [0]
#   MASTER_ADDR       the rendezvous host (node 0) [127.0.0.1]    MASTER_PORT  its port [29500]
#   GPUS_PER_DP_RANK  GPUs per rank [1]   NPROC_PER_NODE  ranks per node [visible GPUs / GPUS_PER_DP_RANK, or 1:
#                                         `python -m spmd_dp.launch.launcher ranks-per-node`, as in run_local.sh and slurm.sbatch]
#   RDZV_ID           a name for this job, the same on every node [spmd_dp]
#   MAX_RESTARTS      [0]                 PYTHON  [the repository's .venv/bin/python if there, else python3]
#
# Exit code: this node's ranks' (0; 2 bad config or input; 1 a failure; 143 after a drain on SIGTERM), not
# torchrun's own 1: torchrun runs through `python -m spmd_dp.launch.torchrun` (docs/failures.md, "Exit codes").
set -euo pipefail
source "$(dirname "$0")/python.sh"  # PYTHON: the interpreter that imports spmd_dp
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
for arg in "$@"; do  # seed 000's dp_master_ip / dp_master_port name the rendezvous
    case "$arg" in
        engine_options.dp_master_ip=*) [ "${arg#*=}" = null ] || MASTER_ADDR="${arg#*=}" ;;
        engine_options.dp_master_port=*) [ "${arg#*=}" = null ] || MASTER_PORT="${arg#*=}" ;;
    esac
done
GPUS_PER_DP_RANK="${GPUS_PER_DP_RANK:-1}"
NPROC_PER_NODE=$("$PYTHON" -m spmd_dp.launch.launcher ranks-per-node "$GPUS_PER_DP_RANK") || exit 2
exec "$PYTHON" -m spmd_dp.launch.torchrun \
    --nnodes="${NNODES:-1}" --node-rank="${NODE_RANK:-0}" --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="${RDZV_ID:-spmd_dp}" \
    --max-restarts="${MAX_RESTARTS:-0}" \
    -m spmd_dp "engine_options.gpus_per_dp_rank=$GPUS_PER_DP_RANK" "$@"
