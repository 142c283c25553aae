#!/usr/bin/env bash
# One call on a GPU machine that has no network: set up its python with carried wheels, then run stages.
# Usage (repo root, on the GPU machine):  bash scripts/gpu_session.sh STAGE [STAGE ...]
#   env              GPU, driver, versions
#   fi_install       FlashInfer modules built earlier into the wheel's AOT folder: every set carried in .fi_so/
#                    (SET.tar.xz.00, .01, ...: fi_pack's parts; several sets, e.g. head_dim 128 and 64, side by side)
#   fi_bg            build FlashInfer's fi_serial / fi_pod JIT modules in the background (log: $OUT/fi_*.log;
#                    FI_MODEL: the catalog model whose heads they are built for, default llama3_8b)
#   fi_join          wait (at most FI_WAIT s) for them
#   fi_pack          every built FlashInfer .so -> $OUT/$FI_SET.tar.xz.NN (FI_SET default fi_so; 15 MB parts;
#                    carry them in .fi_so/, one name a set: FI_SET=fi_so_hd64 beside a head_dim-128 fi_so)
#   extras           keep the carried .extras/SET.tar.xz.<i>of<n> parts (scripts/pack_extras.sh) in /tmp/extras
#                    and unpack each set under /tmp once all its parts came (over one call or several;
#                    EXTRAS_ROOT instead of /tmp: tests)
#   pod_check:N[:G]  the Hopper POD kernel's GPU check in N processes side by side (log: $OUT/pod_check.log);
#                    G: only these grids, comma-separated (experiments.gpu_checks check_pod_sm90)
#   diag:WHAT[:PTS]  python -m experiments.pod_sm90_diag WHAT [--points PTS] $DIAG_ARGS (JSON: $OUT/diag.jsonl)
#   sweep:NAME[:BACKEND_GROUP[:BACKEND,...]]  python -m experiments.attention into RESULTS_DIR (default
#                    .gpu_results/; resumes; SWEEP_ARGS: more Hydra overrides)
#   collect          .gpu_results/ -> $OUT/gpu_results.tgz
#   MODULE           anything else: python3 -m MODULE, output appended to $OUT/run.log
# Every stage runs under `timeout` (STAGE_TIMEOUT, default 300 s): a hung kernel costs minutes, not the call.
# SITE_PREFIX: a site folder put before /tmp/site (FlashInfer 0.7.2: SITE_PREFIX=/tmp/site_fi072, with
# FI_WORKSPACE=$PWD/.fi_cache072 and RESULTS_DIR=.gpu_results/versions/flashinfer_0.7.2: analysis.versions).
set -uo pipefail
OUT=${OUT:-$PWD/.device_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HYDRA_FULL_ERROR=1 MAX_JOBS=16
if [ -d .whl ] && [ ! -d /tmp/site/flashinfer ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >/tmp/pip.log 2>&1 || { echo "wheel install failed"; tail /tmp/pip.log; }
fi
# The CUTLASS DSL's wheel reaches its `cutlass` package through a .pth file, which --target does not read.
export PYTHONPATH=${SITE_PREFIX:+$SITE_PREFIX:}/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD
export FLASHINFER_WORKSPACE_BASE=${FI_WORKSPACE:-$PWD/.fi_cache}
mkdir -p "$FLASHINFER_WORKSPACE_BASE"
T=${STAGE_TIMEOUT:-300}
log() { tee -a "$OUT/run.log"; }
for stage in "$@"; do
  echo "=== stage $stage $(date -u +%T)" | log
  case "$stage" in
    env)
      { nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
        python3 -c "import torch,triton;print('torch',torch.__version__,'triton',triton.__version__,'sms',torch.cuda.get_device_properties(0).multi_processor_count)"
        python3 -c "import flashinfer;print('flashinfer',flashinfer.__version__)" 2>&1 | tail -1
      } 2>&1 | log ;;
    fi_install)
      aot=$(python3 -c "import flashinfer,os;print(os.path.join(os.path.dirname(flashinfer.__file__),'data','aot'))" 2>/dev/null)
      if [ -n "$aot" ] && ls .fi_so/*.tar.xz.00 >/dev/null 2>&1; then
        for first in .fi_so/*.tar.xz.00; do               # one set: its parts in order, one tar of fi_so/*.so
          d=$(mktemp -d); cat "${first%.00}".* | tar -C "$d" -xJf - || echo "fi_install: $first's set is broken" | log
          # Each module renamed into place, not copied over: a process that has the old file mapped (a sweep
          # running while another set is installed beside it) keeps reading the pages it loaded.
          for so in "$d"/fi_so/*.so; do
            [ -e "$so" ] || continue; n=$(basename "$so" .so); mkdir -p "$aot/$n"
            cp "$so" "$aot/$n/.$n.so.new" && mv -f "$aot/$n/.$n.so.new" "$aot/$n/$n.so"; done
          rm -rf "$d"
        done
        ls "$aot" | log
      else echo "no carried FlashInfer modules" | log; fi ;;
    fi_bg)
      for b in fi_serial fi_pod; do
        (timeout 600 python3 -m experiments.attention sweep=gpu_smoke "sweep.grids=[{model: ${FI_MODEL:-llama3_8b}, page_size: 16}]" \
           "backend.names=[$b]" results_dir=.gpu_results/fi_$b progress=false wandb.enabled=false \
           > "$OUT/fi_$b.log" 2>&1; echo "'backend' $b rc=$?" >> "$OUT/fi_$b.log") &
      done ;;
    fi_join)
      for i in $(seq 1 "${FI_WAIT:-300}"); do
        [ "$(cat "$OUT"/fi_fi_*.log 2>/dev/null | grep -c "'backend'")" -ge 2 ] && break; sleep 1; done
      tail -n 3 "$OUT"/fi_fi_*.log | log ;;
    fi_pack)
      mkdir -p /tmp/fi_so; find .fi_cache -name "*.so" -exec cp {} /tmp/fi_so/ \;
      ls -la /tmp/fi_so | log
      XZ_OPT=${XZ_OPT:--T0} tar -C /tmp -cJf - fi_so | split -b 15m -d - "$OUT/${FI_SET:-fi_so}.tar.xz." \
        && ls -la "$OUT/${FI_SET:-fi_so}".tar.xz.* | log ;;
    extras)
      X=${EXTRAS_ROOT:-/tmp}; mkdir -p "$X/extras"
      for part in .extras/*.tar.xz.*of*; do              # a part packed anew replaces the set's old parts
        [ -e "$part" ] || continue
        name=$(basename "$part"); set=${name%.tar.xz.*}; n=${name##*of}
        if { [ -e "$X/extras/$name" ] && ! cmp -s "$part" "$X/extras/$name"; } \
           || ls "$X/extras/$set".tar.xz.*of* 2>/dev/null | grep -qv "of$n\$"; then
          rm -f "$X/extras/$set".tar.xz.* "$X/.extras_$set"; echo "$set: packed anew, old parts dropped" | log
        fi
        cp -f "$part" "$X/extras/"
      done
      for first in "$X"/extras/*.tar.xz.1of*; do
        [ -e "$first" ] || { echo "no extras carried (bash scripts/pack_extras.sh SET, carry .extras/...)" | log; break; }
        base=${first%.1of*}; n=${first##*of}; set=$(basename "$base" .tar.xz)
        if [ -e "$X/.extras_$set" ]; then echo "$set: unpacked earlier" | log; continue; fi
        have=$(ls "$base".*of"$n" | wc -l)
        if [ "$have" -lt "$n" ]; then echo "$set: $have of $n parts here; carry the others next call" | log; continue; fi
        # Unpacked beside, then merged: a corrupt part leaves nothing half-written on PYTHONPATH.
        rm -rf "$X/.unpack"; mkdir -p "$X/.unpack"
        if for i in $(seq 1 "$n"); do cat "$base.${i}of$n"; done | tar -C "$X/.unpack" -xJf - 2>>"$OUT/run.log"; then
          cp -a "$X/.unpack/." "$X/" && touch "$X/.extras_$set" && echo "$set: unpacked ($n parts)" | log
        else
          rm -f "$base".*; echo "$set: unpacking FAILED (a corrupt or mismatched part): carry all $n parts again" | log
        fi
        rm -rf "$X/.unpack"
      done ;;
    pod_check:*)
      n=${stage#pod_check:}; grids=""; pids=()
      case "$n" in *:*) grids=${n#*:}; n=${n%%:*} ;; esac
      for i in $(seq 0 $((n - 1))); do
        timeout "$T" python3 -m experiments.gpu_checks pod_sm90 "$i/$n" $grids > "$OUT/pod_check_$i.log" 2>&1 &
        pids+=($!)
      done
      rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done
      cat "$OUT"/pod_check_*.log > "$OUT/pod_check.log"; rm -f "$OUT"/pod_check_*.log
      grep -h "runs,\|FAILED\|Error\|error" "$OUT/pod_check.log" | head -40 | log
      echo "pod_check rc=$rc" | log
      [ "$rc" = 124 ] && touch .pod_hang ;;
    diag:*)
      IFS=: read -r _ what pts <<<"$stage"
      extra=(); [ -n "${pts:-}" ] && extra=(--points "$pts"); extra+=(${DIAG_ARGS:-})
      timeout "$T" python3 -m experiments.pod_sm90_diag "$what" --out "$OUT/diag.jsonl" "${extra[@]}" 2>&1 \
        | grep -v '^{' | log ;;
    sweep:*)
      IFS=: read -r _ sw grp only <<<"$stage"
      extra=(); [ -n "${only:-}" ] && extra=("backend.names=[${only}]")
      timeout "$T" python3 -m experiments.attention sweep=$sw backend=${grp:-all} results_dir=${RESULTS_DIR:-.gpu_results} \
        progress=false wandb.enabled=false timing.warmup_ms=10 timing.rep_ms=60 "${extra[@]}" ${SWEEP_ARGS:-} 2>&1 \
        | grep -v "^\s*$" | tail -n 30 | log
      tar -czf "$OUT/gpu_results.tgz" .gpu_results ;;
    collect) tar -czf "$OUT/gpu_results.tgz" .gpu_results 2>&1 | log; ls -la "$OUT" | log ;;
    *) timeout "$T" python3 -m $stage 2>&1 | log ;;
  esac
done
