# Images of the lifelong memory service, for compose.yaml or on their own:
#
#   docker build -t lifelong-memory .                                  # the server (the last stage)
#   docker build --target trainer -t lifelong-memory-trainer .         # + the trainers' extras
#
# Build arguments:
#   BASE_IMAGE       any Debian-like image with python3 (>= 3.10) and its venv module
#   WHEELHOUSE       empty: packages from the registries; /wheelhouse: only the wheels in the build
#                    context's wheelhouse/ folder (pip --no-index), for a machine with no registry;
#                    docker/fill-wheelhouse.sh fills it for the TORCH_INDEX_URL and EXTRAS given here
#   TORCH            the torch requirement, pinned like the Makefile's
#   TORCH_INDEX_URL  the torch build: PyTorch's CPU index by default (PyPI's Linux torch wheels are
#                    CUDA builds of several GB, and torch 2.13's is CUDA 13: driver >= 580, newer GPUs
#                    only); https://download.pytorch.org/whl/cu126 for CUDA 12.6 (compose.gpu.yaml).
#                    The build checks that the torch it installed, from a wheelhouse too, is that build
#   EXTRAS           the project's extras: cpu (default: faiss-cpu) or gpu (faiss-gpu-cu12), never both,
#                    they share one faiss/ folder; the trainer image adds trainers. Every image has the
#                    cluster extra (Ray): compose.yaml's cluster profile runs its Ray nodes on the server image
# Plain `docker build` is enough: nothing here needs BuildKit.

ARG BASE_IMAGE=python:3.11-slim

# ---- build: one virtual environment in /opt/venv, copied whole into the runtime stages below, so
# the wheels, pip's work files and the sources never reach a runtime image's layers.
FROM ${BASE_IMAGE} AS build
ARG WHEELHOUSE=
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG EXTRAS=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
COPY docker/pip-install.sh /usr/local/bin/pip-install
COPY docker/check-torch-build.sh /usr/local/bin/check-torch-build
# Always copied (the folder holds a tracked README); used only when WHEELHOUSE is set.
COPY wheelhouse/ /wheelhouse/
# torch first and pinned, so that the project's torch>=2.3 finds it installed and pulls nothing more.
# Its C++ headers and test binaries (about 150 MB) serve only to build extensions and test torch itself.
RUN pip-install --index-url "$TORCH_INDEX_URL" "$TORCH" \
    && check-torch-build "$TORCH_INDEX_URL" \
    && rm -rf /opt/venv/lib/python3*/site-packages/torch/include /opt/venv/lib/python3*/site-packages/torch/test
COPY pyproject.toml README.md /src/
COPY proto/ /src/proto/
COPY server/ /src/server/
COPY client/ /src/client/
COPY trainers/ /src/trainers/
RUN pip-install "/src[cluster${EXTRAS:+,$EXTRAS}]"

FROM build AS build-trainer
ARG WHEELHOUSE=
ARG EXTRAS=cpu
RUN pip-install "/src[trainers,cluster${EXTRAS:+,$EXTRAS}]"

# ---- runtime: the base image, an unprivileged user, and folders that named volumes take over
# (a fresh volume copies the folder's owner, so the user can write to it).
FROM ${BASE_IMAGE} AS runtime
RUN useradd --create-home --uid 10001 --user-group lmem \
    && mkdir /data /runs /cache \
    && chown lmem:lmem /data /runs /cache
# PASSIVE: idle OpenMP threads sleep instead of spinning on the cores gRPC and other containers need.
ENV PATH=/opt/venv/bin:$PATH \
    OMP_WAIT_POLICY=PASSIVE \
    PYTHONUNBUFFERED=1
WORKDIR /home/lmem

FROM runtime AS trainer
COPY --from=build-trainer /opt/venv /opt/venv
ENV OMNIGLOT_DIR=/omniglot LMEM_CACHE_DIR=/cache
USER lmem
ENTRYPOINT ["python", "-m", "lifelong_memory.trainers.omniglot"]

FROM runtime AS server
COPY --from=build /opt/venv /opt/venv
COPY docker/healthcheck.py /opt/lmem/healthcheck.py
COPY docker/ray-node.sh /usr/local/bin/ray-node
USER lmem
EXPOSE 50051 9464
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/lmem/healthcheck.py", "127.0.0.1:50051"]
CMD ["lmem", "serve", "--host", "0.0.0.0", "--port", "50051"]
