#!/usr/bin/env bash
# Here (with PyPI): everything an air-gapped GPU host needs to run spmd_dp, under .gpu/ (git-ignored):
#   .gpu/bundle/   the offline vLLM 0.26 bundle in parts of <= 60 MiB (../shared/gpu/build_bundle.sh)
#   .gpu/wheels/   spmd_dp's pure-Python dependencies missing there (hydra-core, omegaconf, antlr4)
#   .gpu/models.tar.xz   weight-less model folders for load_format=dummy: Llama-3.1-8B/70B shapes (SHAPES=, default
#                        "llama8b llama70b") and vision-language ones (VLM_SHAPES=, e.g. qwen2vl-7b: spmd_dp.models.vision)
#   For the images benchmark alone (scripts/bench/images.py): SHAPES= VLM_SHAPES=qwen2vl-7b bash scripts/gpu/prepare.sh
# Then carry them to the host (one bundle part per call) and run scripts/gpu/setup_device.sh there.
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED="${SHARED_GPU:-../shared/gpu}"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"  # the dummy models need tokenizers
EXCLUDE="$(git rev-parse --git-common-dir)/info/exclude"   # a worktree's .git is a file: its exclude is the common one
grep -qx "/.gpu/" "$EXCLUDE" 2>/dev/null || { mkdir -p "$(dirname "$EXCLUDE")"; echo "/.gpu/" >> "$EXCLUDE"; }
[ -f .gpu/bundle/SHA256SUMS ] || bash "$SHARED/build_bundle.sh" .gpu/bundle
mkdir -p .gpu/wheels .gpu/models
"$PY" -m pip download --quiet --no-deps -d .gpu/wheels hydra-core==1.3.2 omegaconf==2.3.0
"$PY" -m pip wheel --quiet --no-deps -w .gpu/wheels antlr4-python3-runtime==4.9.3
rm -f .gpu/models.list
for shape in ${SHAPES-llama8b llama70b}; do
    [ -f ".gpu/models/dummy-$shape/config.json" ] || "$PY" "$SHARED/make_dummy_model.py" --shape "$shape" --out ".gpu/models/dummy-$shape"
    echo "dummy-$shape" >> .gpu/models.list
done
for shape in ${VLM_SHAPES-}; do
    [ -f ".gpu/models/dummy-$shape/config.json" ] || PYTHONPATH="$PWD" "$PY" -m spmd_dp.models.vision --shape "$shape" --out ".gpu/models/dummy-$shape"
    echo "dummy-$shape" >> .gpu/models.list
done
(cd .gpu/models && tar cJf ../models.tar.xz $(cat ../models.list))
ls -la .gpu/bundle .gpu/wheels .gpu/models.tar.xz
