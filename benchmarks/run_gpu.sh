#!/usr/bin/env bash
# The GPU checks and figures of benchmarks/README.md in one go, on a machine with CUDA, from the project root:
#   bash benchmarks/run_gpu.sh [OUT_DIR]        (default OUT_DIR: benchmarks/results)
# 1. tests/test_gpu.py: a bf16 step on CUDA, the GPU profile's device-resident channels_last batches through
#    Lightning, and ONNX Runtime's CUDA provider really in use (fails where only the CPU build is installed);
# 2. images/s of every classifier, fp32 vs bf16, channels_last, and the fraction of the measured matmul peak;
# 3. time to 98% / 99% test accuracy of the ResNet, device-resident batches vs a DataLoader (and compiled).
# Each step runs even when an earlier one failed; the exit status is the number of failed steps.
set -u
# PYTHON: the interpreter to use (default: python)
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1
failed=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || failed=$((failed + 1))
"${PYTHON:-python}" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/test_gpu.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=$((failed + 1))
"${PYTHON:-python}" benchmarks/bench_precision.py --device cuda --channels-last --batch 512 --steps 30 --matmul-size 8192 \
    --accuracy-models --out "$out/precision_gpu.json" || failed=$((failed + 1))
"${PYTHON:-python}" benchmarks/bench_device_resident.py --device cuda --variants resident loader resident_compiled \
    --out "$out/device_resident.json" || failed=$((failed + 1))
exit "$failed"
