#!/usr/bin/env bash
# A GPU run on a machine without a network (the H100 runs of docs/h100_notes.md): set up the image's python
# with wheels carried in .whl/, then run the given stages.
# Usage (repo root, on the GPU machine):  bash scripts/h100_session.sh STAGE [STAGE ...]
#   env            GPU, driver, versions, which python packages the image has
#   fi_warm_bg     start FlashInfer's JIT build + smoke check in the background (log: $OUT/fi_warm.log)
#   fi_wait        wait for it
#   fi_pack        pack the JIT cache into <=15 MB parts under $OUT (bring back as .fi_cache for a later run)
#   ceilings       copy bandwidth and bf16 matmul rate -> .gpu_results/ceilings.csv
#   sweep:NAME     python -m experiments.attention sweep=NAME backend=all into .gpu_results/ (resumes)
#   collect        .gpu_results/ -> $OUT/gpu_results.tgz
#   MODULE         anything else: python3 -m MODULE (e.g. experiments.gpu_checks), output appended to $OUT/run.log
set -uo pipefail
OUT=${OUT:-$PWD/.device_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HYDRA_FULL_ERROR=1 MAX_JOBS=16
if [ -d .whl ] && [ ! -d /tmp/site/flashinfer ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >/tmp/pip.log 2>&1 || { echo "wheel install failed"; tail /tmp/pip.log; }
fi
export PYTHONPATH=/tmp/site:$PWD
# FlashInfer's JIT cache: a carried one in .fi_cache (unpacked from parts if needed), else built there.
export FLASHINFER_WORKSPACE_BASE=$PWD/.fi_cache
mkdir -p "$FLASHINFER_WORKSPACE_BASE"
if ls .fi_cache/parts/fi_cache.tgz.* >/dev/null 2>&1; then
  cat .fi_cache/parts/fi_cache.tgz.* | tar -C .fi_cache -xzf - && echo "unpacked carried FlashInfer JIT cache"
fi
log() { tee -a "$OUT/run.log"; }
for stage in "$@"; do
  echo "=== stage $stage $(date -u +%T)" | log
  case "$stage" in
    env)
      { nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
        python3 -c "import torch,triton;print('torch',torch.__version__,'triton',triton.__version__,'sms',torch.cuda.get_device_properties(0).multi_processor_count)"
        python3 -m pip list 2>/dev/null | grep -iE "^(pandas|pyarrow|seaborn|matplotlib|numpy|tqdm|hydra-core|omegaconf|wandb|einops|ninja|nvidia-ml-py|tabulate|flashinfer-python|apache-tvm-ffi|nvidia-cutlass-dsl|click|requests|packaging|joblib) "
      } 2>&1 | log ;;
    fi_warm_bg) (python3 -m experiments.attention sweep=gpu_smoke 'sweep.grids=[{model: llama3_8b, page_size: 16}]' \
                   backend=baselines results_dir=.gpu_results progress=false wandb.enabled=false \
                   > "$OUT/fi_warm.log" 2>&1; echo "fi_warm rc=$?" >> "$OUT/fi_warm.log") &
                FI_PID=$! ;;
    fi_wait) wait "${FI_PID:-}" 2>/dev/null; cat "$OUT/fi_warm.log" | log ;;
    fi_pack) rm -rf .fi_cache/parts; mkdir -p "$OUT"
             tar -C .fi_cache -czf - --exclude=parts . | split -b 15m -d - "$OUT/fi_cache.tgz."
             ls -la "$OUT" | log; du -sh .fi_cache | log ;;
    ceilings) python3 -m experiments.ceilings --out .gpu_results/ceilings.csv 2>&1 | log ;;
    sweep:*)  # sweep:NAME[:BACKEND_GROUP[:BACKEND,...]] resumable: rows accumulate in .gpu_results/<sweep>/
              IFS=: read -r _ sw grp only <<<"$stage"
              extra=(); [ -n "${only:-}" ] && extra=("backend.names=[${only}]")
              timeout ${SWEEP_TIMEOUT:-590} python3 -m experiments.attention sweep=$sw backend=${grp:-all} results_dir=.gpu_results \
                progress=false wandb.enabled=false timing.warmup_ms=10 timing.rep_ms=40 "${extra[@]}" 2>&1 \
                | grep -v "^\s*$" | log
              tar -czf "$OUT/gpu_results.tgz" .gpu_results ;;
    fi_bg)    # compile FlashInfer's fi_serial and fi_pod modules in two background processes
              for b in fi_serial fi_pod; do
                (python3 -m experiments.attention sweep=gpu_smoke 'sweep.grids=[{model: llama3_8b, page_size: 16}]' \
                   "backend.names=[$b]" results_dir=.gpu_results/fi_$b progress=false wandb.enabled=false \
                   > "$OUT/fi_$b.log" 2>&1; echo "'backend' $b rc=$?" >> "$OUT/fi_$b.log") &
              done ;;
    fi_join)  # wait (at most FI_WAIT seconds) until both background builds have printed their result
              for i in $(seq 1 "${FI_WAIT:-300}"); do
                [ "$(cat "$OUT"/fi_fi_*.log 2>/dev/null | grep -c "'backend'")" -ge 2 ] && break; sleep 1; done
              cat "$OUT"/fi_fi_*.log | log ;;
    collect) tar -czf "$OUT/gpu_results.tgz" .gpu_results 2>&1 | log; ls -la "$OUT" | log ;;
    *) python3 -m $stage 2>&1 | log ;;
  esac
done
