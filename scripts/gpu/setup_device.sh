#!/usr/bin/env bash
# On the air-gapped GPU host, from the repository root, after scripts/gpu/prepare.sh's files arrived:
#   bash scripts/gpu/setup_device.sh [PARTS_DIR]      (default /tmp/parts: bundle parts + SHA256SUMS)
# Installs the vLLM bundle into /tmp/vllm_site, spmd_dp's missing pure-Python deps into /tmp/spmd_site,
# unpacks the dummy model folders into /tmp. Then, in every shell that runs spmd_dp:
#   source scripts/gpu/env.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PARTS="${1:-/tmp/parts}"
if [ ! -f /tmp/vllm_site/.bundle/env.sh ]; then
    cp -n .gpu/bundle/install_bundle.sh .gpu/bundle/SHA256SUMS "$PARTS"/ 2>/dev/null || true
    bash "$PARTS/install_bundle.sh" "$PARTS" /tmp/vllm_site
fi
python3 -m pip install --quiet --no-deps --no-index --target /tmp/spmd_site .gpu/wheels/*.whl
tar xJf .gpu/models.tar.xz -C /tmp
source scripts/gpu/env.sh
python3 -c "import vllm, hydra, spmd_dp, torch; print('setup_device: vllm', vllm.__version__, 'torch', torch.__version__, 'GPUs', torch.cuda.device_count())"
