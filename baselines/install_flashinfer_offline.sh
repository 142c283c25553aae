#!/usr/bin/env bash
# Install FlashInfer 0.6.6 on the GPU machine (no network) from the wheels in .whl/ and .whl/extra/
# (git-ignored; carry them: run(carry=[".whl"])). They were fetched on a networked machine with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl flashinfer-python==0.6.6 apache-tvm-ffi==0.1.15.post2 nvidia-cudnn-frontend==1.32.0
#   (same flags) -d .whl/extra nvidia-ml-py einops tabulate ninja requests urllib3 idna certifi charset-normalizer
# A dependency is installed only when the image lacks it, so the image's own packages are never replaced.
# Usage: bash baselines/install_flashinfer_offline.sh   (PYTHON=... to pick the interpreter)
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
have() { "$PY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
install() { "$PY" -m pip install -q --no-deps --no-index $1; }
# FlashInfer and its two pinned companions: always these exact versions.
install ".whl/flashinfer_python-0.6.6-*.whl .whl/apache_tvm_ffi-0.1.15.post2-*.whl .whl/nvidia_cudnn_frontend-1.32.0-*.whl"
# Import-time / JIT-time dependencies, only where the image lacks them (import name:wheel prefix).
for pair in pynvml:nvidia_ml_py einops:einops tabulate:tabulate requests:requests urllib3:urllib3 \
            idna:idna certifi:certifi charset_normalizer:charset_normalizer; do
  mod=${pair%%:*}; whl=${pair#*:}
  have "$mod" || { echo "installing $whl"; install ".whl/extra/${whl}-*.whl"; }
done
command -v ninja >/dev/null || { echo "installing ninja"; install ".whl/extra/ninja-*.whl"; }
command -v nvcc >/dev/null || [ -n "${CUDA_HOME:-}" ] || echo "WARNING: no nvcc on PATH and no CUDA_HOME: FlashInfer cannot JIT-compile"
"$PY" -c "import flashinfer; print('flashinfer', flashinfer.__version__, 'imports OK')"
