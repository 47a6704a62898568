#!/usr/bin/env bash
# Fill wheelhouse/ on the host for an image build with no registry (--build-arg WHEELHOUSE=/wheelhouse):
# torch from TORCH_INDEX_URL, the build the image is for, then the project's dependencies with EXTRAS and
# the cluster extra (Ray: every image has it), and its build requirements. The image's own check
# (docker/check-torch-build.sh) refuses a torch of another build, so a wheelhouse filled for the CPU cannot
# end up in a GPU image, or the other way round.
#
#   docker/fill-wheelhouse.sh PYTHON                          # CPU images: PyTorch's CPU index, extras trainers,cpu
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 EXTRAS=trainers,gpu docker/fill-wheelhouse.sh PYTHON
#   TORCH_INDEX_URL= docker/fill-wheelhouse.sh PYTHON        # torch wherever PYTHON's pip configuration finds it
#
# PYTHON: a Python with pip, and tomllib (>= 3.11). TORCH (default torch==2.13.0) pins torch as the
# Dockerfile does. The torch build wanted is TORCH_BUILD (default: the index's last path part, cpu when the
# index is left to pip's configuration); the wheelhouse is checked to hold only torch wheels of it.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${1:?usage: $0 PYTHON}
torch=${TORCH:-torch==2.13.0}
index=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
extras=${EXTRAS:-trainers,cpu}
build=${TORCH_BUILD:-$(basename "${index:-cpu}")}
index_args=()
[[ -z $index ]] || index_args=(--index-url "$index")

# torch and its own dependencies (CUDA wheels for a CUDA build) from its index, first: the project's
# torch>=2.3 below then finds it here (--find-links) instead of PyPI's default build.
"$python" -m pip download --quiet --only-binary=:all: --dest wheelhouse "${index_args[@]}" "$torch"
mapfile -t build_requires < <("$python" -c \
    'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")')
"$python" -m pip download --quiet --only-binary=:all: --dest wheelhouse --find-links wheelhouse \
    "$torch" "${build_requires[@]}" ".[cluster,$extras]"

other_builds=$(find wheelhouse -name 'torch-*.whl' ! -name "torch-*+${build}-*")
if [[ -n $other_builds ]]; then
    echo "wheelhouse: expected only torch's $build build, found: $other_builds" >&2
    exit 1
fi
if [[ $build == cpu ]]; then
    cuda_wheels=$(find wheelhouse \( -name 'nvidia*' -o -name 'triton*' \))
    if [[ -n $cuda_wheels ]]; then
        echo "wheelhouse: expected torch's CPU build, found CUDA wheels: $cuda_wheels" >&2
        exit 1
    fi
fi
faiss_wheels=$(find wheelhouse -name 'faiss*.whl' | wc -l)
if ((faiss_wheels > 1)); then
    echo "wheelhouse: more than one faiss: $(find wheelhouse -name 'faiss*.whl')" >&2
    exit 1
fi
echo "wheelhouse: torch $build build, extras cluster,$extras: $(find wheelhouse -name '*.whl' | wc -l) wheels, $(du -sh wheelhouse | cut -f1)"
