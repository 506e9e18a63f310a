#!/usr/bin/env bash
# Check and time lincnn's GPU paths against the CPU on a machine with a CUDA GPU (docs/gpu.md):
#   benchmarks/gpu_check.sh [gpu_check.py options, e.g. --width 3 --n-train 1000 --checks build,cg]
# Sets up .venv (bin/_env.sh) and adds the CuPy wheel built for the CUDA version of the installed
# torch: torch.version.cuda 12.x → extra gpu-cuda12 (cupy-cuda12x), 13.x → extra gpu (cupy-cuda13x).
# With --device cpu no CuPy is installed: the script then checks the CPU against itself.
set -euo pipefail
cd "$(dirname "$0")/.."
source bin/_env.sh

on_cpu=0
previous=""
for arg in "$@"; do
    if [ "$arg" = "--device=cpu" ] || { [ "$previous" = "--device" ] && [ "$arg" = "cpu" ]; }; then
        on_cpu=1
    fi
    previous="$arg"
done

if [ "$on_cpu" = 0 ]; then
    # nothing is installed for a GPU that torch cannot use (none here, or a driver older than the
    # CUDA torch was built for): say so and stop
    if ! python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
        echo "gpu_check: torch $(python -c 'import torch; print(torch.__version__)') sees no usable CUDA GPU" \
             "(nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1 || echo not found));" \
             "run on a GPU machine, or pass --device cpu" >&2
        exit 2
    fi
    cuda="$(python -c 'import torch; print(torch.version.cuda or "")')"
    case "${cuda%%.*}" in
        12) extra=gpu-cuda12 package=cupy-cuda12x ;;
        13) extra=gpu package=cupy-cuda13x ;;
        *) echo "gpu_check: torch is built for CUDA $cuda, and lincnn has CuPy extras for CUDA 12 and 13 only" >&2
           exit 2 ;;
    esac
    LINCNN_EXTRAS="test,distributed,$extra" source bin/_env.sh
    # The CuPy wheel alone expects a CUDA toolkit on the machine for NVRTC (its kernels) and
    # cuBLAS/cuSOLVER; where there is none, its [ctk] extra brings them from PyPI as wheels.
    cupy_works='import cupy; a = cupy.arange(16.0).reshape(4, 4); cupy.linalg.eigh(a @ a.T); (a + 1).sum().get()'
    if ! python -c "$cupy_works" 2>/dev/null; then
        echo "gpu_check: $package cannot run without CUDA libraries; installing $package[ctk] (CUDA $cuda)" >&2
        _lincnn_pip install -q "$package[ctk]"
        python -c "$cupy_works"
    fi
fi
exec python benchmarks/gpu_check.py "$@"
