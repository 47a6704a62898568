# Sourced (`source benchmarks/gpu_env.sh` from the repository root) by benchmarks/gpu_check.sh, or before any
# benchmark on a GPU machine: makes the project importable in $PYTHON (default python3) without installing it,
# and faiss-gpu-cu12 usable beside a CUDA 13 torch. Downloads nothing.
#
# WHEELS=DIR first installs DIR/*.whl into a temporary folder: for a machine that cannot reach PyPI, the wheels
# the project needs that its Python lacks (grpcio, protobuf, ...; faiss-gpu-cu12 and nvidia-cuda-runtime-cu12
# for the faiss rows). faiss-gpu-cu12 is built for CUDA 12; on a machine with CUDA 13's cuBLAS only, this builds
# benchmarks/cublas12_shim.c with gcc (a libcublas.so.12 that forwards faiss's eight cuBLAS calls to
# libcublas.so.13) rather than carry CUDA 12's 554 MiB cuBLAS.
python=${PYTHON:-python3}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if [[ -n ${WHEELS:-} ]]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
        --target "$scratch/site" "$WHEELS"/*.whl
    export PYTHONPATH=$scratch/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$python" -c 'import lifelong_memory.server.memory' 2>/dev/null; then
    mkdir "$scratch/links" "$scratch/links/lifelong_memory"
    ln -s "$PWD/server" "$scratch/links/lifelong_memory/server"
    ln -s "$PWD/client" "$scratch/links/lifelong_memory/client"
    ln -s "$PWD/trainers" "$scratch/links/lifelong_memory/trainers"
    ln -s "$PWD/proto/lifelong_memory/v1" "$scratch/links/lifelong_memory/v1"
    export PYTHONPATH=$scratch/links${PYTHONPATH:+:$PYTHONPATH}
fi
# faiss-gpu-cu12 beside a CUDA 13 torch: its CUDA 12 runtime from nvidia-cuda-runtime-cu12, cuBLAS 12 from the shim.
cudart12=$("$python" -c 'import nvidia.cuda_runtime, os; print(os.path.join(nvidia.cuda_runtime.__path__[0], "lib"))' \
    2>/dev/null || true)
cublas13=$("$python" -c 'import glob, os, torch
print(next(iter(glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "**", "libcublas.so.13"),
                          recursive=True)), ""))' 2>/dev/null || true)
[[ -n $cublas13 ]] || cublas13=$(ldconfig -p | awk '/libcublas\.so\.13 /{print $NF; exit}')
if [[ -n $cudart12 && -n $cublas13 ]] && ! ldconfig -p | grep -q 'libcublas.so.12'; then
    gcc -O2 -shared -fPIC -Wl,-soname,libcublas.so.12 -Wl,--version-script=benchmarks/cublas12.map \
        -o "$scratch/libcublas.so.12" benchmarks/cublas12_shim.c -ldl
    echo 'void cublaslt12_unused(void) {}' | gcc -x c -shared -fPIC -Wl,-soname,libcublasLt.so.12 \
        -o "$scratch/libcublasLt.so.12" -
    export CUBLAS13_PATH=$cublas13 _FAISS_WHEEL_DISABLE_CUDA_PRELOAD=1
    export LD_LIBRARY_PATH=$scratch:$cudart12${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    echo "faiss-gpu-cu12: CUDA 12 runtime from $cudart12, cuBLAS 12 calls forwarded to $cublas13"
fi
"$python" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)")'
