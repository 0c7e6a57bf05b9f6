#!/usr/bin/env bash
# Every GPU row of benchmarks/inference.py, benchmarks/sr_throughput.py and
# benchmarks/memory_plan.py in one run of about seventeen minutes on one H100/H200 (SD3-medium
# shapes, random weights). Installs nothing.
#
#   bash benchmarks/gpu_session.sh [RESULTS_DIR]          # default: benchmarks/results
#
# Writes RESULTS_DIR/{sr_throughput,inference,memory_plan_gpu}.{json,md} and gpu_session.log.
# Each benchmark rewrites its report after every row or phase, so a part stopped by its time
# limit keeps what it measured, marked "Partial" (sr_throughput lists the rows it did not
# reach; inference lists the compiled rows its compile budget skipped). Run a part alone for
# the rest.
#
# Needs, where it runs: a CUDA GPU; python3 (or $PYTHON) with torch, diffusers, peft,
# safetensors, pillow, scikit-image, tqdm, einops, lpips (the planner's train rows), and
# torchao for the FP8 rows (without it those rows say why they failed). This project's device
# machine has all but diffusers, lpips and torchao: prepare their wheels here, in the
# repository root, and carry `.whl`:
#   echo /.whl/ >> .git/info/exclude; echo /.bench-data/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl diffusers importlib_metadata torchao lpips  # torchao: the device torch's build
# and the RealSR LQ folder (../shared/data/realsr/test_LR does not travel; else generated
# images are used and the table says so), carried as `.bench-data`:
#   mkdir -p .bench-data && cp -r ../shared/data/realsr/test_LR .bench-data/
# The device command, carrying .whl and .bench-data:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site && bash benchmarks/gpu_session.sh "$OUT"
# then copy "$OUT"/*.json and *.md into benchmarks/results/ and commit them with the log's
# device line in the message.
set -uo pipefail
out=${1:-benchmarks/results}
py=${PYTHON:-python3}
lq=${REALSR_LR:-.bench-data/test_LR}
mkdir -p "$out"
log="$out/gpu_session.log"
export PYTHONUNBUFFERED=1
# One inductor cache for both benchmarks: the 512 px forward compiles once.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/sr_bench_inductor}

{
  date -u
  nvidia-smi -L || true
  "$py" - <<'EOF' || exit 2
import importlib, torch
assert torch.cuda.is_available(), "no CUDA device"
print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))
for name in ("diffusers", "peft", "skimage", "PIL", "torchao"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except ImportError as exc:
        print(f"MISSING {name}: {exc}")
        if name != "torchao":
            raise SystemExit(2)
EOF
  folder=()
  [ -d "$lq" ] && folder=(--folder "$lq")
  # 1. End to end (about 5 min): per workload (the folder, 1024 px, 2048 px) the release's way,
  # the pipeline eager, compiled, compiled + FP8; the table lists every planned row from the
  # start, so rows a time limit stops it before say "not reached".
  timeout 320 "$py" -m benchmarks.sr_throughput "${folder[@]}" --out "$out"
  echo "sr_throughput exit $?"
  # 2. The forward (about 4 min): the fp32 check with the planted mistakes, then eager rows at
  # 512 and 1024 px, batch 8 and 1, then the compiled modes shape by shape (512 px batch 8
  # first: the issue's target; its compiles are in the inductor cache from part 1) until the
  # compile budget is spent.
  timeout 250 "$py" -m benchmarks.inference --config sd3-medium --dtype bf16 --warmup 2 \
    --repeats 6 --sizes 512 1024 --batches 8 1 --compile-budget-s 150 --out "$out"
  echo "inference exit $?"
  # 3. The memory planner (about 7 min, most of it tracing on the CPU): its predicted peak
  # against torch.cuda's max_memory_allocated for the SD3-medium train step (checkpointing off,
  # on) and 1024 -> 4096 px inference (issue 24's target: within 10%), row by row.
  timeout 420 "$py" -m benchmarks.memory_plan --cuda --out "$out"
  echo "memory_plan exit $?"
  date -u
} 2>&1 | tee "$log"
