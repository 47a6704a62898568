"""When must the faiss-ivf quantizer be retrained? Quality of a quantizer trained on the first fill as every
key drifts away from the distribution it was trained on, against one trained on the keys as they are now.

    .venv/bin/python benchmarks/bench_ivf_drift.py                    # N = 65,536, d = 128, ~2 min on 1 core
    .venv/bin/python benchmarks/bench_ivf_drift.py --n 262144 --out /tmp/drift.json

Keys are clustered (N / 32 centres, noise of norm 0.5). The memory is filled and its faiss-ivf index trained
(default nlist and nprobe). Then the centres drift: centre_t = normalise(centre_0 + t * direction), one random
direction per centre, and every key is rewritten from the drifted centres through the index's own writes
(remove_ids + add_with_ids), as a training encoder's drift would rewrite them. At each t: recall@1, the share
of rows whose positive and negative slots equal the exact ones, and faiss's list imbalance factor (1 = even;
the search cost per probed list grows with it), for the stale quantizer and for one retrained on these keys.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from bench_ann import CLUSTER_SIZE, CLUSTER_SPREAD, D, K, quality

from lifelong_memory.server.index import build_index, import_faiss
from lifelong_memory.server.memory import Memory, MemoryConfig

WRITE_ROWS = 4096


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1 << 16)
    parser.add_argument("--drifts", default="0,0.25,0.5,1,2", help="comma-separated t")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import_faiss().omp_set_num_threads(1)
    n = args.n
    generator = torch.Generator().manual_seed(0)
    normal = torch.nn.functional.normalize
    centres = normal(torch.randn(n // CLUSTER_SIZE, D, generator=generator), dim=1)
    directions = normal(torch.randn(n // CLUSTER_SIZE, D, generator=generator), dim=1)
    labels = torch.randint(0, len(centres), (n,), generator=generator)
    noise = torch.randn(n, D, generator=generator) * (CLUSTER_SPREAD / D**0.5)

    def keys_at(t: float, which: torch.Tensor) -> torch.Tensor:
        return normal(normal(centres[labels[which]] + t * directions[labels[which]], dim=1) + noise[which], dim=1)

    config = MemoryConfig(key_dim=D, memory_size=n, choose_k=K, backend="faiss-ivf")
    memory = Memory(config)
    memory.keys.copy_(keys_at(0.0, torch.arange(n)))
    memory.values.copy_(labels)
    memory.empty_slots = 0
    stale = build_index(memory.keys, memory.config, 256)  # trained on the first fill
    exact_config = MemoryConfig(key_dim=D, memory_size=n, choose_k=K).validated()
    exact = build_index(memory.keys, exact_config, 256)
    query_labels = torch.randint(0, len(centres), (args.batch,), generator=generator)
    query_noise = torch.randn(args.batch, D, generator=generator) * (CLUSTER_SPREAD / D**0.5)
    rows = []
    print(f"N={n:,} nlist={memory.config.ivf_lists} nprobe={memory.config.ivf_probes}")
    print("| t | quantizer | recall@1 | pos+neg = exact | overlap@k | list imbalance |")
    print("|---:|---|---:|---:|---:|---:|")
    for t in (float(x) for x in args.drifts.split(",")):
        for at in range(0, n, WRITE_ROWS):
            slots = torch.arange(at, min(n, at + WRITE_ROWS))
            memory.keys[slots] = keys_at(t, slots)
            stale.update(slots, memory.keys[slots])
        q = normal(normal(centres[query_labels] + t * directions[query_labels], dim=1) + query_noise, dim=1)
        memory.index = exact
        want = memory.query(q, query_labels)
        retrained = build_index(memory.keys, memory.config, 256)
        for name, index in (("first fill", stale), ("retrained", retrained)):
            memory.index = index
            got = memory.query(q, query_labels)
            row = {"t": t, "quantizer": name}
            row |= quality(
                got.neighbor_slots,
                want.neighbor_slots,
                (got.positive_slots, got.negative_slots),
                (want.positive_slots, want.negative_slots),
            )
            row["imbalance"] = index.shards[0].index.invlists.imbalance_factor()
            rows.append(row)
            print(
                f"| {t} | {name} | {row['recall_at_1']:.3f} | {row['sides_equal']:.3f} | "
                f"{row['overlap_at_k']:.3f} | {row['imbalance']:.2f} |",
                flush=True,
            )
    if args.out:
        args.out.write_text(json.dumps({"n": n, "config": vars(memory.config), "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
