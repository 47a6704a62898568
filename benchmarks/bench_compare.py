"""Optional comparison (c): the same query + update work in Qdrant (``:memory:``) and Milvus Lite.

Run from the repository root:

    .venv/bin/pip install qdrant-client "pymilvus[milvus-lite]"   # optional; a missing system is skipped
    .venv/bin/python benchmarks/bench_compare.py                    # N=65536, B=16, k=256, ~1-3 min
    .venv/bin/python benchmarks/bench_compare.py --n 8192 --min-time 2 --out /tmp/compare.json

The work per step, the same for every system (d=128, exact inner product, N points, ids 0..N-1, each with
a payload label):
  theirs  search the top k=256 of B=16 query vectors, returning each hit's payload label; then upsert the B
          queries as points (vector + label) over B old ids (a ring pointer walks the ids: oldest first)
  ours    ``mem.query(q, labels, update=True, fields={"neighbors"})``: top-256 slots, similarities and
          labels, plus the memory update (merge or write into the oldest slot), in one call
Ours runs embedded (the target's comparison) and, for information, over gRPC (unary and streamed) against
a server subprocess this script starts; Milvus Lite itself runs as an in-process gRPC server behind
pymilvus. Qdrant ``:memory:`` is in-process (exact numpy search; its warning that local mode is meant for
under 20,000 points is silenced); Milvus Lite uses a FLAT (exact) index.

All systems run interleaved in rounds (see bench_memory.py), after the same fill (not timed). Reported:
median ms per step and steps/s; target: ours (embedded) >= 30x their throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import re
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import CHOOSE_K, KEY_DIM, Case, Server, fill, fill_batch, machine_info, measure, unit_rows  # noqa: E402

from lifelong_memory.client import connect  # noqa: E402

TARGET_RATIO = 30.0
FILL_CHUNK = 4096


class Parts:
    """Per-step seconds spent in their search and in their upsert."""

    def __init__(self):
        self.search: list[float] = []
        self.upsert: list[float] = []

    def add(self, search: float, upsert: float) -> None:
        self.search.append(search)
        self.upsert.append(upsert)

    def medians_ms(self) -> tuple[float, float]:
        return statistics.median(self.search) * 1e3, statistics.median(self.upsert) * 1e3


class Ring:
    """Which B ids a step overwrites: the oldest ones, round-robin over 0..N-1."""

    def __init__(self, n: int):
        self.n, self.next = n, 0

    def take(self, b: int) -> list[int]:
        ids = [(self.next + i) % self.n for i in range(b)]
        self.next = (self.next + b) % self.n
        return ids


def qdrant_system(keys: np.ndarray, labels: np.ndarray):
    """Qdrant local mode (``:memory:``): (step, check, close, version, parts), or ImportError."""
    import qdrant_client
    from qdrant_client import QdrantClient, models

    client = QdrantClient(":memory:")
    client.create_collection("mem", vectors_config=models.VectorParams(size=KEY_DIM, distance=models.Distance.DOT))
    for start in range(0, len(keys), FILL_CHUNK):
        stop = min(start + FILL_CHUNK, len(keys))
        client.upsert(
            "mem",
            points=models.Batch(
                ids=list(range(start, stop)),
                vectors=keys[start:stop].tolist(),
                payloads=[{"label": int(y)} for y in labels[start:stop]],
            ),
        )
    ring = Ring(len(keys))
    parts = Parts()

    def step(q: np.ndarray, y: np.ndarray):
        t0 = time.perf_counter()
        requests = [models.QueryRequest(query=row.tolist(), limit=CHOOSE_K, with_payload=True) for row in q]
        hits = client.query_batch_points("mem", requests=requests)
        t1 = time.perf_counter()
        client.upsert(
            "mem",
            points=models.Batch(ids=ring.take(len(q)), vectors=q.tolist(), payloads=[{"label": int(v)} for v in y]),
        )
        parts.add(t1 - t0, time.perf_counter() - t1)
        return hits

    def check(q, y):
        hits = step(q, y)
        assert len(hits) == len(q) and all(len(h.points) == CHOOSE_K for h in hits), "qdrant: short result"
        assert all("label" in p.payload for p in hits[0].points), "qdrant: no payload"

    version = getattr(qdrant_client, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("qdrant-client")
    return step, check, client.close, f"qdrant-client {version} (:memory:)", parts


def milvus_system(keys: np.ndarray, labels: np.ndarray, workdir: Path):
    """Milvus Lite through pymilvus (a ``.db`` path): (step, check, close, version, parts), or ImportError."""
    from importlib.metadata import version as dist_version

    import milvus_lite  # noqa: F401  (pymilvus needs it for .db URIs)
    from pymilvus import DataType, MilvusClient

    client = MilvusClient(str(workdir / "milvus.db"))
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=KEY_DIM)
    schema.add_field("label", DataType.INT64)
    index_params = client.prepare_index_params()
    index_params.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
    client.create_collection("mem", schema=schema, index_params=index_params)
    for start in range(0, len(keys), FILL_CHUNK):
        stop = min(start + FILL_CHUNK, len(keys))
        rows = [
            {"id": i, "vector": keys[i].tolist(), "label": int(labels[i])}
            for i in range(start, stop)  # one dict per point: pymilvus' row format
        ]
        client.insert("mem", data=rows)
    client.load_collection("mem")
    ring = Ring(len(keys))
    parts = Parts()

    def step(q: np.ndarray, y: np.ndarray):
        t0 = time.perf_counter()
        hits = client.search(
            "mem", data=q.tolist(), limit=CHOOSE_K, output_fields=["label"], search_params={"metric_type": "IP"}
        )
        t1 = time.perf_counter()
        ids = ring.take(len(q))
        client.upsert(
            "mem",
            data=[{"id": i, "vector": row.tolist(), "label": int(v)} for i, row, v in zip(ids, q, y, strict=True)],
        )
        parts.add(t1 - t0, time.perf_counter() - t1)
        return hits

    def check(q, y):
        hits = step(q, y)
        assert len(hits) == len(q) and all(len(h) == CHOOSE_K for h in hits), "milvus: short result"
        assert "label" in hits[0][0]["entity"], "milvus: no label in the result"

    versions = f"pymilvus {dist_version('pymilvus')}, milvus-lite {dist_version('milvus-lite')}"
    return step, check, client.close, f"{versions} (FLAT index)", parts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=65_536, help="points / memory slots (default 65536)")
    parser.add_argument("--batch", type=int, default=16, help="queries per step (default 16)")
    parser.add_argument("--min-time", type=float, default=3.0, help="seconds measured per system (default 3)")
    parser.add_argument("--min-reps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-grpc", action="store_true", help="skip our gRPC rows (no server subprocess)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/compare-HOSTNAME.json)")
    args = parser.parse_args(argv)
    n, b = args.n, args.batch
    host = re.sub(r"[^A-Za-z0-9_.-]+", "-", socket.gethostname()).strip("-") or "cpu"
    out_path = args.out or Path(__file__).resolve().parent / "results" / f"compare-{host}.json"

    info = machine_info("cpu")
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"bench_compare: {info['cpu_model']}, {info['cpu_count']} CPUs, torch {info['torch']}")
    print(f"N={n:,} B={b} k={CHOOSE_K} d={KEY_DIM}: per step, top-{CHOOSE_K} search with labels + upsert of B points")

    # Our memory's fill writes seeded random keys with labels 0..N-1; the others get the same keys and labels.
    keys = unit_rows(n, torch.Generator().manual_seed(n)).numpy()
    labels = np.arange(n, dtype=np.int64)
    generator = torch.Generator().manual_seed(args.seed)
    steps = 64
    qs = [unit_rows(b, generator) for _ in range(steps)]
    ys = [torch.randint(0, n, (b,), generator=generator) for _ in range(steps)]
    qs_np, ys_np = [q.numpy() for q in qs], [y.numpy() for y in ys]

    # qdrant-client warns that local mode is meant for < 20,000 points; that is the point of comparing.
    warnings.filterwarnings("ignore", message="Local mode is not recommended")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    workdir = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    systems: dict[str, str] = {}
    skipped: dict[str, str] = {}
    breakdowns: dict[str, Parts] = {}
    cases: list[Case] = []
    fields = frozenset({"neighbors"})
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)

        # ours: embedded (and over gRPC, for information)
        t0 = time.perf_counter()
        local = stack.enter_context(connect("local"))
        mem = local.create_memory("compare", key_dim=KEY_DIM, memory_size=n, choose_k=CHOOSE_K)
        filled = fill(mem, n, seed=n)
        systems["ours-embedded"] = f"lifelong_memory embedded (filled {filled:,}/{n:,} slots)"

        def ours(i, call=mem.query):
            j = i % steps
            return call(qs[j], ys[j], update=True, fields=fields)

        cases.append(Case("float32", "ours-embedded", "fused", ours))
        # For information: the same memory searching a bfloat16 copy of its keys (float32 rescoring).
        mem_bf16 = local.create_memory(
            "compare-bf16", key_dim=KEY_DIM, memory_size=n, choose_k=CHOOSE_K, search_dtype="bfloat16"
        )
        fill(mem_bf16, n, seed=n)
        systems["ours-embedded-bf16"] = "lifelong_memory embedded, search_dtype=bfloat16"
        cases.append(Case("bfloat16", "ours-embedded-bf16", "fused", lambda i, call=mem_bf16.query: ours(i, call)))
        if not args.no_grpc:
            server = Server(max(args.batch, fill_batch(n)))
            stack.callback(server.stop)
            remote = stack.enter_context(connect(server.url))
            rmem = remote.create_memory("compare", key_dim=KEY_DIM, memory_size=n, choose_k=CHOOSE_K)
            fill(rmem, n, seed=n)
            stream = stack.enter_context(rmem.stream())
            for name, call in (("ours-grpc-unary", rmem.query), ("ours-grpc-stream", stream.query)):
                systems[name] = "lifelong_memory over gRPC (server subprocess)"

                def ours_remote(i, call=call):
                    j = i % steps
                    return call(qs[j], ys[j], update=True, fields=fields)

                cases.append(Case("float32", name, "fused", ours_remote))
        print(f"ours: filled in {time.perf_counter() - t0:.1f} s", flush=True)

        for name, build in (
            ("qdrant", lambda: qdrant_system(keys, labels)),
            ("milvus-lite", lambda: milvus_system(keys, labels, workdir)),
        ):
            t0 = time.perf_counter()
            try:
                step, check, close, version, parts = build()
            except ImportError as exc:
                skipped[name] = f"not installed ({exc}); pip install the 'compare' extra to include it"
                print(f"{name}: SKIPPED, {skipped[name]}", flush=True)
                continue
            except Exception as exc:  # a system that fails to start is reported, not fatal
                skipped[name] = f"failed to set up: {type(exc).__name__}: {exc}"
                print(f"{name}: SKIPPED, {skipped[name]}", flush=True)
                continue
            stack.callback(close)
            check(qs_np[0], ys_np[0])
            systems[name] = version
            breakdowns[name] = parts
            print(f"{name}: {version}, filled in {time.perf_counter() - t0:.1f} s", flush=True)

            def theirs(i, step=step):
                j = i % steps
                return step(qs_np[j], ys_np[j])

            cases.append(Case("float32", name, "fused", theirs))

        t0 = time.perf_counter()
        measure(cases, lambda: None, args.min_time, args.min_reps)
        print(f"measured {len(cases)} systems in {time.perf_counter() - t0:.1f} s\n", flush=True)

    rows = []
    for case in cases:
        ms = sorted(t * 1e3 for t in case.times)
        median = statistics.median(ms)
        rows.append(
            {
                "system": case.mode,
                "detail": systems[case.mode],
                "median_ms": median,
                "steps_per_s": 1e3 / median,
                "p10_ms": ms[len(ms) // 10],
                "p90_ms": ms[(len(ms) * 9) // 10],
                "reps": len(ms),
            }
        )
        if case.mode in breakdowns:
            search_ms, upsert_ms = breakdowns[case.mode].medians_ms()
            rows[-1].update(search_ms=search_ms, upsert_ms=upsert_ms)
            rows[-1]["detail"] += f"; median search {search_ms:.1f} ms + upsert {upsert_ms:.1f} ms"
    ours_rate = rows[0]["steps_per_s"]
    header = f"{'system':<18} {'ms/step':>9} {'steps/s':>9} {'ours-embedded / this':>21}  detail"
    print(header)
    print("-" * len(header))
    for r in rows:
        r["ours_embedded_over_this"] = ours_rate / r["steps_per_s"]
        print(
            f"{r['system']:<18} {r['median_ms']:>9.3f} {r['steps_per_s']:>9.1f} "
            f"{r['ours_embedded_over_this']:>20.1f}x  {r['detail']}"
        )
    for name, why in skipped.items():
        print(f"{name:<18} {'-':>9} {'-':>9} {'-':>21}  SKIPPED: {why}")

    targets = []
    print(f"\nTARGETS (c) ours embedded fused query+update >= {TARGET_RATIO:.0f}x their steps/s, N={n:,} B={b}")
    for name in ("qdrant", "milvus-lite"):
        r = next((r for r in rows if r["system"] == name), None)
        if r is None:
            targets.append({"target": f"(c) vs {name}", "measured": None, "pass": None, "detail": skipped.get(name)})
            print(f"  vs {name:<12} skipped")
            continue
        ratio = r["ours_embedded_over_this"]
        targets.append(
            {
                "target": f"(c) vs {name}",
                "measured": round(ratio, 2),
                "goal": f">= {TARGET_RATIO:.0f}x",
                "pass": ratio >= TARGET_RATIO,
            }
        )
        verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
        print(f"  vs {name:<12} {ratio:8.1f}x  {verdict}  ({ours_rate:.1f} vs {r['steps_per_s']:.1f} steps/s)")
        bf16 = next(row for row in rows if row["system"] == "ours-embedded-bf16")
        bf16_ratio = bf16["steps_per_s"] / r["steps_per_s"]
        targets.append({"target": f"(c, info) bf16 search vs {name}", "measured": round(bf16_ratio, 2)})
        print(f"  (info) ours with bfloat16 search vs {name}: {bf16_ratio:.1f}x")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "bench_compare",
        "started": started,
        "machine": info,
        "settings": {"N": n, "B": b, "k": CHOOSE_K, "key_dim": KEY_DIM, "min_time_s": args.min_time},
        "results": rows,
        "skipped": skipped,
        "targets": targets,
    }
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
