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
#   PYTHON            interpreter with spmd_dp installed [the repository's .venv/bin/python if there, else python3]
#
# Exit code: the ranks' (0; 2 bad config or input; 1 a failure; 143 after a drain on SIGTERM, 130 on Ctrl-C), not
# torchrun's own 1: torchrun runs through `python -m spmd_dp.launch.torchrun` (docs/failures.md, "Exit codes").
set -euo pipefail
source "$(dirname "$0")/python.sh"  # PYTHON: the interpreter that imports spmd_dp
GPUS_PER_DP_RANK="${GPUS_PER_DP_RANK:-1}"
NPROC_PER_NODE=$("$PYTHON" -m spmd_dp.launch.launcher ranks-per-node "$GPUS_PER_DP_RANK") || exit 2
exec "$PYTHON" -m spmd_dp.launch.torchrun \
    --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint=localhost:0 \
    --max-restarts="${MAX_RESTARTS:-0}" \
    -m spmd_dp "engine_options.gpus_per_dp_rank=$GPUS_PER_DP_RANK" "$@"
