#!/usr/bin/env bash
# The GPU checks and benchmarks, in one run. From the repository root, on a
# machine with an NVIDIA GPU and jax[cuda], optax, flax, chex, hypothesis and
# pytest installed:
#
#   PYTHONPATH=. bash benchmarks/gpu.sh [OUT_DIR]
#
# A dry run on a CPU, in about two minutes: GPU_STEP_FLAGS=--quick
# GPU_BENCH_SIZES=1e5 GPU_BENCH_BF16=1e5 GPU_BENCH_LEAVES=1 bash benchmarks/gpu.sh /tmp/gpu
#
# Writes, under OUT_DIR (default $OUT, else benchmarks/results), most
# important first, each step under its own time limit:
# - gpu_info.txt: the GPU, jax and optax;
# - gpu_train_step.md/.json: each control's overhead in a donated Adam step
#   over 1e8 parameters in 100 leaves and in a 12-layer 4096-wide MLP step,
#   against Adam alone, optax and the plain one-sum clip, interleaved in one
#   run, with each compiled step's kernel count;
# - gpu_tests.txt: the core tests, run on the GPU;
# - gpu_throughput.md/.json: the throughput grid against optax and PyTorch,
#   with the share of HBM bandwidth measured in the same run.
set -uo pipefail
out=${1:-${OUT:-benchmarks/results}}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:-.}
export GRADCTL_BENCH_RESULTS="$out" GRADCTL_BENCH_ALL_CORES=1 PYTHONUNBUFFERED=1
sizes=${GPU_BENCH_SIZES:-1e7 1e8 4e8}
bf16=${GPU_BENCH_BF16:-1e8}
leaves=${GPU_BENCH_LEAVES:-1 100}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
  python -c "import jax, optax; print('jax', jax.__version__, 'optax', optax.__version__, jax.devices())"
} | tee "$out/gpu_info.txt"

# In the training step: the overhead each control adds, and its kernels.
# shellcheck disable=SC2086
timeout "${GPU_STEP_TIMEOUT:-240}" python -m benchmarks.train_step --name gpu_train_step \
  ${GPU_STEP_FLAGS:-} 2>&1 | tee "$out/gpu_train_step.log" | tail -25

# Correctness on the GPU: the core tests, without the 8-CPU-device sharding suite.
timeout "${GPU_TEST_TIMEOUT:-150}" python -m pytest -q -x -n 0 -p no:cacheprovider \
  -W ignore::DeprecationWarning -W ignore::FutureWarning \
  tests/test_reduce.py tests/test_clipping.py tests/test_normalizing.py tests/test_adaptive.py \
  2>&1 | tail -15 | tee "$out/gpu_tests.txt"

# shellcheck disable=SC2086
timeout "${GPU_BENCH_TIMEOUT:-300}" python -m benchmarks.throughput --name gpu_throughput \
  --sizes $sizes --leaves $leaves --bf16-sizes $bf16 --budget "${GPU_BENCH_BUDGET:-0.5}" \
  2>&1 | tee "$out/gpu_throughput.log" | tail -40
