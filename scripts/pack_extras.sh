#!/usr/bin/env bash
# Optional baselines' packages for a GPU machine without a network, packed in parts small enough to carry.
# A device call carries at most 64 MiB with the working tree (~19 MB), so a package set larger than one
# call travels as parts over several calls; `bash scripts/gpu_session.sh extras` on the warm machine keeps
# each carried part in /tmp/extras and unpacks a set once all its parts are there.
#
# Usage (repo root, a machine with a network and pip):  bash scripts/pack_extras.sh SET [SET ...]
#   cutlass  nvidia-cutlass-dsl 4.8.1 + its core (the python DSL), base and CUDA 13 libraries (fa_varlen; FlashInfer >= 0.7)  ~64 MB
#   fa4      flash-attn-4 4.0.0b36, quack-kernels 0.6.5, torch-c-dlpack-ext 0.1.5 (fa_varlen)          ~2 MB
#   vllm     vllm 0.34.0 without the compiled kernels its Triton attention does not load (vllm_unified) ~66 MB
#   fi072    flashinfer-python 0.7.2, cuda-tile, nccl4py, nccl-extensions -> site_fi072/ (FlashInfer 0.7.2
#            beside the pinned 0.6.6: SITE_PREFIX=/tmp/site_fi072 puts it first on the GPU machine)      ~92 MB
# Writes .extras/SET.tar.xz.<i>of<n> (PART_MB each, default 22: two parts and the tree fit one call).
# A wheel is a zip of its install tree (none of these has a .data folder), so unpacking it under site/ is
# what `pip install --no-deps --target site` does. Wheels: CPython 3.12, manylinux x86-64 (the GPU image).
set -euo pipefail
PART_MB=${PART_MB:-22}
PIP=${PIP:-python3 -m pip}
OUTDIR=.extras
mkdir -p "$OUTDIR"
PLAT=(--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64)

wheels_of() {
  case "$1" in
    cutlass) echo nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
                 nvidia-cutlass-dsl-libs-cu13==4.8.1 ;;
    fa4)     echo flash-attn-4==4.0.0b36 quack-kernels==0.6.5 torch-c-dlpack-ext==0.1.5 ;;
    vllm)    echo vllm==0.34.0 ;;
    fi072)   echo flashinfer-python==0.7.2 cuda-tile==1.7.0 nccl4py==0.6.0 nccl-extensions==0.1.0 ;;
    *) echo "unknown set '$1' (cutlass fa4 vllm fi072)" >&2; return 1 ;;
  esac
}
# What the vllm set leaves out: kernels of other backends and tools (~340 MB unpacked), never imported by
# vllm/v1/attention/ops/triton_unified_attention.py; its CUDA platform does load _C_stable_libtorch.
VLLM_DROP=(vllm/third_party vllm/vllm_flash_attn vllm/vllm-rs 'vllm/_moe_C*' 'vllm/_flashkda*'
           'vllm/_deepselect*' 'vllm/_flashmla*')

for set in "$@"; do
  specs=$(wheels_of "$set")
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  top=site; [ "$set" = fi072 ] && top=site_fi072
  echo "== $set: $specs"
  # shellcheck disable=SC2086
  $PIP download -q --no-deps -d "$tmp/whl" "${PLAT[@]}" $specs
  mkdir -p "$tmp/$top"
  for w in "$tmp"/whl/*.whl; do unzip -q -o "$w" -d "$tmp/$top"; done
  if [ "$set" = vllm ]; then (cd "$tmp/$top" && for p in "${VLLM_DROP[@]}"; do rm -rf $p; done); fi
  rm -f "$OUTDIR/$set".tar.xz.*
  tar -C "$tmp" -cf - "$top" | xz -9 -T0 | split -b "${PART_MB}m" -d -a 2 - "$OUTDIR/$set.tar.xz.p"
  parts=("$OUTDIR/$set".tar.xz.p*); n=${#parts[@]}
  for p in "${parts[@]}"; do i=${p##*.p}; mv "$p" "$OUTDIR/$set.tar.xz.$((10#$i + 1))of$n"; done
  ls -la "$OUTDIR/$set".tar.xz.*
  rm -rf "$tmp"; trap - EXIT
done
