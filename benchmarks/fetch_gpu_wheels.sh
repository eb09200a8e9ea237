#!/usr/bin/env bash
# Here (with network to PyPI): fetch the wheels the GPU machine lacks into .whl/ (ignored by git), for
# benchmarks/gpu_session.sh. The device image has torch, transformers, accelerate, peft, safetensors, tokenizers and
# huggingface_hub, but not diffusers, bitsandbytes, jsonschema or importlib_metadata (device README, KINDS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
for spec in diffusers==0.42.1 bitsandbytes importlib_metadata jsonschema jsonschema-specifications referencing rpds-py; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "$spec"
done
ls -la .whl
