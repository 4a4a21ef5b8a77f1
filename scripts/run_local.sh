#!/usr/bin/env bash
# One node: torchrun with one rank per GPU slice, a free rendezvous port, overrides passed through.
#
#   bash scripts/run_local.sh model_name=meta-llama/Llama-3.1-8B-Instruct input_data_path=/data/in.jsonl
#   GPUS_PER_DP_RANK=2 bash scripts/run_local.sh ...          # the seed's 2x2 on a 4-GPU node
#   NPROC_PER_NODE=2 bash scripts/run_local.sh inference_engine=echo   # no GPU needed
#
# Environment (defaults in brackets):
#   GPUS_PER_DP_RANK  GPUs per rank = vLLM tensor_parallel_size [1]; passed as engine_options.gpus_per_dp_rank
#   NPROC_PER_NODE    ranks [visible GPUs / GPUS_PER_DP_RANK, or 1 without GPUs: `python -m spmd_dp.launch.launcher ranks-per-node`]
#   MAX_RESTARTS      torchrun restarts after a failure; each restart resumes from the journal [0]
#   PYTHON            interpreter with spmd_dp installed [python3]
set -euo pipefail
GPUS_PER_DP_RANK="${GPUS_PER_DP_RANK:-1}"
NPROC_PER_NODE=$("${PYTHON:-python3}" -m spmd_dp.launch.launcher ranks-per-node "$GPUS_PER_DP_RANK") || exit 2
exec "${PYTHON:-python3}" -m torch.distributed.run \
    --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint=localhost:0 \
    --max-restarts="${MAX_RESTARTS:-0}" \
    -m spmd_dp "engine_options.gpus_per_dp_rank=$GPUS_PER_DP_RANK" "$@"
