"""The fused query + update through a Ray cluster against the same memory with its shards in-process.

Run from the repository root (the project installed in .venv with the cluster extra):

    .venv/bin/python benchmarks/bench_cluster.py                      # N = 1M, B = 256, 4 shards (~3 min, 2 cores)
    .venv/bin/python benchmarks/bench_cluster.py --size 65536 --min-time 1 --out /tmp/c.json
    .venv/bin/python benchmarks/bench_cluster.py --address HOST:6379  # an existing cluster instead of a local one

Two memories of one config (d=128, k=256, age noise 8, seed 0) start from one state (N random unit keys,
each slot written, labels from 0 to N/4): ``local``, its S shards searched in this process (server/index.py,
ShardedIndex), and ``cluster``, its S shards Ray actors (server/cluster.py, placement node) on a cluster this
script starts on this machine (ray.cluster_utils.Cluster: a head and S - 1 workers, one shard per node) or
the one at --address. Both are driven in this process through Memory.query, as the server calls it, so the
difference is the index alone: in-process shards against Ray actors (the transfer of queries and of each
shard's top k, the routed writes, the front end's merge).

The same batches go to both, in the same order, and every step's written slots and predictions must be equal
(the run stops otherwise): the cluster path gives the same answers, bit for bit. Timing: the two cases
alternate call by call, so a shared machine's noise hits both alike, until each has --min-time seconds; the
median ms per call is reported, with the ratio cluster / local (the issue's target: <= 1.3 at N = 1M,
B = 256, 4 shards). Anchors, what Ray itself costs per call: a round trip to one shard actor that does no
work (``describe``), and one to every shard at once (the fan-out a search pays before any search).

The front end uses --threads torch threads (default 1); each shard actor one (Ray's OMP_NUM_THREADS for an
actor of one CPU). With S shards on 2 cores, the actors search in parallel where the in-process shards
search one after the other: say so when comparing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lifelong_memory.client.memory_file import entries_state
from lifelong_memory.server.cluster import NAMESPACE, RayCluster
from lifelong_memory.server.memory import Memory, MemoryConfig, MemoryState

DIM, K = 128, 256


def initial_state(config: MemoryConfig, seed: int) -> MemoryState:
    """N random unit keys, every slot written in one commit, labels 0 .. N/4 - 1."""
    generator = torch.Generator().manual_seed(seed)
    size = config.memory_size
    keys = torch.nn.functional.normalize(torch.randn(size, DIM, generator=generator), dim=1)
    return entries_state(config, keys, torch.randint(0, size // 4, (size,), generator=generator), rows_per_commit=size)


def batches(state: MemoryState, batch: int, seed: int):
    """Queries near stored keys with their labels or another: a mix of merges and writes, as in training."""
    generator = torch.Generator().manual_seed(seed + 1)
    size = len(state.values)
    while True:
        slots = torch.randint(0, size, (batch,), generator=generator)
        queries = state.keys[slots] + 0.05 * torch.randn(batch, DIM, generator=generator)
        labels = state.values[slots].clone()
        relabel = torch.rand(batch, generator=generator) < 0.5
        labels[relabel] = torch.randint(0, size // 4, (int(relabel.sum()),), generator=generator)
        yield torch.nn.functional.normalize(queries, dim=1), labels


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1 << 20, help="memory size N (default 1,048,576)")
    parser.add_argument("--batch", type=int, default=256, help="query rows per call B (default 256)")
    parser.add_argument("--shards", type=int, default=4, help="shards S (default 4)")
    parser.add_argument("--min-time", type=float, default=10.0, help="seconds measured per case (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the front end (default 1)")
    parser.add_argument("--address", help="an existing Ray cluster (default: start one on this machine)")
    parser.add_argument("--out", default="benchmarks/results/cluster-1m.json", help="JSON results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import ray

    cluster = None
    if args.address is None:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        for _ in range(args.shards - 1):
            cluster.add_node(num_cpus=1)
        address = cluster.address
    else:
        address = args.address
    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    try:
        base = MemoryConfig(key_dim=DIM, memory_size=args.size, choose_k=K, shards=args.shards).validated()
        state = initial_state(base, seed=0)
        local = Memory(base, state)
        with tempfile.TemporaryDirectory() as shard_dir:
            started = time.perf_counter()
            placed = dataclasses.replace(base, placement="node")
            remote = Memory(placed, state, index_builder=RayCluster(address, shard_dir).index_builder("bench"))
            placement_s = time.perf_counter() - started
            nodes = {h.node.split()[0] for h in remote.index.health()}
            cases = {"local": local, "cluster": remote}
            times: dict[str, list[float]] = {name: [] for name in cases}
            stream = batches(state, args.batch, seed=0)
            steps = 0
            while min(sum(t) for t in times.values()) < args.min_time * 1000 or steps < 4:
                queries, labels = next(stream)
                results = {}
                for name, memory in cases.items():
                    start = time.perf_counter()
                    results[name] = memory.query(queries, labels, update=True, fields=())
                    if steps >= 2:  # the first calls warm up buffers and connections
                        times[name].append((time.perf_counter() - start) * 1000)
                for field in ("written_slots", "predictions"):
                    if not torch.equal(getattr(results["local"], field), getattr(results["cluster"], field)):
                        raise SystemExit(f"step {steps}: {field} differ between the local and the cluster memory")
                steps += 1
            actors = remote.index.actors
            one = [timed(lambda: ray.get(actors[0].describe.remote())) for _ in range(50)]
            fan_out = [timed(lambda: ray.get([a.describe.remote() for a in actors])) for _ in range(50)]
            medians = {name: statistics.median(t) for name, t in times.items()}
            result = {
                "size": args.size,
                "batch": args.batch,
                "shards": args.shards,
                "key_dim": DIM,
                "k": K,
                "front_end_threads": args.threads,
                "nodes": len(nodes),
                "steps": steps,
                "identical_answers_every_step": True,
                "fused_ms_median": medians,
                "fused_calls": {name: len(t) for name, t in times.items()},
                "cluster_over_local": medians["cluster"] / medians["local"],
                "ray_round_trip_ms_median": {
                    "one_shard": statistics.median(one),
                    "every_shard": statistics.median(fan_out),
                },
                "cluster_memory_build_s": placement_s,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "ray": ray.__version__},
                "load_average_at_end": os.getloadavg(),
            }
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    print(f"N={args.size:,} B={args.batch} S={args.shards}, {result['nodes']} nodes, {steps} steps, answers identical")
    for name, ms in medians.items():
        print(f"  fused {name:<8} {ms:8.1f} ms/call (median of {len(times[name])})")
    print(f"  cluster / local          {result['cluster_over_local']:.2f}x  (target <= 1.3)")
    trips = result["ray_round_trip_ms_median"]
    print(f"  Ray round trip, no work  {trips['one_shard']:.2f} ms to one shard, {trips['every_shard']:.2f} ms to all")
    print(f"  building the cluster memory (placing {args.shards} actors, sending the keys) {placement_s:.1f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
