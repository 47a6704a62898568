#!/bin/sh
# A container of compose.yaml's cluster profile as a Ray node (docs/scale-out.md):
#
#   ray-node head              the head (the cluster's GCS) with no CPUs: no shard is ever placed on it
#   ray-node worker            a node with RAY_WORKER_CPUS CPUs (default 2): the shards' actors run here
#   ray-node frontend ARGS...  joins with no CPUs (a Ray driver needs a node in its own container), waits until
#                              RAY_WORKERS nodes with CPUs (default 2) have joined, then runs `lmem serve ARGS...`
#                              against the cluster, as this script's process (it gets the container's SIGTERM)
#
# RAY_HEAD: the head's host:port (default ray-head:6379). RAY_OBJECT_STORE_BYTES: each node's object store
# (default 256 MiB, less than the container's shm_size so that it lives in /dev/shm).
set -eu
head=${RAY_HEAD:-ray-head:6379}
common="--disable-usage-stats --object-store-memory=${RAY_OBJECT_STORE_BYTES:-268435456}"

wait_for_head() { # until the head's GCS port accepts connections (the head container may still be starting)
    python - "$head" <<'EOF'
import socket
import sys
import time

host, port = sys.argv[1].rsplit(":", 1)
deadline = time.monotonic() + 120
while True:
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        break
    except OSError as exc:
        if time.monotonic() > deadline:
            sys.exit(f"the Ray head {sys.argv[1]} does not answer after 120 s: {exc}")
        time.sleep(0.5)
EOF
}

role=${1:?usage: ray-node head|worker|frontend [lmem serve ARGS...]}
shift
case $role in
head)
    # shellcheck disable=SC2086  # $common: several flags
    exec ray start --head --port="${head##*:}" --num-cpus=0 --include-dashboard=false $common --block
    ;;
worker)
    wait_for_head
    # shellcheck disable=SC2086
    exec ray start --address="$head" --num-cpus="${RAY_WORKER_CPUS:-2}" $common --block
    ;;
frontend)
    wait_for_head
    # shellcheck disable=SC2086
    ray start --address="$head" --num-cpus=0 $common
    # The server places the shards of the memories it recovers as it starts: only once the workers are there.
    python - "${RAY_WORKERS:-2}" <<'EOF'
import sys
import time

import ray

wanted, deadline = int(sys.argv[1]), time.monotonic() + 120
ray.init(address="auto", log_to_driver=False, configure_logging=False)
while True:
    workers = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    if len(workers) >= wanted:
        print(f"the Ray cluster has {len(workers)} nodes with CPUs for shards", flush=True)
        break
    if time.monotonic() > deadline:
        sys.exit(f"only {len(workers)} of {wanted} Ray workers joined in 120 s")
    time.sleep(0.5)
ray.shutdown()
EOF
    exec lmem serve --cluster "$head" "$@"
    ;;
*)
    echo "ray-node: unknown role $role (head, worker or frontend)" >&2
    exit 2
    ;;
esac
