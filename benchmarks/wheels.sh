#!/usr/bin/env bash
# The peers as wheels, for a machine that reaches no package index: the GPU machine of
# issue 16 (Python 3.12; torch, scipy, numpy, einops, tqdm, torchvision, opt-einsum and
# linear-operator already there). Run from anywhere; they land in .whl/ (ignored by git),
# which benchmarks/gpu.sh installs. The versions are those the CPU tables were run with.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
    --implementation cp --platform manylinux2014_x86_64 -d .whl \
    PyHessian==0.1 hessian-eigenthings==1.0.0a5 curvlinops-for-pytorch==3.0.1 \
    backpack-for-pytorch==1.7.1 einconv==0.1.0 unfoldNd==0.2.3
ls .whl
