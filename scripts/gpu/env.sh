# source scripts/gpu/env.sh   (on the GPU host, after scripts/gpu/setup_device.sh)
source /tmp/vllm_site/.bundle/env.sh
export PYTHONPATH="$(pwd):/tmp/spmd_site:${PYTHONPATH:-}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
