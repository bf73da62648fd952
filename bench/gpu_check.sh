#!/usr/bin/env bash
# One prepared GPU check, for a fresh GPU machine (torch, triton, timm installed; no internet):
#   bench/gpu_check.sh RESULTS_DIR [ARCHIVE.tgz]
# Steps, each under its own time limit (the limits add up to more than 10 minutes; on a
# fresh H200 the kernel benchmark took 182 s for N = 2304 and 4096 at B = 128 and 32
# without the torch paths, the GPU tests 77 s in six processes, mostly compiling, the
# others 9 to 53; run a subset with STEPS where a call is capped, as below), each logged
# to RESULTS_DIR/<step>.log: versions and nvidia-smi, editable install of the project, the
# kernel benchmark (RESULTS_DIR/kernels.{json,csv,png}; on Hopper the warp-specialized
# candidate's twin whose MMA warpgroup scales the keys, beside the candidates), the GPU
# tests (pytest -m gpu tests/, in GPU_TEST_WORKERS processes, default 6, where pytest-xdist
# is installed, as on the lent GPU machines: a fresh machine's run is mostly compiling),
# the end-to-end labelling benchmark (pipeline_cuda.json), training throughput
# (train_cuda.json) and the extractor backends, eager torch and any ONNX Runtime GPU
# provider (backends_<gpu>.{json,md}; torch.compile of the extractor is left out: its
# first compile alone outlasts the step), the host's part of a call by function
# (host.log: cProfile, N = 576, B = 128) and, where Nsight Compute is installed, a profile
# of the kernels of one call (profile.log: speed of light, occupancy, warp states, memory;
# N = 576 and 2304, B = 128, and on Hopper the warp-specialized candidate and its twin
# at 2304; and each
# stall reason's cycles per issue at N = 576), and the
# stalls per SASS instruction of the top-k and diffusion kernels (sass.log, and the report
# sass.ncu-rep: a few MB, keep sass.log, gzipped; sass_regions.log sums them by code region:
# per program, per tile, per K step), and on Hopper the same of the warp-specialized
# candidate at N = 2304 (sass_ws.log, sass_ws_regions.log: its partitions' code runs on
# different numbers of warps, so they fall into regions of their own), and of its twin
# (sass_ws_scales.log, sass_ws_scales_regions.log).
# STEPS="gpu_tests kernels" (say) runs a subset of the GPU steps, KERNEL_SIZES="576 2304"
# (say) a subset of the benchmark's sizes, KERNEL_ARGS more of its options (say
# "--batches 128 --topk-config block_m=64,block_n=256,block_k=64,narrow=32,tma=1").
# A failed step does not stop the next; without a CUDA GPU the GPU steps are skipped. Exits
# non-zero if any step failed or was skipped. PYTHON picks the interpreter (default python3).
# ARCHIVE, if given, is rewritten with all of RESULTS_DIR after every step (one file to fetch
# from a machine that returns few files; what finished is kept if a later step is cut off):
#   timeout 580 bench/gpu_check.sh /tmp/gpu "$OUT/gpu.tgz"   then   tar xzf gpu.tgz -C DIR
set -u
out=${1:?usage: bench/gpu_check.sh RESULTS_DIR [ARCHIVE.tgz]}
archive=${2:-}
mkdir -p "$out" && out=$(cd "$out" && pwd)
if [ -n "$archive" ]; then
  mkdir -p "$(dirname "$archive")" || exit 2
  archive=$(cd "$(dirname "$archive")" && pwd)/$(basename "$archive")
  case $archive in "$out"/*) echo "ARCHIVE must lie outside RESULTS_DIR" >&2; exit 2 ;; esac
fi
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
failed=()

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  tail -n 25 "$out/$name.log"
  echo "== $name: exit $rc after $((SECONDS - t0))s"
  [ "$rc" -eq 0 ] || failed+=("$name:$rc")
  [ -z "$archive" ] || { tar czf "$archive.part" -C "$out" . && mv "$archive.part" "$archive"; }
}

step env 20 bash -c "nvidia-smi; command -v ncu nsys || echo no ncu or nsys on PATH; $py -c 'import sys, torch, triton
print(sys.version); print(\"torch\", torch.__version__, \"triton\", triton.__version__)
print(\"cuda\", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else \"-\")
import setuptools; print(\"setuptools\", setuptools.__version__)'"
step install 60 "$py" -m pip install --no-deps --no-build-isolation -e .
# Whether the kernels run here, and why not (the Triton release, the GPU).
step info 30 "$py" -c 'import sys; from adcam_fast.cli import main; sys.exit(main(["info"]))'
if "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  want() { [[ " ${STEPS:-gpu_tests kernels pipeline train backends host profile sass} " == *" $1 "* ]]; }
  export PYTHONUNBUFFERED=1
  # The warp-specialized candidate as --topk-config takes it, and its twin whose MMA
  # warpgroup scales each tile by the keys' powers of two instead of its merge warps (timed
  # beside the candidates, not among them); empty off Hopper.
  read -r ws ws_scales < <("$py" -c 'import sys, torch; sys.path[:0] = ["bench"]
from dataclasses import replace
from configs import config_text
from adcam_fast.kernels.coneighbor_topk import WS_CANDIDATE as ws
from adcam_fast.kernels.launch import can_warp_specialize
if can_warp_specialize(torch.device("cuda")):
    print(config_text(ws), config_text(replace(ws, mma_scales=True)))')
  twins=()
  [ -z "${ws_scales:-}" ] || twins=(--topk-config "$ws_scales")
  # The goals' sizes first: the torch paths' budget goes there. torch.compile is left out:
  # on an H200 it was slower than eager at both goal sizes, and its compiles cost the step.
  want kernels && step kernels 400 "$py" bench/kernels.py --out "$out" --budget-s 90 \
    --sizes ${KERNEL_SIZES:-576 2304 1296 4096} --no-compile "${twins[@]}" ${KERNEL_ARGS:-}
  # Processes compile side by side (one kernel at a time each; Triton's cache is shared).
  workers=()
  "$py" -c 'import xdist' 2>/dev/null && workers=(-n "${GPU_TEST_WORKERS:-6}")
  want gpu_tests && step gpu_tests 400 "$py" -m pytest -m gpu tests/ -q -rs "${workers[@]}" \
    -p no:cacheprovider --junitxml="$out/gpu_tests.xml"
  want pipeline && step pipeline 90 "$py" bench/pipeline.py --out "$out" \
    --model conformer_small_patch16 --images 128 --size 448 --input-size 384 \
    --batch-size 16 --workers 8
  want train && step train 45 "$py" bench/train.py --device cuda --out "$out"
  want backends && step backends 45 "$py" bench/backends.py --out "$out" \
    --model conformer_small_patch16 --sizes 384 --batch 16 --no-compile
  # Where the host's part of a call goes (cProfile over 50 calls, the device idle at each).
  want host && step host 60 "$py" bench/profile_kernels.py --n 576 --b 128 --calls 50 \
    --host-profile
  # The kernels of the profiled call (the warm-up call before it compiles; the script
  # brackets the profiled one by cudaProfilerStart/Stop), at most COUNT of them (0: all);
  # each replayed once per metric pass.
  ncu_kernels() {  # N KERNEL_REGEX COUNT NCU_OPTION... (PROFILE_ARGS: the script's own)
    local n=$1 regex=$2 limit=()
    if [ "$3" -gt 0 ]; then limit=(--launch-count "$3"); fi
    shift 3
    ncu --profile-from-start off "${limit[@]}" "$@" -k "regex:$regex" \
      "$py" bench/profile_kernels.py --n "$n" --b 128 ${PROFILE_ARGS:-}
  }
  sections="--section SpeedOfLight --section Occupancy"
  sections+=" --section WarpStateStats --section MemoryWorkloadAnalysis"
  stalls="--metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio"
  if want profile; then
    if command -v ncu >/dev/null; then
      step profile 150 bash -c "$(declare -f ncu_kernels)
        py=$py; ncu_kernels 576 'root|topk|diffusion' 0 $sections &&
        ncu_kernels 2304 topk 1 $sections; ncu_kernels 576 'topk|diffusion' 0 $stalls
        [ -z '$ws' ] || PROFILE_ARGS='--topk-config $ws' ncu_kernels 2304 topk_ws 1 $sections
        [ -z '$ws_scales' ] || { echo '== the twin with mma_scales'
          PROFILE_ARGS='--topk-config $ws_scales' ncu_kernels 2304 topk_ws 1 $sections; }"
    else
      echo "== profile: no ncu on PATH, skipped"
    fi
  fi
  # Where each kernel's warps stall, per SASS instruction (warp-state samples and executed
  # instructions; Nsight Compute's source page as CSV), for the walk and the tile loop.
  if want sass && command -v ncu >/dev/null; then
    step sass 90 bash -c "$(declare -f ncu_kernels)
      py=$py; ncu_kernels 576 'topk|diffusion' 0 --section SourceCounters -f -o '$out/sass' &&
      ncu --import '$out/sass.ncu-rep' --page source --print-source sass --csv"
    step sass_regions 20 "$py" bench/sass_regions.py "$out/sass.log"
    # The warp-specialized candidate, then its twin with mma_scales (Hopper only).
    for job in ${ws:+"sass_ws=$ws"} ${ws_scales:+"sass_ws_scales=$ws_scales"}; do
      name=${job%%=*} cfg=${job#*=}
      step "$name" 150 bash -c "$(declare -f ncu_kernels)
        py=$py; PROFILE_ARGS='--topk-config $cfg' ncu_kernels 2304 topk_ws 1 \
          --section SourceCounters -f -o '$out/$name' &&
        ncu --import '$out/$name.ncu-rep' --page source --print-source sass --csv"
      step "${name}_regions" 20 "$py" bench/sass_regions.py "$out/$name.log"
    done
  fi
else
  echo "== no CUDA GPU visible: gpu_tests and bench skipped"
  failed+=("gpu:skipped")
fi

echo "== summary: ${#failed[@]} step(s) failed or skipped${failed[*]:+: ${failed[*]}}"
[ "${#failed[@]}" -eq 0 ]
