#!/usr/bin/env bash
# Here (with PyPI): everything an air-gapped GPU host needs to run spmd_dp, under .gpu/ (git-ignored):
#   .gpu/bundle/   the offline vLLM 0.26 bundle in parts of <= 60 MiB (../shared/gpu/build_bundle.sh)
#   .gpu/wheels/   spmd_dp's pure-Python dependencies missing there (hydra-core, omegaconf, antlr4)
#   .gpu/models.tar.xz   weight-less Llama-3.1-8B/70B-shaped model folders for load_format=dummy
# Then carry them to the host (one bundle part per call) and run scripts/gpu/setup_device.sh there.
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED="${SHARED_GPU:-../shared/gpu}"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"  # the dummy models need tokenizers
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/.gpu/" >> .git/info/exclude; }
[ -f .gpu/bundle/SHA256SUMS ] || bash "$SHARED/build_bundle.sh" .gpu/bundle
mkdir -p .gpu/wheels .gpu/models
"$PY" -m pip download --quiet --no-deps -d .gpu/wheels hydra-core==1.3.2 omegaconf==2.3.0
"$PY" -m pip wheel --quiet --no-deps -w .gpu/wheels antlr4-python3-runtime==4.9.3
for shape in ${SHAPES:-llama8b llama70b}; do
    [ -f ".gpu/models/dummy-$shape/config.json" ] || "$PY" "$SHARED/make_dummy_model.py" --shape "$shape" --out ".gpu/models/dummy-$shape"
done
(cd .gpu/models && tar cJf ../models.tar.xz dummy-*)
ls -la .gpu/bundle .gpu/wheels .gpu/models.tar.xz
