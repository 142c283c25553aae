#!/usr/bin/env bash
# Install FlashInfer on the GPU machine (no network) from wheels carried there (git-ignored; carry them:
# run(carry=[".whl"]); at most 64 MiB a call, so big sets travel over several calls).
#
#   bash baselines/install_flashinfer_offline.sh          # 0.6.6, the pin: from .whl/ and .whl/extra/
#   TARGET=.fi072 bash baselines/install_flashinfer_offline.sh 0.7.2
#                                                          # 0.7.2 from .whl/fi-0.7.2/ into TARGET (pip
#                                                          # --target), beside the venv's 0.6.6; select it
#                                                          # with PYTHONPATH=$TARGET:$TARGET/nvidia_cutlass_dsl/dsl_packages
#
# 0.6.6's wheels were fetched on a networked machine with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl flashinfer-python==0.6.6 apache-tvm-ffi==0.1.15.post2 nvidia-cudnn-frontend==1.32.0
#   (same flags) -d .whl/extra nvidia-ml-py einops tabulate ninja requests urllib3 idna certifi charset-normalizer
# 0.7.2's (its Requires-Dist beyond 0.6.6's, resolved 2026-12; torch stays the image's) with the same flags
# plus --platform manylinux_2_24_x86_64, -d .whl/fi-0.7.2:
#   flashinfer-python==0.7.2 apache-tvm-ffi==0.1.15.post2 nvidia-cudnn-frontend==1.32.0 cuda-python==13.4.4
#   cuda-bindings==13.4.4 cuda-core==1.2.2 cuda-pathfinder==1.9.1 cuda-tile==1.7.0 nccl4py==0.6.0
#   nccl-extensions==0.1.0 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
#   nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1      (216 MB in all)
# A dependency of 0.6.6 is installed only when the image lacks it, so the image's own packages are never
# replaced; 0.7.2 goes into its own TARGET directory, whole.
# PYTHON=... picks the interpreter.
set -euo pipefail
PY=${PYTHON:-python3}
VERSION=${1:-0.6.6}
cd "$(dirname "$0")/.."
have() { "$PY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
install() { "$PY" -m pip install -q --no-deps --no-index $1; }
case "$VERSION" in
0.6.6)
  # FlashInfer and its two pinned companions: always these exact versions.
  install ".whl/flashinfer_python-0.6.6-*.whl .whl/apache_tvm_ffi-0.1.15.post2-*.whl .whl/nvidia_cudnn_frontend-1.32.0-*.whl"
  # Import-time / JIT-time dependencies, only where the image lacks them (import name:wheel prefix).
  for pair in pynvml:nvidia_ml_py einops:einops tabulate:tabulate requests:requests urllib3:urllib3 \
              idna:idna certifi:certifi charset_normalizer:charset_normalizer; do
    mod=${pair%%:*}; whl=${pair#*:}
    have "$mod" || { echo "installing $whl"; install ".whl/extra/${whl}-*.whl"; }
  done
  command -v ninja >/dev/null || { echo "installing ninja"; install ".whl/extra/ninja-*.whl"; }
  ;;
0.7.2)
  : "${TARGET:?TARGET=<dir> is required for 0.7.2, installed beside the 0.6.6 of the venv}"
  D=.whl/fi-0.7.2
  wheels=""
  for w in flashinfer_python-0.7.2 apache_tvm_ffi-0.1.15.post2 nvidia_cudnn_frontend-1.32.0 cuda_python-13.4.4 \
           cuda_bindings-13.4.4 cuda_core-1.2.2 cuda_pathfinder-1.9.1 cuda_tile-1.7.0 nccl4py-0.6.0 \
           nccl_extensions-0.1.0 nvidia_cutlass_dsl-4.8.1 nvidia_cutlass_dsl_libs_base-4.8.1 \
           nvidia_cutlass_dsl_libs_core-4.8.1 nvidia_cutlass_dsl_libs_cu13-4.8.1; do
    f=$(ls $D/${w}-*.whl 2>/dev/null | head -1) || true
    [ -n "$f" ] || { echo "missing $D/${w}-*.whl (see the download command above)"; exit 1; }
    wheels="$wheels $f"
  done
  "$PY" -m pip install -q --no-deps --no-index --target "$TARGET" $wheels
  export PYTHONPATH="$TARGET:$TARGET/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}"
  echo "use it with: PYTHONPATH=$TARGET:$TARGET/nvidia_cutlass_dsl/dsl_packages"
  ;;
*) echo "unknown FlashInfer version $VERSION: 0.6.6 or 0.7.2"; exit 2 ;;
esac
command -v nvcc >/dev/null || [ -n "${CUDA_HOME:-}" ] || echo "WARNING: no nvcc on PATH and no CUDA_HOME: FlashInfer cannot JIT-compile"
"$PY" -c "import flashinfer; print('flashinfer', flashinfer.__version__, 'imports OK')"
