#!/usr/bin/env bash
# Issue 10 part 6 on a lent CUDA machine, as one device `run` (its image has torch, safetensors, xxhash,
# numpy, tqdm, pytest and hypothesis; nothing is installed):
#     bash bench/device_check.sh        # results under $OUT (or /tmp/tk-device): gpu.txt, cuda_tests.txt, bench_gpu.jsonl
# About 5 minutes on an H200: the CUDA tests (skipped on CPU machines), then bench/bench_gpu.py with 4 GiB.
set -uo pipefail
out=${OUT:-/tmp/tk-device}
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" >>"$out/gpu.txt" 2>&1
# -W default: another torch version may warn where the pinned one does not; the tests' assertions still hold.
python3 -m pytest -q -p no:cacheprovider -W default -k cuda \
    tests/format/test_staged_writes.py tests/weights/test_parallel_copies.py tests/weights/test_save_load.py \
    tests/checkpoint/test_checkpoint.py tests/manager/test_metrics.py tests/manager/test_incremental.py 2>&1 | tee "$out/cuda_tests.txt"
python3 bench/bench_gpu.py --gib 4 --repeat 5 2>&1 | tee "$out/bench_gpu.jsonl"
