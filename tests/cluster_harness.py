"""Shard faults on a Ray cluster: a writer streams fused updates while shard processes are stopped and killed.

    python tests/cluster_harness.py --cycles 20 [--json out.json]

Each cycle picks a shard of a 3-shard memory (placement node, on a 3-node cluster this script starts on the
machine: ray.cluster_utils.Cluster) and, from another thread mid-stream, either stops its process (SIGSTOP:
the memory must answer UNAVAILABLE, then the process is SIGKILLed) or kills it at once (SIGKILL). The writer
logs every outcome; once Ray has restarted the shard and it serves again, the crash harness's verifier checks
that the memory is a serial replay of exactly the acknowledged writes: nothing acknowledged lost, no write
that answered UNAVAILABLE applied. At the end every shard's copy of its keys must equal the front end's, and
the memory must search as the replay does in one process. tests/test_cluster.py runs 4 cycles; this script
runs the long version.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import torch
from crash_harness import CONFIG, Verifier, client_batch

from lifelong_memory.client import Unavailable

PREFILL_STEPS = 100  # 400 rows into 256 slots: every shard holds keys before the first fault


def stream_through_shard_faults(memory, actors, cycles: list[tuple[int, str]], log_path: Path) -> dict:
    """Run ``cycles`` of (shard, "stop" or "kill") against ``memory`` (a client handle of a memory of the crash
    harness's CONFIG on a cluster; ``actors`` its shards' actor handles), checking after each; the figures."""
    import ray

    verifier = Verifier()
    step, unavailable = 0, 0
    with open(log_path, "w") as log:
        while step < PREFILL_STEPS:
            step += 1
            result = memory.query(*client_batch(0, step), update=True, fields=())
            log.write(json.dumps({"step": step, "acked": result.commit_sequence}) + "\n")
        for shard, how in cycles:
            victim = memory.info().shards[shard].pid
            logged = ray.get(actors[shard].describe.remote())["sequence"]  # what its data directory holds
            assert logged > 0
            fault = threading.Timer(0.2, os.kill, (victim, signal.SIGSTOP if how == "stop" else signal.SIGKILL))
            fault.start()
            seen, deadline, killed = unavailable, time.monotonic() + 120, False
            while True:
                assert time.monotonic() < deadline, f"shard {shard} did not come back"
                step += 1
                try:
                    result = memory.query(*client_batch(0, step), update=True, fields=())
                except Unavailable as exc:
                    assert "shards on the cluster do not all answer" in str(exc), str(exc)
                    unavailable += 1
                    log.write(json.dumps({"step": step, "acked": None}) + "\n")
                    if how == "stop" and not killed:
                        os.kill(victim, signal.SIGKILL)  # a stopped process dies of SIGKILL too
                        killed = True
                    continue
                log.write(json.dumps({"step": step, "acked": result.commit_sequence}) + "\n")
                health = memory.info().shards[shard]
                if health.pid != victim and health.state == "serving":
                    break
            fault.join()
            log.flush()
            if how == "stop":
                assert unavailable > seen, "the stopped shard's memory answered"
            verifier.check([log_path], memory.read_slots(range(CONFIG["memory_size"]))._asdict())
            assert verifier.in_flight_applied == 0, "a write answered UNAVAILABLE was applied"
            restarted = ray.get(actors[shard].describe.remote())
            assert restarted["restarted"] and restarted["recovered_sequence"] >= logged  # read back from its disk
    assert verifier.replay.commit_sequence == memory.info().stats["commit_sequence"]
    check_shards_hold_the_memory(memory, actors, verifier.replay)
    return {
        "faults": len(cycles),
        "stops": sum(how == "stop" for _, how in cycles),
        "acknowledged_writes": len(verifier.acked),
        "unavailable_answers": unavailable,
        "unavailable_applied": verifier.in_flight_applied,
        "final_commit_sequence": verifier.replay.commit_sequence,
    }


def check_shards_hold_the_memory(memory, actors, replay) -> None:
    """Every shard's copy equals the front end's keys of its range, and the memory searches as ``replay``."""
    import ray

    front_end_keys = memory.read_slots(range(CONFIG["memory_size"])).keys
    for shard in memory.info().shards:
        copy = torch.tensor(ray.get(actors[shard.shard].keys.remote()))
        assert torch.equal(copy, front_end_keys[shard.slot_start : shard.slot_stop]), f"shard {shard.shard}"
    probe = torch.nn.functional.normalize(torch.randn(16, CONFIG["key_dim"]), dim=1)
    got, want = memory.query(probe, fields={"neighbors"}), replay.query(probe, fields={"neighbors"})
    for name in ("neighbor_slots", "neighbor_similarities", "predictions"):
        assert torch.equal(torch.as_tensor(getattr(got, name)), getattr(want, name)), name


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    from lifelong_memory.client import connect
    from lifelong_memory.server.cluster import NAMESPACE, RayCluster
    from lifelong_memory.server.registry import MemoryRegistry
    from lifelong_memory.server.service import ServerLimits, build_server

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as work:
            registry = MemoryRegistry(cluster=RayCluster(cluster.address, f"{work}/shards", call_timeout=5.0))
            server, port = build_server("127.0.0.1:0", registry, ServerLimits(max_batch=512))
            server.start()
            with connect(f"grpc://127.0.0.1:{port}", retries=0) as store:
                memory = store.create_memory("faults", **CONFIG, shards=3, placement="node")
                cycles = [(i % 3, "stop" if i % 2 else "kill") for i in range(args.cycles)]
                started = time.monotonic()
                figures = stream_through_shard_faults(
                    memory, registry.get("faults").index.actors, cycles, Path(work) / "log"
                )
                figures["seconds"] = round(time.monotonic() - started, 1)
            server.stop(grace=None)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
