#!/usr/bin/env bash
# Check and time the GPU paths in a few minutes on a machine with one CUDA GPU:
# build a LeNet×5 store on the GPU and the CPU, solve with lstsq, ridge and cg on both, compare.
#   benchmarks/gpu_check.sh [--width 5] [--n-train 1000] [--data-root DIR] [--out runs/gpu-check]
# Installs lincnn with the gpu extra (CuPy) into .venv first.
set -euo pipefail
cd "$(dirname "$0")/.."
LINCNN_EXTRAS="test,distributed,gpu" source bin/_env.sh
exec python benchmarks/gpu_check.py "$@"
