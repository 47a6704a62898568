"""Approximate inner-product search that takes the memory's write on every step: the paper's LSH and FAISS IVF.

Each index covers one shard (a contiguous slot range) and only proposes candidate slots; the candidates are
re-ranked exactly in float32 against the memory's own keys (``rerank``), so every similarity returned is exact
and only which slots are found is approximate. A write moves exactly the written slots (``update``), never
rebuilds per step. With the search made exhaustive (every LSH bucket probed, nprobe = nlist) the answers are
those of exact search.

Empty slots hold a zero key (a written key has unit norm) and are kept out of the buckets and lists: the
memory maps every empty slot a search returns at similarity 0 onto its lowest empty slots, so an index
only offers up to k of them, whichever (``ZeroRows``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

LOW_HALF = 0xFFFFFFFF
MONOTONE_NAN = 0x7FFFFFFF  # above the monotone bits of +inf
# Query rows re-ranked at once: their candidates' keys stay in cache (as TorchFlatIndex._rescore).
RERANK_ROWS = 16
# Rows projected onto the hyperplanes at once when hashing a whole shard.
HASH_ROWS = 1 << 18
# A table's moved entries are merged into its sorted base once they exceed this share of its rows (or
# MIN_MOVED): each write inserts into the moved array (a memmove of its size) and each merge is linear.
MOVED_SHARE = 32
MIN_MOVED = 4096
# Working memory of one chunk of an LSH search's rows. Per query, table and bucket ranked, probe_codes holds
# about this many bytes (costs, flips, their order, the result); per candidate entry, the search about this many
# (offsets, entries, rows, currency, the padded matrix, re-rank keys), before the gather of candidate keys.
SEARCH_CHUNK_BYTES = 64 << 20
PROBE_BYTES_PER_CODE = 48
CANDIDATE_BYTES = 64


def descending_then_lower_index_key(
    score: torch.Tensor, indices: torch.Tensor, size: int, *, nan_first: bool = False
) -> torch.Tensor:
    """An int64 key per element of float32 ``score`` (``indices`` in [0, size), size <= 2^31) whose
    descending order is: score descending, ties to the lower index; no two keys are equal.

    The float's bits, made monotone as an int32 (a negative float's magnitude bits flipped), go in the
    high half and the index, reversed (size - 1 - index), in the low half. +0.0 stands in for -0.0, which
    compares equal to it; with ``nan_first`` every NaN orders above +inf, as torch.sort puts it."""
    bits = (score + 0.0).view(torch.int32)
    bits.bitwise_xor_(torch.bitwise_right_shift(bits, 31).bitwise_and_(0x7FFFFFFF))
    if nan_first:
        bits.masked_fill_(torch.isnan(score), MONOTONE_NAN)
    key = bits.to(torch.int64)
    key.bitwise_left_shift_(32)
    key.sub_(indices)
    key.add_(size - 1)
    return key


def lsh_bytes(rows: int, dim: int, tables: int, bits: int) -> int:
    """Host bytes an LshIndex over ``rows`` holds at most: per table each row's code (int32) and base entry
    (int64) and the moved entries up to a merge, the empty-row mask and the hyperplanes."""
    moved = max(MIN_MOVED, rows // MOVED_SHARE)
    return tables * (rows * (4 + 8) + moved * 8) + rows + tables * bits * dim * 4


# Per row of an IVF list besides its code: the id (int64) and its node in the direct map's hash table.
IVF_ROW_BYTES = 8 + 48


# An HNSW quantizer (FAISS's IVF<nlist>_HNSW32): links per centroid and the breadth of a query's search, which
# is raised to the lists probed, since a search returns at most its breadth of them. A written key needs only
# its one nearest list: at 8,192 lists a breadth of 32 finds the exact one for 99.95% of keys in a quarter of
# the time 128 takes (benchmarks/results/ann-fine-lists-262k.json, docs/benchmarks.md).
HNSW_LINKS, HNSW_EF_SEARCH, HNSW_EF_ADD = 32, 128, 32
# Per centroid in the HNSW graph: 2 x HNSW_LINKS neighbours (int32) at level 0, and the upper levels, the
# level and the offset (about HNSW_LINKS / (HNSW_LINKS - 1) more links on average, rounded up).
HNSW_NODE_BYTES = (2 * HNSW_LINKS + 2) * 4 + 4 + 8


def ivf_bytes(rows: int, dim: int, lists: int, codes: str, quantizer: str) -> int:
    """Host bytes a FaissIvfIndex over ``rows`` holds at most: every row's code (float32 or 8-bit per
    component), id and hash-table entry, the empty-row mask, the centroids and an HNSW quantizer's graph."""
    code = dim * 4 if codes == "flat" else dim
    graph = lists * HNSW_NODE_BYTES if quantizer == "hnsw" else 0
    return rows * (code + IVF_ROW_BYTES + 1) + lists * dim * 4 + graph


class ZeroRows:
    """Which rows of a shard hold a zero key (empty slots), and up to k of them to offer a search."""

    def __init__(self, keys: torch.Tensor):
        self.zero = ~keys.any(dim=1).numpy()
        self.count = int(self.zero.sum())
        self.offered = np.empty(0, dtype=np.int64)

    def update(self, local: np.ndarray, nonzero: np.ndarray) -> None:
        """``local``: distinct rows written; ``nonzero``: whether each new key is nonzero."""
        self.count += int((~nonzero).sum()) - int(self.zero[local].sum())
        self.zero[local] = ~nonzero
        if len(self.offered):
            self.offered = self.offered[self.zero[self.offered]]

    def some(self, k: int) -> np.ndarray:
        """min(k, count) zero rows; a full scan only when fewer than that are cached (rare once filled)."""
        want = min(k, self.count)
        if len(self.offered) < want:
            self.offered = np.flatnonzero(self.zero)[:k]
        return self.offered[:want]


def rerank(
    keys: torch.Tensor, start: int, queries: torch.Tensor, candidates: np.ndarray, k: int, zero: ZeroRows
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top ``k`` (float32 similarities, global slots) of each query among its candidate rows of the
    shard (``candidates`` [B, C], -1 for none, repeats allowed), ties to the lower slot. Each query also gets
    up to k empty rows, and a query with fewer than k candidates the shard's first k rows, so that every
    query has k answers."""
    n, batch = len(keys), len(queries)
    k = min(k, n)
    empty = zero.some(k)
    matrix = _distinct_per_row(np.concatenate([candidates, np.broadcast_to(empty, (batch, len(empty)))], axis=1))
    short = (matrix >= 0).sum(axis=1) < k
    if short.any():
        first = np.full((batch, k), -1, dtype=np.int64)
        first[short] = np.arange(k)
        matrix = _distinct_per_row(np.concatenate([matrix, first], axis=1))
    local = torch.from_numpy(matrix)
    found = local >= 0
    rows = local.clamp(min=0)
    similarities = torch.empty(local.shape, dtype=torch.float32)
    for at in range(0, batch, RERANK_ROWS):
        part = slice(at, at + RERANK_ROWS)
        gathered = keys.index_select(0, rows[part].reshape(-1)).view(-1, rows.shape[1], keys.shape[1])
        similarities[part] = torch.bmm(gathered, queries[part].unsqueeze(2)).squeeze(2)
    ranked = descending_then_lower_index_key(similarities, rows, n).masked_fill_(~found, torch.iinfo(torch.int64).min)
    best = torch.topk(ranked, k, dim=1).indices
    return similarities.gather(1, best), rows.gather(1, best) + start


def _distinct_per_row(matrix: np.ndarray) -> np.ndarray:
    """Each row sorted, with repeats (and the -1 padding) as -1."""
    matrix = np.sort(matrix, axis=1)
    matrix[:, 1:][matrix[:, 1:] == matrix[:, :-1]] = -1
    return matrix


def _rows_as_matrix(batch: int, rows: np.ndarray, local: np.ndarray) -> np.ndarray:
    """Candidate pairs (row of the batch, shard row) as a [batch, most per row] matrix padded with -1."""
    counts = np.bincount(rows, minlength=batch)
    order = np.argsort(rows, kind="stable")
    first = np.cumsum(counts) - counts
    matrix = np.full((batch, int(counts.max(initial=0))), -1, dtype=np.int64)
    matrix[rows[order], np.arange(len(rows)) - first[rows[order]]] = local[order]
    return matrix


class LshIndex:
    """The paper's LSH: ``tables`` libraries of ``bits`` random hyperplanes each; a key's bucket in a table
    is the sign pattern of its projections. A query's candidates are the slots in its bucket of every table
    (and, with ``probes`` > 1, in the probes - 1 buckets next most likely to hold its neighbours: those
    reached by flipping its least certain bits), re-ranked exactly.

    ``bits`` is sized for a full shard. A search uses only the first ``active_bits()`` hyperplanes, one fewer
    for each halving of the filled share, so a bucket holds about as many filled slots at any fill (a cleared
    or episodic memory would otherwise find next to nothing in its buckets). The first hyperplane is a code's
    most significant bit, so the bucket of a shorter code is a contiguous range of the sorted entries: a
    change of fill level rehashes nothing.

    Unlike the reference LSHMemory, whose buckets are fixed arrays of k / L pointers overwritten at random,
    a bucket here holds exactly the slots whose key hashes to it: the index is a function of the keys and
    the seed, so a memory restored from a snapshot and its log answers exactly as before. Per table,
    ``codes`` is every row's bucket (-1: empty row), ``base`` a sorted array of code << 32 | row, and
    ``moved`` the same for rows that moved since ``base`` was last merged. An entry is current only if
    the row's code still says so; stale ones are dropped at the merge.
    """

    def __init__(self, keys: torch.Tensor, start: int, tables: int, bits: int, probes: int, seed: int):
        self.keys, self.start = keys, start
        self.tables, self.bits, self.probes = tables, bits, probes
        generator = torch.Generator().manual_seed(seed)
        self.planes = torch.randn(tables * bits, keys.shape[1], generator=generator)
        self.weights = torch.tensor([1 << (bits - 1 - b) for b in range(bits)], dtype=torch.int32)
        self.zero = ZeroRows(keys)
        self.codes = np.empty((tables, len(keys)), dtype=np.int32)
        for at in range(0, len(keys), HASH_ROWS):
            self.codes[:, at : at + HASH_ROWS] = self._hash(keys[at : at + HASH_ROWS])
        rows = np.arange(len(keys), dtype=np.int64)
        self.base = [self._entries(self.codes[t], rows) for t in range(tables)]
        self.moved = [np.empty(0, dtype=np.int64) for _ in range(tables)]
        self.merge_at = max(MIN_MOVED, len(keys) // MOVED_SHARE)

    def _hash(self, keys: torch.Tensor) -> np.ndarray:
        """int32 [tables, rows]: each row's bucket per table, -1 for a zero key."""
        signs = (keys @ self.planes.T > 0).view(len(keys), self.tables, self.bits).to(torch.int32)
        codes = (signs * self.weights).sum(dim=2, dtype=torch.int32)
        codes[~keys.any(dim=1)] = -1
        return codes.T.contiguous().numpy()

    @staticmethod
    def _entries(codes: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Sorted code << 32 | row of the nonempty rows."""
        keep = codes >= 0
        return np.sort((codes[keep].astype(np.int64) << 32) | rows[keep])

    def active_bits(self) -> int:
        """The leading hyperplanes a search uses: ``bits`` less log2(rows / filled rows), rounded (0: one bucket)."""
        filled = len(self.keys) - self.zero.count
        if not filled:
            return 0
        return self.bits - min(self.bits, round(math.log2(len(self.keys) / filled)))

    def search(self, queries: torch.Tensor, k: int, empty_slots: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows are independent: they are searched in chunks whose probe arrays and candidates fit
        SEARCH_CHUNK_BYTES (a row alone may exceed it), so many probes or crowded buckets cost time, not memory."""
        queries = queries.cpu()
        active = self.active_bits()
        probes = min(self.probes, 1 << active)
        probe_bytes = self.tables * probe_width(active, probes) * PROBE_BYTES_PER_CODE
        rows = max(1, SEARCH_CHUNK_BYTES // probe_bytes)
        parts = []
        for at in range(0, len(queries), rows):
            chunk = queries[at : at + rows]
            margins = (chunk @ self.planes.T).view(len(chunk), self.tables, self.bits).numpy()[:, :, :active]
            parts += self._search_probed(chunk, probe_codes(margins, probes), k, self.bits - active)
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _search_probed(self, queries, probed: np.ndarray, k: int, shift: int) -> list[tuple[torch.Tensor, ...]]:
        """``probed`` [B, tables, probes]: codes of the active bits. Each bucket's entries are located first
        and counted; rows whose candidates would exceed SEARCH_CHUNK_BYTES are split off before any is gathered."""
        batch, probes = len(queries), probed.shape[2]
        spans = []  # (table, entries, first entry, entry count, their sum) per probed bucket, over (row, probe)
        candidates = 0
        for t in range(self.tables):
            codes = probed[:, t, :].ravel().astype(np.int64)
            for entries in (self.base[t], self.moved[t]):
                lo = np.searchsorted(entries, (codes << shift) << 32)
                lengths = np.searchsorted(entries, ((codes + 1) << shift) << 32) - lo
                total = int(lengths.sum())
                spans.append((t, entries, lo, lengths, total))
                candidates += total
        if batch > 1 and candidates * CANDIDATE_BYTES > SEARCH_CHUNK_BYTES:
            half = batch // 2
            return self._search_probed(queries[:half], probed[:half], k, shift) + self._search_probed(
                queries[half:], probed[half:], k, shift
            )
        query_rows = np.repeat(np.arange(batch), probes)
        found_rows, found_local = [], []
        for t, entries, lo, lengths, total in spans:
            if not total:
                continue
            offsets = np.repeat(lo - np.cumsum(lengths) + lengths, lengths) + np.arange(total)
            hit = entries[offsets]
            local = hit & LOW_HALF
            current = self.codes[t][local] == (hit >> 32)
            found_rows.append(np.repeat(query_rows, lengths)[current])
            found_local.append(local[current])
        rows = np.concatenate(found_rows) if found_rows else np.empty(0, dtype=np.int64)
        local = np.concatenate(found_local) if found_local else np.empty(0, dtype=np.int64)
        return [rerank(self.keys, self.start, queries, _rows_as_matrix(batch, rows, local), k, self.zero)]

    def state(self) -> dict[str, torch.Tensor]:
        return {}  # a function of the keys and the seed

    def update(self, slots: torch.Tensor, keys: torch.Tensor) -> None:
        """Move exactly the written rows: their new codes, and an entry in ``moved`` where the bucket changed."""
        local = (slots - self.start).numpy()
        codes = self._hash(keys.cpu())
        self.zero.update(local, codes[0] >= 0)
        for t in range(self.tables):
            changed = self.codes[t][local] != codes[t]
            self.codes[t][local] = codes[t]
            arrived = self._entries(codes[t][changed], local[changed])
            moved = self.moved[t]
            self.moved[t] = np.insert(moved, np.searchsorted(moved, arrived), arrived)
            if len(self.moved[t]) > self.merge_at:
                self._merge(t)

    def _merge(self, t: int) -> None:
        """Fold ``moved`` into ``base``, dropping stale and repeated entries: linear (timsort merges two runs)."""
        merged = np.sort(np.concatenate([self.base[t], self.moved[t]]), kind="stable")
        current = self.codes[t][merged & LOW_HALF] == (merged >> 32)
        current[1:] &= merged[1:] != merged[:-1]
        self.base[t] = merged[current]
        self.moved[t] = np.empty(0, dtype=np.int64)

    def buckets(self, t: int) -> np.ndarray:
        """The current code << 32 | row entries of table ``t``, sorted (what a fresh build would hold)."""
        entries = np.unique(np.concatenate([self.base[t], self.moved[t]]))
        return entries[self.codes[t][entries & LOW_HALF] == (entries >> 32)]


def probe_width(active_bits: int, probes: int) -> int:
    """Buckets probe_codes ranks per query and table: every sign pattern of the bits it may flip."""
    return 1 if probes == 1 else 1 << min(active_bits, math.ceil(math.log2(probes)))


def probe_codes(margins: np.ndarray, probes: int) -> np.ndarray:
    """int32 [B, tables, probes]: per query and table, its bucket and the probes - 1 next, ordered by the
    summed |margin| of the bits flipped to reach them (query-directed multi-probe over the ceil(log2 probes)
    least certain bits; with probes = 2^bits, every bucket). The first bit is the most significant."""
    batch, tables, bits = margins.shape
    weights = 1 << np.arange(bits - 1, -1, -1, dtype=np.int64)
    home = ((margins > 0) * weights).sum(axis=2)
    if probes == 1:
        return home[:, :, None].astype(np.int32)
    flip_bits = probe_width(bits, probes).bit_length() - 1
    certainty = np.abs(margins)
    least = np.argsort(certainty, axis=2, kind="stable")[:, :, :flip_bits]  # [B, tables, flip_bits]
    subsets = (np.arange(1 << flip_bits)[:, None] >> np.arange(flip_bits)) & 1  # [2^f, f]
    cost = np.take_along_axis(certainty, least, axis=2) @ subsets.T  # [B, tables, 2^f]
    flips = (1 << (bits - 1 - least)) @ subsets.T
    order = np.argsort(cost, axis=2, kind="stable")[:, :, :probes]
    return (home[:, :, None] ^ np.take_along_axis(flips, order, axis=2)).astype(np.int32)


# Training points per IVF list: k-means needs about 39 per centroid; more buys little and costs linearly.
TRAIN_POINTS_PER_LIST = 64
# sq8 codes rank candidates approximately: this many times k of them are re-ranked exactly.
SQ8_CANDIDATES_PER_NEIGHBOR = 4


class FaissIvfIndex:
    """FAISS IVF (``codes`` "flat" or "sq8") with a hash-table direct map: a write is ``remove_ids`` +
    ``add_with_ids`` of exactly the written rows (ids are the shard's row numbers), each re-assigned to
    its nearest list. Candidates from the ``probes`` lists nearest a query are re-ranked exactly.

    The coarse quantizer is trained once, from the memory's first fill: when ``TRAIN_POINTS_PER_LIST``
    rows per list (or the whole shard) hold keys, on those keys, inside the write that fills the last of
    them. Until then a search is exact over the filled rows. The centroids (and sq8's ranges) are the
    index's state: ``state()`` gives them to a snapshot and the constructor takes them back, so a restored
    memory assigns every key to the same list and answers as before.

    ``quantizer`` "flat" finds a query's lists exactly, "hnsw" through an HNSW graph over the centroids
    (sublinear in the lists, for the many lists of a large memory). Both train the same centroids, by k-means
    with exact assignment; the graph is then built over them with one thread, so it is a function of the
    centroids alone and a restored index (or one switched between the two on import) needs no more state.
    """

    def __init__(
        self,
        keys: torch.Tensor,
        start: int,
        lists: int,
        probes: int,
        codes: str,
        quantizer: str,
        seed: int,
        state: dict | None = None,
    ):
        """``state``: the trained state of an earlier index over these slots (from ``state()``), if any."""
        from lifelong_memory.server.index import import_faiss

        self.faiss = import_faiss()
        self.keys, self.start = keys, start
        self.lists, self.probes, self.codes, self.quantizer_kind, self.seed = lists, probes, codes, quantizer, seed
        self.search_breadth = max(HNSW_EF_SEARCH, probes)  # an HNSW quantizer's, for a query
        self.zero = ZeroRows(keys)
        self.train_size = min(len(keys), TRAIN_POINTS_PER_LIST * lists)
        self.index = None
        if state:
            self._build(state["centroids"].numpy(), state.get("ranges"))
        elif len(keys) - self.zero.count >= self.train_size:
            self._build(*self._trained(self.training_sample()))

    def state(self) -> dict[str, torch.Tensor]:
        """The trained quantizer (empty until trained): the centroids and, with sq8, the code ranges."""
        if self.index is None:
            return {}
        state = {"centroids": torch.from_numpy(self.centroids.copy())}
        if self.codes == "sq8":
            state["ranges"] = torch.from_numpy(self.faiss.vector_to_array(self.index.sq.trained))
        return state

    def training_sample(self) -> np.ndarray:
        """A copy of the keys k-means trains on: ``train_size`` filled rows spread evenly over the shard (all
        of them at the first fill; a memory restored full would otherwise train on far more than it needs)."""
        filled = np.flatnonzero(~self.zero.zero)
        sample = filled[np.linspace(0, len(filled) - 1, min(len(filled), self.train_size)).astype(np.int64)]
        return np.ascontiguousarray(self.keys[torch.from_numpy(sample)].numpy())

    def retrained_state(self, sample: np.ndarray) -> dict[str, torch.Tensor]:
        """The state of a quantizer trained on ``sample`` (from ``training_sample``); this index is untouched,
        so it can run beside searches and writes."""
        centroids, ranges = self._trained(sample)
        state = {"centroids": torch.from_numpy(centroids)}
        if ranges is not None:
            state["ranges"] = ranges
        return state

    def _new_index(self, quantizer):
        """An untrained IVF index over ``quantizer``, which the index does not own: keep both."""
        faiss = self.faiss
        dim = self.keys.shape[1]
        if self.codes == "flat":
            index = faiss.IndexIVFFlat(quantizer, dim, self.lists, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, dim, self.lists, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            )
        index.cp.seed = self.seed % (1 << 31)
        index.cp.spherical = True  # unit keys: centroids on the sphere, lists by inner product
        return index

    def _trained(self, sample: np.ndarray) -> tuple[np.ndarray, torch.Tensor | None]:
        """The centroids [lists, dim] (and sq8's ranges) k-means finds on ``sample``, with exact assignment."""
        quantizer = self.faiss.IndexFlatIP(self.keys.shape[1])
        index = self._new_index(quantizer)
        index.train(sample)
        centroids = quantizer.reconstruct_n(0, self.lists)
        ranges = torch.from_numpy(self.faiss.vector_to_array(index.sq.trained)) if self.codes == "sq8" else None
        return np.ascontiguousarray(centroids, dtype=np.float32), ranges

    def _build(self, centroids: np.ndarray, ranges: torch.Tensor | None) -> None:
        faiss = self.faiss
        dim = self.keys.shape[1]
        if self.quantizer_kind == "hnsw":
            quantizer = faiss.IndexHNSWFlat(dim, HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
            quantizer.hnsw.efSearch = self.search_breadth
        else:
            quantizer = faiss.IndexFlatIP(dim)
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # a graph built by one thread is the same every time; the setting is per thread
        try:
            quantizer.add(np.ascontiguousarray(centroids))
        finally:
            faiss.omp_set_num_threads(threads)
        index = self._new_index(quantizer)
        if ranges is not None:
            faiss.copy_array_to_vector(ranges.numpy(), index.sq.trained)
        index.is_trained = True
        self.centroids, self.quantizer = centroids, quantizer
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
        index.nprobe = self.probes
        self.index = index
        filled = np.flatnonzero(~self.zero.zero)
        for at in range(0, len(filled), HASH_ROWS):
            rows = filled[at : at + HASH_ROWS]
            self._add(np.ascontiguousarray(self.keys[torch.from_numpy(rows)].numpy()), rows)

    def search(self, queries: torch.Tensor, k: int, empty_slots: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        queries = queries.cpu()
        if self.index is None:  # before the first fill: exact over the filled rows
            filled = torch.from_numpy(np.flatnonzero(~self.zero.zero))
            top = min(k, len(filled))
            candidates = filled[torch.topk(queries @ self.keys[filled].T, top, dim=1).indices].numpy()
        else:
            wanted = k if self.codes == "flat" else SQ8_CANDIDATES_PER_NEIGHBOR * k
            candidates = self.index.search(np.ascontiguousarray(queries.numpy()), wanted)[1]
        return rerank(self.keys, self.start, queries, candidates, k, self.zero)

    def update(self, slots: torch.Tensor, keys: torch.Tensor) -> None:
        local = (slots - self.start).numpy()
        keys = keys.cpu()
        nonzero = keys.any(dim=1).numpy()
        self.zero.update(local, nonzero)
        if self.index is None:
            if len(self.keys) - self.zero.count >= self.train_size:
                self._build(*self._trained(self.training_sample()))
            return
        self.index.remove_ids(self.faiss.IDSelectorArray(len(local), self.faiss.swig_ptr(np.ascontiguousarray(local))))
        if nonzero.any():
            self._add(np.ascontiguousarray(keys[torch.from_numpy(nonzero)].numpy()), local[nonzero])

    def _add(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """``keys`` into their nearest lists, as ids ``rows``; an HNSW quantizer looks for that list with the
        narrower breadth HNSW_EF_ADD (the index is only used under the memory's lock, so a search never sees it)."""
        if self.quantizer_kind != "hnsw":
            self.index.add_with_ids(keys, rows)
            return
        hnsw = self.quantizer.hnsw
        hnsw.efSearch = HNSW_EF_ADD
        try:
            self.index.add_with_ids(keys, rows)
        finally:
            hnsw.efSearch = self.search_breadth
