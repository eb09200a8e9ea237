#!/usr/bin/env bash
# On the GPU machine (device tool), after benchmarks/fetch_gpu_wheels.sh here:
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=540)
# Installs the carried wheels, then measures the full-size memory table and the fp8-matmul accuracy (random weights,
# 2 steps per row, most decisive rows first) and leaves the table in $OUT/memory.md for benchmarks/RESULTS.md.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/src" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers, bitsandbytes; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__, '| bitsandbytes', bitsandbytes.__version__)"
python3 benchmarks/bench_memory.py --size ideogram4 --device cuda --budget-s "${BUDGET_S:-360}" 2>&1 | tee "${OUT:-/tmp}/memory.md"
