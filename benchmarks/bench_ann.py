"""Approximate search side by side with exact search: throughput, write cost and quality, in one run.

Run from the repository root (the project installed in .venv; usearch for the HNSW anchor: pip install usearch):

    .venv/bin/python benchmarks/bench_ann.py                          # N in {1M, 4M, 16M}, B in {16, 256}
    .venv/bin/python benchmarks/bench_ann.py --sizes 1048576 --out /tmp/ann.json
    .venv/bin/python benchmarks/bench_ann.py --sizes 16777216 --backends torch,lsh,ivf-sq8 --no-anchors
    .venv/bin/python benchmarks/bench_ann.py --sizes 65536 --keys omniglot --checkpoint runs/omniglot/checkpoint.pt

Per N and key distribution one embedded Memory (d = 128, k = 256, age_noise 8) is filled with N keys, aged as
training steps of 256 rows would leave them (the fill is not timed). Key distributions: "random" (unit Gaussian
rows, distinct labels); "clustered" (N / 32 random centres, each key a centre plus noise of norm 0.5,
renormalised; its cluster is its label); "omniglot": real keys, a trained Omniglot checkpoint's queries for every
image of its split (90,300 with the reference split: 3,856 training classes with rotations and 659 test classes,
20 drawings each), N of them in the memory, labelled by class. Queries come from the same distribution (for
"omniglot", the drawings not in the memory). Every backend's index is built over that memory's own keys and
swapped in behind the index seam (what ``backend=`` selects at create), so every backend sees the very same memory:

  torch       exact search (the reference every quality figure is measured against)
  lsh         the paper's LSH with its defaults (1 probe), and lsh-p<P> with P buckets probed per table
  ivf-flat    faiss IVF, float32 lists, default nlist / nprobe; ivf-sq8 with 8-bit codes, re-ranked exactly
  ivf-fine    faiss IVF, float32 lists, N / 32 of them (one per cluster of the clustered keys), 1/64 probed;
              ivf-fine-hnsw the same with ivf_quantizer "hnsw" and the same centroids (its build time is then
              the lists and the graph alone, without k-means); both only when --backends names them

Measured per (backend, B), median of repeated calls after a warm-up:
  build      seconds to build the index over the filled memory (IVF: k-means training included)
  search     ``mem.query(q, labels)``: what a training step reads (ms)
  fused      ``mem.query(q, labels, update=True)``: one training step, query + update (ms), and steps/s
  write      ``index.update`` of B random slots with new keys: the index's share of a write (µs per row)
  recall@1   share of rows whose nearest slot is the exact one; sides: share whose positive and negative slots
             both equal the exact ones; overlap@k: |approximate top k ∩ exact top k| / k
  probes@95  IVF only: the fewest lists probed (nprobe) for which 95% of rows have their exact positive and
             negative slots in a probed list (what exact positive and negative in 95% of rows needs; with
             float32 lists it also suffices), and that as a share of nlist
Quality is measured before any write, against exact answers on the same keys. Writes made while one backend is
timed are then applied to every other index, so each is timed on the memory as it is.

Anchors, measured in the same run on the same keys, with fresh queries (``--no-anchors`` to skip):
  raw torch          ``torch.topk(q @ K.T, k)``: exact search alone
  faiss-ivf direct   faiss IndexIVFFlat (nlist, nprobe as ivf-flat) used as a library: train, add, search, and
                     remove_ids + add_with_ids of B rows
  usearch-hnsw       usearch HNSW (M = 16, ef_construction 128, ef_search 256): build, search, remove + add of
                     B rows (only for N <= --hnsw-max-n, default 262,144: its build took 110 s for 65,536 keys here)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_memory import machine_info

from lifelong_memory.client.memory_file import entries_state
from lifelong_memory.server.index import build_index, import_faiss
from lifelong_memory.server.memory import Memory, MemoryConfig

D, K = 128, 256
CLUSTER_SIZE = 32
CLUSTER_SPREAD = 0.5
FILL_ROWS = 1 << 18
ROWS_PER_COMMIT = 256  # the filled memory's slots are aged as if written by steps of this many rows
WRITE_POOL = 16  # writes timed per backend and B (after one warm-up)
BACKENDS = {
    "torch": dict(backend="torch"),
    "lsh": dict(backend="lsh"),
    "lsh-p16": dict(backend="lsh", lsh_probes=16),
    "ivf-flat": dict(backend="faiss-ivf"),
    "ivf-sq8": dict(backend="faiss-ivf", ivf_codes="sq8"),
    "ivf-fine": dict(backend="faiss-ivf"),
    "ivf-fine-hnsw": dict(backend="faiss-ivf", ivf_quantizer="hnsw"),
}
# The "fine" IVF presets: one list per CLUSTER_SIZE keys (as many lists as the clustered keys have clusters,
# what keeps the exact positive and negative within a few percent of the lists), 1 / FINE_PROBE_SHARE of
# them probed.
FINE_PROBE_SHARE = 64
# Run unless --backends says otherwise: the fine presets' k-means over N / 32 lists takes hours from 1M keys on.
DEFAULT_BACKENDS = ("torch", "lsh", "lsh-p16", "ivf-flat", "ivf-sq8")


def backend_options(name: str, n: int) -> dict:
    options = dict(BACKENDS[name])
    if name.startswith("ivf-fine"):
        lists = max(1, n // CLUSTER_SIZE)
        options.update(ivf_lists=lists, ivf_probes=max(1, lists // FINE_PROBE_SHARE))
    return options


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1)


def omniglot_embeddings(checkpoint: Path, data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of the checkpoint's Omniglot split (training classes, rotations included, then test classes)
    through its encoder (no dropout) and query projection: the keys its memory holds; and each one's class."""
    from lifelong_memory.client.module import l2_normalize
    from lifelong_memory.trainers import omniglot_data
    from lifelong_memory.trainers.omniglot import Encoder

    state = torch.load(checkpoint, weights_only=False, map_location="cpu")
    config = state["config"]
    if config["rep_dim"] != D:
        raise SystemExit(f"{checkpoint}: rep_dim {config['rep_dim']}; this benchmark's keys have {D} dimensions")
    split = omniglot_data.load_split(data, config["split"], config["input"], progress=False)
    classes = np.concatenate([split.train, split.test])  # [C, 20, 28, 28]
    encoder = Encoder(config["rep_dim"], 1.0, config["init"])
    encoder.load_state_dict(state["encoder"])
    encoder.eval()
    images = torch.from_numpy(classes.reshape(-1, 28, 28))
    with torch.no_grad():
        keys = torch.cat(
            [l2_normalize(encoder(images[i : i + 1024]) @ state["memory_module"]["query_proj"]) for i in
             range(0, len(images), 1024)]
        )  # fmt: skip
    return keys, torch.arange(len(classes)).repeat_interleave(classes.shape[1])


class Keys:
    """Rows of one distribution: random unit rows, clustered around N / CLUSTER_SIZE centres, or real
    embeddings ("omniglot": N of them, shuffled, fill the memory; queries and writes draw from the others)."""

    def __init__(self, kind: str, n: int, seed: int, embeddings: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.kind, self.n = kind, n
        self.generator = torch.Generator().manual_seed(seed)
        clusters = max(1, n // CLUSTER_SIZE)
        self.centres = unit(torch.randn(clusters, D, generator=self.generator)) if kind == "clustered" else None
        if kind == "omniglot":
            keys, labels = embeddings
            if len(keys) < n + 256:
                raise SystemExit(f"--keys omniglot: {len(keys):,} embeddings; N = {n:,} leaves too few for queries")
            order = torch.randperm(len(keys), generator=self.generator)
            self.stored = keys[order[:n]], labels[order[:n]]
            self.held_out = keys[order[n:]], labels[order[n:]]

    def fill_rows(self, at: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots [at, at + count) of the filled memory."""
        if self.kind == "omniglot":
            return self.stored[0][at : at + count], self.stored[1][at : at + count]
        return self.rows(count, torch.arange(at, at + count) if self.kind == "random" else None)

    def rows(self, count: int, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "omniglot":  # held-out drawings of the stored classes
            pick = torch.randint(0, len(self.held_out[0]), (count,), generator=self.generator)
            return self.held_out[0][pick], self.held_out[1][pick]
        if self.kind == "random":
            labels = torch.randint(0, 1 << 40, (count,), generator=self.generator) if labels is None else labels
            return unit(torch.randn(count, D, generator=self.generator)), labels
        if labels is None:
            labels = torch.randint(0, len(self.centres), (count,), generator=self.generator)
        noise = torch.randn(count, D, generator=self.generator) * (CLUSTER_SPREAD / D**0.5)
        return unit(self.centres[labels] + noise), labels


def filled_memory(keys: Keys) -> Memory:
    """A full memory as training steps of ROWS_PER_COMMIT rows leave it: slot i written at commit
    i // ROWS_PER_COMMIT + 1, so the write choice walks a few groups of that many slots, not one group of N
    (a memory whose slots all share one age scores every one of them per write). The keys are read into the
    padded buffer the memory adopts: no second copy."""
    n = keys.n
    padded = torch.empty(n + 1, D)
    padded[n] = 0
    values = torch.empty(n, dtype=torch.int64)
    for at in range(0, n, FILL_ROWS):
        count = min(FILL_ROWS, n - at)
        padded[at : at + count], values[at : at + count] = keys.fill_rows(at, count)
    config = MemoryConfig(key_dim=D, memory_size=n, choose_k=K, age_noise=8.0, seed=0).validated()
    state = entries_state(config, padded[:n], values, ROWS_PER_COMMIT, padded_keys=padded)
    return Memory(config, state, max_batch=256)


def timed(call, min_time: float, min_reps: int, warmup: int = 1) -> float:
    """Median seconds of ``call()`` over at least min_reps calls and min_time seconds, after warm-up."""
    for _ in range(warmup):
        call()
    times: list[float] = []
    while len(times) < min_reps or sum(times) < min_time:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def probes_for_95(index, queries: torch.Tensor, sides: tuple[torch.Tensor, ...]) -> int:
    """The smallest nprobe of a one-shard IVF index for which 95% of rows have both exact ``sides`` (positive and
    negative slots, -1 for none) in one of the lists nearest the query (by exact similarity to the centroids;
    each slot in the list the index holds it in)."""
    (shard,) = index.shards
    order = np.argsort(-(queries.numpy() @ shard.centroids.T), axis=1, kind="stable")
    home_of = np.full(len(shard.keys), -1, dtype=np.int64)
    for number in range(shard.lists):
        size = shard.index.invlists.list_size(number)
        if size:
            home_of[shard.faiss.rev_swig_ptr(shard.index.invlists.get_ids(number), size)] = number
    homes = [np.where(slots.numpy() >= 0, home_of[slots.numpy()], -1) for slots in sides]
    return lists_for_95(order, homes)


def lists_for_95(order: np.ndarray, homes: list[np.ndarray]) -> int:
    """``order`` [B, nlist]: each row's lists, nearest first; ``homes``: per side, each row's list holding that
    side's slot (-1: none). The fewest lists probed for which 95% of rows have every side in a probed list."""
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(order.shape[1])[None, :].repeat(len(order), axis=0), axis=1)
    needed = np.ones(len(order), dtype=np.int64)
    for home in homes:
        held = home >= 0
        needed[held] = np.maximum(needed[held], rank[np.flatnonzero(held), home[held]] + 1)
    return int(np.quantile(needed, 0.95, method="higher"))


def quality(got_slots, want_slots, got_sides=None, want_sides=None) -> dict:
    got_slots, want_slots = np.asarray(got_slots), np.asarray(want_slots)
    overlap = np.mean([np.intersect1d(a, b).size for a, b in zip(got_slots, want_slots, strict=True)])
    result = {
        "recall_at_1": float(np.mean(got_slots[:, 0] == want_slots[:, 0])),
        "overlap_at_k": float(overlap / want_slots.shape[1]),
    }
    if got_sides is not None:
        same = (got_sides[0] == want_sides[0]) & (got_sides[1] == want_sides[1])
        result["sides_equal"] = float(same.float().mean())
    return result


class Recorder:
    """The active index, remembering which slots were written while it was active."""

    def __init__(self, index):
        self.index, self.written = index, []

    def search(self, queries, k, empty_slots=0):
        return self.index.search(queries, k, empty_slots)

    def update(self, slots, keys):
        self.written.append(slots.clone())
        self.index.update(slots, keys)

    def state(self):
        return self.index.state()


def bench_distribution(n: int, kind: str, args, backends: list[str]) -> list[dict]:
    keys = Keys(kind, n, seed=args.seed, embeddings=args.embeddings)
    start = time.perf_counter()
    memory = filled_memory(keys)
    print(f"\n== N={n:,} {kind}: filled in {time.perf_counter() - start:.1f} s", flush=True)
    batches = {b: keys.rows(b) for b in args.batches}
    configs, indexes, rows = {}, {}, []
    trained = {}  # (ivf_lists, ivf_codes) -> the first such index's name: IVF presets differing only in how
    for name in backends:  # they probe share its centroids (as an import does) instead of training again
        config = MemoryConfig(key_dim=D, memory_size=n, choose_k=K, age_noise=8.0, seed=0, **backend_options(name, n))
        configs[name] = config = config.validated()
        lists_of = (config.ivf_lists, config.ivf_codes) if config.backend == "faiss-ivf" else None
        shared = trained.get(lists_of)
        start = time.perf_counter()
        indexes[name] = build_index(memory.keys, config, 256, indexes[shared].state() if shared else None)
        build_s = time.perf_counter() - start
        row = {"n": n, "keys": kind, "backend": name, "build_s": build_s, "config": params(config)}
        if shared:
            row["config"]["centroids_of"] = shared  # build_s: the lists and quantizer alone, no k-means
        elif lists_of:
            trained[lists_of] = name
        rows.append(row)
        print(f"  built {name} in {build_s:.1f} s {row['config']}", flush=True)
    by_name = {r["backend"]: r for r in rows}

    exact = {}
    memory.index = indexes["torch"]
    for b, (q, y) in batches.items():
        r = memory.query(q, y, fields={"neighbors", "positive_negative"})
        exact[b] = (r.neighbor_slots, (r.positive_slots, r.negative_slots))
    for name in backends:  # quality first, on the keys as filled
        memory.index = indexes[name]
        for b, (q, y) in batches.items():
            r = memory.query(q, y, fields={"neighbors", "positive_negative"})
            entry = by_name[name].setdefault("per_batch", {})[b] = quality(
                r.neighbor_slots, exact[b][0], (r.positive_slots, r.negative_slots), exact[b][1]
            )
            if configs[name].backend == "faiss-ivf":
                entry["probes_95"] = probes_for_95(indexes[name], q, exact[b][1])
    written: list[torch.Tensor] = []
    for name in backends:
        index = indexes[name]
        if written:  # what the backends timed before wrote, so that this index follows the memory
            slots = torch.unique(torch.cat(written))
            index.update(slots, memory.keys[slots])
        memory.index = recorder = Recorder(index)
        for b, (q, y) in batches.items():
            entry = by_name[name]["per_batch"][b]
            entry["search_ms"] = 1e3 * timed(lambda q=q, y=y: memory.query(q, y), args.min_time, args.min_reps)
            entry["fused_ms"] = 1e3 * timed(
                lambda q=q, y=y: memory.query(q, y, update=True), args.min_time, args.min_reps
            )
            generator = torch.Generator().manual_seed(b)
            pool = []  # slots and new keys drawn before the timing: only the write is timed
            for _ in range(WRITE_POOL):
                slots = torch.unique(torch.randint(0, n, (b,), generator=generator))
                pool.append((slots, keys.rows(len(slots))[0]))

            def write(pool=pool, recorder=recorder):
                slots, new = pool.pop()
                memory.keys[slots] = new
                recorder.update(slots, new)

            entry["write_us_per_row"] = 1e6 * timed(write, 0.0, WRITE_POOL - 1) / b
            print(f"  {name} B={b}: {fmt(entry)}", flush=True)
        written.extend(recorder.written)
        written = [torch.unique(torch.cat(written))]
    if not args.no_anchors:
        rows.extend(anchors(memory, keys, configs.get("ivf-flat"), args))
    return rows


def anchors(memory: Memory, keys: Keys, ivf_config, args) -> list[dict]:
    """raw torch top-k, faiss IVF used directly, usearch HNSW: on the memory's keys as the timed writes left
    them, with fresh queries of the same distribution (the timed steps wrote theirs into the memory)."""
    out, kind, n = [], keys.kind, keys.n
    batches = {b: keys.rows(b) for b in args.batches}
    raw = {"n": n, "keys": kind, "backend": "anchor:raw-torch", "build_s": 0.0, "per_batch": {}}
    exact = {}
    for b, (q, _) in batches.items():
        exact[b] = torch.topk(q @ memory.keys.T, K, dim=1).indices
        raw["per_batch"][b] = {
            "search_ms": 1e3 * timed(lambda q=q: torch.topk(q @ memory.keys.T, K, dim=1), args.min_time, args.min_reps)
        }
    out.append(raw)
    faiss = import_faiss()
    stored = memory.keys.numpy()
    if ivf_config is not None:
        lists, probes = ivf_config.ivf_lists, ivf_config.ivf_probes
        start = time.perf_counter()
        quantizer = faiss.IndexFlatIP(D)
        ivf = faiss.IndexIVFFlat(quantizer, D, lists, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(n, min(n, 64 * lists), replace=False)
        ivf.train(stored[np.sort(sample)])
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        ivf.add_with_ids(stored, np.arange(n))
        ivf.nprobe = probes
        row = {"n": n, "keys": kind, "backend": "anchor:faiss-ivf", "build_s": time.perf_counter() - start}
        row["config"], row["per_batch"] = {"nlist": lists, "nprobe": probes}, {}
        for b, (q, _) in batches.items():
            qn = q.numpy()
            entry = quality(ivf.search(qn, K)[1], exact[b])
            entry["search_ms"] = 1e3 * timed(lambda qn=qn: ivf.search(qn, K), args.min_time, args.min_reps)
            slots = np.random.default_rng(b).choice(n, b, replace=False)

            def replace(slots=slots):
                ivf.remove_ids(faiss.IDSelectorArray(len(slots), faiss.swig_ptr(slots)))
                ivf.add_with_ids(stored[slots], slots)

            entry["write_us_per_row"] = 1e6 * timed(replace, args.min_time / 2, args.min_reps) / b
            row["per_batch"][b] = entry
            print(f"  anchor:faiss-ivf B={b}: {fmt(entry)}", flush=True)
        out.append(row)
        del ivf, quantizer
    if n <= args.hnsw_max_n:
        try:
            from usearch.index import Index as UsearchIndex
        except ImportError:
            print("  usearch is not installed: no HNSW anchor (pip install usearch)")
            return out
        start = time.perf_counter()
        hnsw = UsearchIndex(ndim=D, metric="ip", dtype="f32", connectivity=16, expansion_add=128, expansion_search=K)
        hnsw.add(np.arange(n), stored, threads=args.threads)
        row = {"n": n, "keys": kind, "backend": "anchor:usearch-hnsw", "build_s": time.perf_counter() - start}
        row["config"], row["per_batch"] = {"M": 16, "ef_construction": 128, "ef_search": K}, {}
        for b, (q, _) in batches.items():
            qn = q.numpy()
            found = hnsw.search(qn, K, threads=args.threads).keys.astype(np.int64)
            entry = quality(found, exact[b])
            entry["search_ms"] = 1e3 * timed(
                lambda qn=qn: hnsw.search(qn, K, threads=args.threads), args.min_time, args.min_reps
            )
            slots = np.random.default_rng(b).choice(n, b, replace=False)

            def replace(slots=slots):
                hnsw.remove(slots)
                hnsw.add(slots, stored[slots], threads=args.threads)

            entry["write_us_per_row"] = 1e6 * timed(replace, args.min_time / 2, args.min_reps) / b
            row["per_batch"][b] = entry
            print(f"  anchor:usearch-hnsw B={b}: {fmt(entry)}", flush=True)
        out.append(row)
        del hnsw
    return out


def params(config: MemoryConfig) -> dict:
    if config.backend == "lsh":
        return {"tables": config.lsh_tables, "bits": config.lsh_bits, "probes": config.lsh_probes}
    if config.backend == "faiss-ivf":
        return {
            "nlist": config.ivf_lists,
            "nprobe": config.ivf_probes,
            "codes": config.ivf_codes,
            "quantizer": config.ivf_quantizer,
        }
    return {}


def fmt(entry: dict) -> str:
    parts = [f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()]
    return " ".join(parts)


def probes_cell(probes: int | None, lists: int | None) -> str:
    return "" if probes is None else f"{probes} ({probes / lists:.0%})"


def print_table(rows: list[dict]) -> str:
    """A markdown table per (N, keys): every backend and anchor, B = 16 and 256, speed-up vs exact fused."""
    lines = []
    for n in sorted({r["n"] for r in rows}):
        for kind in ("random", "clustered", "omniglot"):
            group = [r for r in rows if r["n"] == n and r["keys"] == kind]
            if not group:
                continue
            exact = next((r for r in group if r["backend"] == "torch"), None)
            lines += [
                f"\nN = {n:,}, {kind} keys",
                "",
                "| backend | params | build s | B | search ms | fused ms | fused × exact | write µs/row | recall@1 "
                "| pos+neg = exact | overlap@k | probes@95 |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for r in group:
                for b, e in sorted(r["per_batch"].items()):
                    speed = ""
                    if exact and "fused_ms" in e:
                        speed = f"{exact['per_batch'][b]['fused_ms'] / e['fused_ms']:.1f}"
                    cells = [
                        r["backend"],
                        " ".join(f"{k}={v}" for k, v in r.get("config", {}).items()),
                        f"{r['build_s']:.1f}",
                        str(b),
                        f"{e['search_ms']:.1f}",
                        f"{e['fused_ms']:.1f}" if "fused_ms" in e else "",
                        speed,
                        f"{e['write_us_per_row']:.1f}" if "write_us_per_row" in e else "",
                        f"{e['recall_at_1']:.3f}" if "recall_at_1" in e else "",
                        f"{e['sides_equal']:.3f}" if "sides_equal" in e else "",
                        f"{e['overlap_at_k']:.3f}" if "overlap_at_k" in e else "",
                        probes_cell(e.get("probes_95"), r.get("config", {}).get("nlist")),
                    ]
                    lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1048576,4194304,16777216", help="comma-separated memory sizes N")
    parser.add_argument("--batches", default="16,256", help="comma-separated batch sizes B")
    parser.add_argument(
        "--keys", default="random,clustered", help="key distributions: random, clustered, omniglot (--checkpoint)"
    )
    parser.add_argument("--checkpoint", type=Path, help="--keys omniglot: a trainers.omniglot checkpoint.pt")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/omniglot"), help="the Omniglot archives")
    parser.add_argument(
        "--backends",
        default=",".join(DEFAULT_BACKENDS),
        help=f"of {list(BACKENDS)} (torch always; default {','.join(DEFAULT_BACKENDS)})",
    )
    parser.add_argument("--no-anchors", action="store_true", help="skip raw torch, faiss IVF direct, usearch")
    parser.add_argument("--hnsw-max-n", type=int, default=1 << 18, help="largest N with the usearch anchor")
    parser.add_argument("--threads", type=int, default=1, help="torch, faiss and usearch threads (default 1)")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds measured per case (default 1)")
    parser.add_argument("--min-reps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/ann.json)")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    backends = ["torch", *[b for b in args.backends.split(",") if b and b != "torch"]]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}; known: {list(BACKENDS)}")
    torch.set_num_threads(args.threads)
    import_faiss().omp_set_num_threads(args.threads)
    args.embeddings = None
    if "omniglot" in args.keys.split(","):
        if args.checkpoint is None:
            parser.error("--keys omniglot needs --checkpoint")
        started = time.perf_counter()
        args.embeddings = omniglot_embeddings(args.checkpoint, args.data)
        print(f"{len(args.embeddings[0]):,} Omniglot embeddings in {time.perf_counter() - started:.1f} s", flush=True)
    out = args.out or Path(__file__).resolve().parent / "results" / "ann.json"
    rows: list[dict] = []
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/bench_ann.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info("cpu"),
        "rows": rows,
        "complete": False,
    }
    for n in (int(s) for s in args.sizes.split(",")):
        for kind in args.keys.split(","):
            rows.extend(bench_distribution(n, kind, args, backends))
            gc.collect()  # the memory and its indexes, before the next one is filled
            out.write_text(json.dumps(result, indent=1))
    result["complete"] = True
    result["table"] = print_table(rows)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
