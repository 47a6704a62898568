"""How many IVF lists must be probed to keep exact search's positive and negative, as the lists get finer.

Run from the repository root (the project installed in .venv):

    .venv/bin/python benchmarks/bench_ivf_lists.py                      # N = 65,536, nlist 256, 2,048, 8,192
    .venv/bin/python benchmarks/bench_ivf_lists.py --n 1048576 --lists 1024,4096 --out /tmp/lists.json

bench_ann.py's probes@95 column shows that at the memory's default nlist (about sqrt(N)) 95% of rows need
close to half of the lists probed to keep the exact positive and negative on clustered keys: a query's nearest
key of another class lies in a list whose centroid averages many random cluster centres, so the centroid
barely points towards it. This script measures FAISS IVF used directly, as a library, on bench_ann's clustered
keys (N / 32 random centres, noise of norm 0.5, the cluster is the label) for several nlist, up to one list
per cluster. Fine lists use an HNSW coarse quantizer (FAISS's IVF<nlist>_HNSW32, its advice from 1M keys on)
and k-means on TRAIN_POINTS_PER_LIST points per list. ``--centroids`` also tries two cheaper ways to get fine
lists, since k-means for about N / 32 lists is out of reach on a CPU at 16M keys:

  kmeans       FAISS k-means on TRAIN_POINTS_PER_LIST points per list (the default)
  sample       nlist keys drawn at random are the centroids (no k-means); every key to its nearest one
  two-level    k-means into about sqrt(nlist) coarse lists, then k-means into fine lists within each coarse
               list (nlist shared by their sizes, as faiss.contrib.clustering.two_level_clustering); every key
               to the nearest fine centroid of its nearest coarse list

Per nlist and way, in one run:

  train s      the centroids and the quantizer; add s: every key assigned to its list
  probes@95    the fewest lists probed for which 95% of rows have the exact positive and negative slots in a
               probed list (lists ranked by exact centroid similarity), and that as a share of nlist
  search ms    FAISS's search for the k = 256 nearest of B queries, probing probes@95 lists (median)
  × exact      exact search (torch q @ K.T and top k, the same B queries, same run) / that
  recall@1, pos+neg = exact   of that search: positive and negative are the nearest found slot of the
               query's label and of another label, as the memory picks them from its k neighbours
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_ann import D, K, Keys, lists_for_95
from bench_memory import machine_info

from lifelong_memory.server.index import import_faiss

TRAIN_POINTS_PER_LIST = 8
KMEANS_ITERATIONS = 10
HNSW_FROM_LISTS = 8192  # coarser quantizers are searched exactly
HNSW_NEIGHBOURS, HNSW_EF_SEARCH = 32, 128


def sides(slots: np.ndarray, labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """[2, B]: per row the first of ``slots`` (nearest first, -1 none) with the query's label, and with another."""
    found = slots >= 0
    same = (labels[np.maximum(slots, 0)] == query_labels[:, None]) & found
    other = ~same & found
    pick = np.full((2, len(slots)), -1, dtype=np.int64)
    for side, mask in enumerate((same, other)):
        rows = mask.any(axis=1)
        pick[side, rows] = slots[rows, mask[rows].argmax(axis=1)]
    return pick


def median_time(call, reps: int) -> float:
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def nearest(rows: np.ndarray, centroids: np.ndarray, block: int = 1 << 16) -> np.ndarray:
    """Each row's most similar centroid (exact, in blocks of rows)."""
    found, centroid_tensor = np.empty(len(rows), dtype=np.int64), torch.from_numpy(centroids)
    for at in range(0, len(rows), block):
        found[at : at + block] = (torch.from_numpy(rows[at : at + block]) @ centroid_tensor.T).argmax(dim=1).numpy()
    return found


def kmeans(faiss, rows: np.ndarray, count: int, seed: int) -> np.ndarray:
    means = faiss.Kmeans(D, count, niter=KMEANS_ITERATIONS, spherical=True, seed=seed, min_points_per_centroid=1,
                         max_points_per_centroid=TRAIN_POINTS_PER_LIST)  # fmt: skip
    means.train(np.ascontiguousarray(rows))
    return means.centroids


def cheap_lists(faiss, keys: np.ndarray, lists: int, way: str) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Centroids made without k-means over all of them, each key's list, and the seconds each took."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    if way == "sample":
        centroids = np.ascontiguousarray(keys[np.sort(rng.choice(len(keys), lists, replace=False))])
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        return centroids, nearest(keys, centroids), train_s, time.perf_counter() - start
    sample = keys[rng.permutation(len(keys))[: TRAIN_POINTS_PER_LIST * lists]]
    coarse_count = max(1, int(round(lists**0.5)))
    coarse = kmeans(faiss, sample, coarse_count, seed=0)
    sample_home = nearest(sample, coarse)
    shares = np.diff(np.cumsum(np.bincount(sample_home, minlength=coarse_count)) * lists // len(sample), prepend=0)
    fine = [np.empty((0, D), dtype=np.float32)] * coarse_count
    for c in np.flatnonzero(shares):
        fine[c] = kmeans(faiss, sample[sample_home == c], int(shares[c]), seed=int(c) + 1)
    offsets = np.cumsum([0] + [len(f) for f in fine])
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    key_coarse, home = nearest(keys, coarse), np.zeros(len(keys), dtype=np.int64)
    for c in np.flatnonzero(shares):
        rows = np.flatnonzero(key_coarse == c)
        home[rows] = offsets[c] + nearest(keys[rows], fine[c])
    return np.ascontiguousarray(np.vstack(fine)), home, train_s, time.perf_counter() - start


def bench_lists(faiss, keys: np.ndarray, labels: np.ndarray, queries: np.ndarray, query_labels: np.ndarray,
                exact_sides: np.ndarray, lists: int, way: str, reps: int, quantizer_kind: str) -> dict:  # fmt: skip
    hnsw = quantizer_kind == "hnsw" or (quantizer_kind == "auto" and lists >= HNSW_FROM_LISTS)
    if hnsw:
        quantizer = faiss.IndexHNSWFlat(D, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        quantizer.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        quantizer = faiss.IndexFlatIP(D)
    index = faiss.IndexIVFFlat(quantizer, D, lists, faiss.METRIC_INNER_PRODUCT)
    if way == "kmeans":
        index.cp.spherical, index.cp.niter, index.cp.seed = True, KMEANS_ITERATIONS, 0
        index.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST
        sample = keys[np.random.default_rng(0).permutation(len(keys))[: TRAIN_POINTS_PER_LIST * lists]]
        start = time.perf_counter()
        index.train(sample)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        index.add(keys)
        add_s = time.perf_counter() - start
    else:
        centroids, assigned, train_s, add_s = cheap_lists(faiss, keys, lists, way)
        quantizer.add(centroids)
        index.is_trained = True
        ids = np.arange(len(keys), dtype=np.int64)
        index.add_core(len(keys), faiss.swig_ptr(keys), faiss.swig_ptr(ids), faiss.swig_ptr(assigned))

    home = np.empty(len(keys), dtype=np.int64)  # the list each key was added to
    for number in range(lists):
        size = index.invlists.list_size(number)
        if size:
            home[faiss.rev_swig_ptr(index.invlists.get_ids(number), size)] = number
    centroids = index.quantizer.reconstruct_n(0, lists)
    order = np.argsort(-(queries @ centroids.T), axis=1, kind="stable")
    probes = lists_for_95(order, [np.where(slots >= 0, home[slots], -1) for slots in exact_sides])

    index.nprobe = probes
    if hnsw:  # the quantizer must look at least that far to return nprobe lists
        quantizer.hnsw.efSearch = max(HNSW_EF_SEARCH, probes)
    search_s = median_time(lambda: index.search(queries, K), reps)
    found = index.search(queries, K)[1]
    got = sides(found, labels, query_labels)
    same = (got == exact_sides).all(axis=0)
    return {
        "nlist": lists,
        "centroids": way,
        "quantizer": "hnsw" if hnsw else "flat",
        "train_s": train_s,
        "add_s": add_s,
        "probes_95": probes,
        "search_ms": 1e3 * search_s,
        "recall_at_1": float(np.mean(found[:, 0] == exact_top1(queries, keys))),
        "sides_equal": float(same.mean()),
    }


def exact_top1(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    return (torch.from_numpy(queries) @ torch.from_numpy(keys).T).argmax(dim=1).numpy()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1 << 16, help="keys (default 65,536)")
    parser.add_argument("--lists", default="256,2048,8192", help="comma-separated nlist values")
    parser.add_argument("--centroids", default="kmeans", help="comma-separated: kmeans, sample, two-level")
    parser.add_argument(
        "--quantizer",
        choices=("auto", "flat", "hnsw"),
        default="auto",
        help=f"coarse quantizer: exact (flat) or HNSW; auto: HNSW from {HNSW_FROM_LISTS:,} lists",
    )
    parser.add_argument("--batch", type=int, default=256, help="queries per search (B)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch and faiss threads (default 1)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/ivf-lists.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss = import_faiss()
    faiss.omp_set_num_threads(args.threads)

    source = Keys("clustered", args.n, seed=0)
    stored, stored_labels = source.fill_rows(0, args.n)
    keys, labels = np.ascontiguousarray(stored.numpy()), stored_labels.numpy()
    query_tensor, query_label_tensor = source.rows(args.batch)
    queries, query_labels = np.ascontiguousarray(query_tensor.numpy()), query_label_tensor.numpy()
    top = lambda: torch.topk(query_tensor @ stored.T, K, dim=1)  # noqa: E731
    exact_ms = 1e3 * median_time(top, args.reps)
    exact_sides = sides(top().indices.numpy(), labels, query_labels)
    print(f"N = {args.n:,} clustered keys, B = {args.batch}: exact search {exact_ms:.1f} ms", flush=True)

    rows = []
    ways = args.centroids.split(",")
    if unknown := set(ways) - {"kmeans", "sample", "two-level"}:
        parser.error(f"--centroids: unknown {sorted(unknown)}")
    for lists, way in ((int(n), way) for n in args.lists.split(",") for way in ways):
        row = bench_lists(
            faiss, keys, labels, queries, query_labels, exact_sides, lists, way, args.reps, args.quantizer
        )
        row["times_exact"] = exact_ms / row["search_ms"]
        rows.append(row)
        print(
            "  " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True
        )

    lines = [
        f"N = {args.n:,} clustered keys, B = {args.batch}, k = {K}; exact search {exact_ms:.1f} ms",
        "",
        "| nlist | centroids | quantizer | train s | add s | probes@95 | search ms | × exact | recall@1 "
        "| pos+neg = exact |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['nlist']:,} | {r['centroids']} | {r['quantizer']} | {r['train_s']:.1f} | {r['add_s']:.1f} | "
            f"{r['probes_95']:,} "
            f"({r['probes_95'] / r['nlist']:.1%}) | {r['search_ms']:.1f} | {r['times_exact']:.1f} | "
            f"{r['recall_at_1']:.3f} | {r['sides_equal']:.3f} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    out = args.out or Path(__file__).resolve().parent / "results" / "ivf-lists.json"
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/bench_ivf_lists.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info("cpu"),
        "exact_ms": exact_ms,
        "rows": rows,
        "table": table,
    }
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
