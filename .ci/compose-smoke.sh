#!/usr/bin/env bash
# Compose smoke test: build the images with no container registry, bring compose.yaml up, talk to the
# server from the host, check that both trainers train against it, restart the server, bring the cluster
# profile up (a Ray head, two workers, the front end) and check a memory whose shards are on both workers,
# tear down.
#
#   .ci/compose-smoke.sh VENV        # VENV: a virtual environment with the project installed (the host's client)
#
# Runs as root on Debian 12 (apt-get, dockerd, debootstrap); see ../shared/docs/docker-offline.md.
# OMNIGLOT (default ../shared/data/omniglot) is the folder with the Omniglot zips, mounted read-only.
# Exits non-zero on the first failure; prints the time of every phase.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=$(realpath "${1:?usage: $0 VENV}")
omniglot=$(realpath "${OMNIGLOT:-../shared/data/omniglot}")
base_image=local/debian-python:bookworm
torch=torch==2.13.0 # the Makefile's and the Dockerfile's pin
project=lmem-smoke-$$
scratch=$(mktemp -d)
compose=(docker-compose -f compose.yaml -p "$project")
# The short trainer runs (compose.yaml reads these): enough to validate, checkpoint and evaluate.
export TRAIN_EPISODE_BATCHES=12 TRAIN_VALIDATE_EVERY=6 TRAIN_VALIDATION_EPISODES=5 \
    TRAIN_EVALUATION_EPISODES=5 TRAIN_CHECKPOINT_EVERY=6 OMNIGLOT_DIR=$omniglot
# compose v1 would hand builds to `docker build`, whose BuildKit (buildx) is not installed here.
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0

phase_name='' phase_start=$SECONDS
phase() { # end the running phase, printing its time, and start the one named $1 (none if empty)
    [[ -z $phase_name ]] || printf '== %s: %ds\n' "$phase_name" $((SECONDS - phase_start))
    phase_name=$1 phase_start=$SECONDS
    [[ -z $phase_name ]] || echo "== $phase_name"
}

wait_healthy() { # wait_healthy SERVICE: compose v1 has no `up --wait`, so read its health check ourselves
    local container health
    container=$("${compose[@]}" --profile cluster ps -q "$1")
    for _ in $(seq 120); do
        health=$(docker inspect -f '{{.State.Health.Status}}' "$container")
        [[ $health == starting ]] || break
        sleep 1
    done
    echo "$1 service: $health, on $url"
    [[ $health == healthy ]]
}

lmem() { "$venv/bin/lmem" "$1" --url "$url" "${@:2}"; } # lmem COMMAND ARGS..., against this stack

free_ports() { # two free host ports, so that a server or another run on this machine does not collide with this one
    "$venv/bin/python" -c 'import socket
sockets = [socket.socket() for _ in range(2)]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in sockets))'
}

dockerd_pid='' stack_up=''
cleanup() {
    local status=$?
    set +e
    if [[ -n $stack_up ]]; then
        if ((status != 0)); then "${compose[@]}" logs --no-color --tail=40; fi
        phase "tear down"
        "${compose[@]}" --profile cluster down -v --remove-orphans --timeout 20
    fi
    if [[ -n $dockerd_pid ]]; then # only the daemon this script started
        kill "$dockerd_pid"
        wait "$dockerd_pid"
    fi
    phase ''
    rm -rf "$scratch"
    echo "== compose smoke test: $( ((status == 0)) && echo passed || echo FAILED) in ${SECONDS}s"
    exit "$status"
}
trap cleanup EXIT

phase "install docker.io, docker-compose, debootstrap"
missing=()
for tool in docker.io:dockerd docker-compose:docker-compose debootstrap:debootstrap; do
    command -v "${tool#*:}" >/dev/null || missing+=("${tool%%:*}")
done
if ((${#missing[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

phase "docker daemon"
if ! docker info >/dev/null 2>&1; then
    dockerd >"$scratch/dockerd.log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    docker info >/dev/null 2>&1 || { cat "$scratch/dockerd.log"; exit 1; }
fi

phase "base image $base_image"
# No registry to pull python:3.11-slim from: a minimal Debian with python3 and venv, made once.
if ! docker image inspect "$base_image" >/dev/null 2>&1; then
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$scratch/rootfs" >"$scratch/debootstrap.log" ||
        { tail -20 "$scratch/debootstrap.log"; exit 1; }
    rm -rf "$scratch"/rootfs/var/cache/apt/archives/*.deb "$scratch"/rootfs/var/lib/apt/lists/*
    tar -C "$scratch/rootfs" -c . | docker import -c 'CMD ["bash"]' - "$base_image" >/dev/null
    rm -rf "$scratch/rootfs"
fi

phase "the GPU override merges with compose.yaml"
# Its configuration only: no GPU here to run it on.
docker-compose -f compose.yaml -f compose.gpu.yaml config -q

phase "wheelhouse"
# pip inside a build container cannot reach PyPI here, so the wheels come from the host: torch pinned, the
# project's dependencies with the trainers' and the cpu extras, its build requirements. This machine's
# pip configuration (TORCH_INDEX_URL empty) finds the CPU build of that torch on disk.
TORCH=$torch TORCH_INDEX_URL='' TORCH_BUILD=cpu EXTRAS=trainers,cpu docker/fill-wheelhouse.sh "$venv/bin/python" \
    2>"$scratch/pip.log" || { cat "$scratch/pip.log"; exit 1; }

phase "build images"
export BASE_IMAGE=$base_image WHEELHOUSE=/wheelhouse
"${compose[@]}" build --force-rm >"$scratch/build.log" 2>&1 || { tail -40 "$scratch/build.log"; exit 1; }
docker image ls lifelong-memory --format '{{.Repository}}:{{.Tag}} {{.Size}}'

phase "up, until the memory service is healthy"
read -r MEMORY_PORT METRICS_PORT < <(free_ports)
export MEMORY_PORT METRICS_PORT
url=grpc://127.0.0.1:$MEMORY_PORT
stack_up=1
"${compose[@]}" up -d
wait_healthy memory

phase "trainers train against the shared server"
# Each trainer clears its memory every episode batch and updates it every step: both memories have to
# appear and their commit sequences keep growing.
"$venv/bin/python" - "$url" <<'EOF'
import sys
import time

from lifelong_memory.client import connect

names, first, deadline = ("omniglot-a", "omniglot-b"), {}, time.time() + 120
with connect(sys.argv[1]) as store:
    while time.time() < deadline:
        sequences = {m.name: m.stats["commit_sequence"] for m in store.list_memories() if m.name in names}
        for name, sequence in sequences.items():
            first.setdefault(name, sequence)
        if all(name in sequences and sequences[name] > first[name] for name in names):
            print(f"commit sequences, first seen -> now: {first} -> {sequences}")
            break
        time.sleep(1)
    else:
        sys.exit(f"trainers made no progress in 120 s: first seen {first}")
EOF

phase "client from the host: lmem, the Python client, metrics"
lmem create smoke --key-dim 16 --memory-size 64 --seed 0 >/dev/null
"$venv/bin/python" - "$url" <<'EOF'
import sys

import numpy as np

from lifelong_memory.client import connect

rng = np.random.default_rng(0)
keys = rng.standard_normal((8, 16)).astype(np.float32)
keys /= np.linalg.norm(keys, axis=1, keepdims=True)
labels = np.arange(8)
with connect(sys.argv[1]) as store:
    memory = store.memory("smoke")
    written = memory.query(keys, labels=labels, update=True)  # fused query + update on an empty memory: writes
    assert written.incorrect.all() and (written.written_slots >= 0).all(), written
    merged = memory.query(keys, labels=labels, update=True)  # the same rows again: every lookup is right, merges
    assert not merged.incorrect.any() and merged.commit_sequence > written.commit_sequence, merged
    read = memory.query(keys, fields=("neighbors",))
    assert (read.predictions.numpy() == labels).all(), read.predictions
    assert np.allclose(read.neighbor_similarities[:, 0].numpy(), 1.0, atol=1e-5), read.neighbor_similarities
    slot_keys, values, _ = memory.slots(written.written_slots.tolist())
    assert (values.numpy() == labels).all() and np.allclose(slot_keys.numpy(), keys, atol=1e-5)
    stats = memory.info().stats
    assert stats["filled_slots"] == 8 and stats["writes"] == 8 and stats["merges"] == 8, stats
    print(f"2 fused query+update calls, a query and a slot read: {stats}")
EOF
lmem ls
lmem describe smoke
# The Prometheus endpoint (LMEM_METRICS_PORT in compose.yaml) counts the calls just made.
"$venv/bin/python" - "http://127.0.0.1:$METRICS_PORT/metrics" <<'EOF'
import sys
import urllib.request

lines = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode().splitlines()
queries = [line for line in lines if line.startswith("lmem_rpc_requests_total{") and 'method="Query"' in line]
assert queries, "no lmem_rpc_requests_total for Query"
print(*queries, sep="\n")
EOF

phase "trainers finish: exit 0, metrics and evaluation in the runs volume"
for service in trainer-a trainer-b; do
    exit_code=$(timeout 600 docker wait "$("${compose[@]}" ps -q "$service")")
    echo "$service exited $exit_code"
    ((exit_code == 0))
done
"${compose[@]}" run --rm --no-deps -T --entrypoint python trainer-a - <<EOF
import json
import pathlib

for run in ("a", "b"):
    out = pathlib.Path("/runs", run)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["episode_batch"] == $TRAIN_EPISODE_BATCHES, last
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert (out / "checkpoint.pt").exists() and (out / "accuracy.png").exists()
    print(f"trainer {run}: {last['episode_batch']} episode batches, loss {last['train_loss']:+.4f},"
          f" 5-way 1-shot {evaluation['5-way']['mean'][1]:.3f} ({evaluation['episodes']} episodes)")
EOF
# Trainers delete their memories when they finish.
if lmem ls | grep omniglot; then
    echo "the trainers' memories are still there after they finished" >&2
    exit 1
fi

phase "restart the memory service: memories persist in the data volume"
"${compose[@]}" restart memory
wait_healthy memory
lmem describe smoke --json |
    "$venv/bin/python" -c 'import json, sys; stats = json.load(sys.stdin)["stats"]; assert stats["filled_slots"] == 8, stats'
lmem rm smoke
status=0
lmem describe smoke 2>/dev/null || status=$?
((status == 3)) || { echo "lmem describe of a deleted memory exited $status, expected 3 (not found)" >&2; exit 1; }

phase "cluster profile: up, until the front end is healthy"
# The single-node server is done with: its cores go to the Ray nodes.
"${compose[@]}" stop memory
read -r CLUSTER_MEMORY_PORT CLUSTER_METRICS_PORT < <(free_ports)
export CLUSTER_MEMORY_PORT CLUSTER_METRICS_PORT
url=grpc://127.0.0.1:$CLUSTER_MEMORY_PORT
"${compose[@]}" --profile cluster up -d memory-cluster
wait_healthy memory-cluster

phase "cluster profile: a memory with a shard on each worker"
lmem create cluster-smoke --key-dim 16 --memory-size 64 --seed 0 --placement node --shards 2 >/dev/null
workers=$(for service in ray-worker-1 ray-worker-2; do
    docker inspect -f '{{.Config.Hostname}}' "$("${compose[@]}" --profile cluster ps -q "$service")"
done)
# shellcheck disable=SC2086  # $workers: one argument per worker
"$venv/bin/python" - "$url" $workers <<'EOF'
import sys

import numpy as np

from lifelong_memory.client import connect

url, *worker_hosts = sys.argv[1:]
rng = np.random.default_rng(0)
keys = rng.standard_normal((8, 16)).astype(np.float32)
keys /= np.linalg.norm(keys, axis=1, keepdims=True)
labels = np.arange(8)
with connect(url) as store:
    memory = store.memory("cluster-smoke")
    written = memory.query(keys, labels=labels, update=True)  # fused query + update: the keys go to their shards
    assert written.incorrect.all() and (written.written_slots >= 0).all(), written
    read = memory.query(keys, fields=("neighbors",))  # searched by both shards
    assert (read.predictions.numpy() == labels).all(), read.predictions
    assert np.allclose(read.neighbor_similarities[:, 0].numpy(), 1.0, atol=1e-5), read.neighbor_similarities
    shards = memory.info().shards
    # ShardHealth.node: "<Ray node id> (<host>, <device>)"; a container's host name is its own.
    nodes = {s.node.split(" ")[0] for s in shards}
    hosts = {s.node.split("(")[1].split(",")[0] for s in shards}
    assert len(shards) == 2 and all(s.state == "serving" for s in shards), shards
    assert len(nodes) == 2 and hosts == set(worker_hosts), (shards, worker_hosts)
    print(f"2 shards on 2 Ray nodes, the worker containers {sorted(hosts)}: {[s.node for s in shards]}")
EOF
lmem describe cluster-smoke
