#!/usr/bin/env bash
# Install the CPU build of torch into a venv (what `make` runs on a machine without a GPU).
#
#   scripts/install_torch_cpu.sh PYTHON VERSION
#
# PyTorch's CPU wheel index serves CPU-only builds; the default index serves, on x86-64 Linux, the
# CUDA build (about 15 nvidia-* packages, several GB, and a triton pin that clashes with ours). So:
# probe the CPU index with a short timeout; if it answers, take torch from it, otherwise (an offline
# mirror, a firewall) fall back to the default index, as pip alone would.
#   TORCH_CPU_INDEX        the CPU wheel index (default below)
#   TORCH_INDEX_TIMEOUT    seconds the probe waits (default 10)
#   PIP                    the pip command (default: PYTHON -m pip); tests put a stub here
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 PYTHON VERSION" >&2
    exit 2
fi
py=$1
version=$2
index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
timeout=${TORCH_INDEX_TIMEOUT:-10}
pip=${PIP:-"$py -m pip"}

# The index answers when its page for torch (PEP 503: <index>/torch/) lists this version.
probe() {
    "$py" - "$index" "$timeout" "$version" <<'PY'
import sys
import urllib.request

index, timeout, version = sys.argv[1].rstrip("/"), float(sys.argv[2]), sys.argv[3]
try:
    with urllib.request.urlopen(f"{index}/torch/", timeout=timeout) as r:
        ok = f"torch-{version}".encode() in r.read()
except Exception:
    ok = False
sys.exit(0 if ok else 1)
PY
}

if probe; then
    echo "torch==$version: the CPU build, from $index"
    $pip install -q --index-url "$index" "torch==$version"
else
    echo "torch==$version: $index does not answer within ${timeout}s (or lacks this version): falling back to the default index"
    $pip install -q "torch==$version"
fi
