"""How approximate an approximate backend's search is in Omniglot training (docs/approximate-search.md,
"Omniglot with each backend"): with a checkpoint's encoder, episode batches run as the trainer runs them (a
cleared memory, one fused query + update per episode step; for faiss-ivf the quantizer retrained on the keys of
every ``--retrain-every``-th batch and kept through the clears, as the trainer's ``--retrain-index-every``), and
before each step's update the same queries are answered by an exact search over the very same memory. Reports the
share of rows whose nearest slot, and whose positive and negative slots (the ones the loss and the update use),
equal the exact search's.

    .venv/bin/python benchmarks/omniglot_agreement.py --checkpoint runs/backend-ivf/checkpoint.pt \\
        --data ../shared/data/omniglot --backend faiss-ivf --ivf-lists 8 --ivf-probes 1

The encoder runs without dropout (the trainer's keys carry dropout noise; these do not).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

import numpy as np
import torch

from lifelong_memory.client.module import l2_normalize
from lifelong_memory.server.index import build_index
from lifelong_memory.server.memory import Memory, MemoryConfig
from lifelong_memory.trainers import omniglot, omniglot_data

FIELDS = frozenset({"neighbors", "positive_negative"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--backend", choices=["faiss-ivf", "lsh"], default="faiss-ivf")
    parser.add_argument("--ivf-lists", type=int, default=8)
    parser.add_argument("--ivf-probes", type=int, default=1)
    parser.add_argument("--retrain-every", type=int, default=1, help="faiss-ivf: retrain after every n-th batch")
    parser.add_argument("--batches", type=int, default=20, help="measured episode batches (after one more)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    state = torch.load(args.checkpoint, weights_only=False, map_location="cpu")
    config = {**omniglot.configure([]), **state["config"]}  # the defaults of settings newer than the checkpoint
    encoder = omniglot.build_encoder(config["encoder"], config["rep_dim"], config["dropout_keep"], config["init"])
    encoder.load_state_dict(state["encoder"])
    encoder.eval()
    query_proj = state["memory_module"]["query_proj"]
    split = omniglot_data.load_split(pathlib.Path(args.data), config["split"], config["input"])
    ivf = args.backend == "faiss-ivf"
    search = dict(backend=args.backend, ivf_lists=args.ivf_lists * ivf, ivf_probes=args.ivf_probes * ivf)
    memory_config = MemoryConfig(
        key_dim=config["rep_dim"], **{**omniglot.memory_fields(config), **search, "seed": args.seed}
    )
    memory = Memory(memory_config, max_batch=config["batch_episodes"])
    exact_config = dataclasses.replace(memory.config, backend="torch")
    rng = np.random.default_rng(args.seed)
    same = {"nearest": [], "positive": [], "negative": [], "positive_and_negative": []}
    for batch in range(args.batches + 1):
        images, labels = omniglot_data.sample_episodes(
            split.train, config["batch_episodes"], config["episode_width"], config["episode_length"], rng
        )
        memory.clear()
        for t in range(len(images)):
            with torch.no_grad():
                queries = l2_normalize(encoder(torch.from_numpy(images[t])) @ query_proj)
            y = torch.from_numpy(labels[t])
            if batch:  # the first batch only trains the quantizer (faiss-ivf)
                approximate = memory.query(queries, y, fields=FIELDS)
                ivf_index, memory.index = memory.index, build_index(memory.keys, exact_config, memory.max_batch)
                try:
                    exact = memory.query(queries, y, fields=FIELDS)
                finally:
                    memory.index = ivf_index
                nearest = approximate.neighbor_slots[:, 0] == exact.neighbor_slots[:, 0]
                positive = approximate.positive_slots == exact.positive_slots
                negative = approximate.negative_slots == exact.negative_slots
                same["nearest"].append(nearest)
                same["positive"].append(positive)
                same["negative"].append(negative)
                same["positive_and_negative"].append(positive & negative)
            memory.query(queries, y, update=True, fields=frozenset())
        if args.backend == "faiss-ivf" and batch % args.retrain_every == 0:
            memory.retrain_index()
    shares = {name: float(torch.cat(rows).float().mean()) for name, rows in same.items()}
    rows = len(torch.cat(same["nearest"]))
    report = {
        "checkpoint": args.checkpoint,
        "episode_batch": state["episode_batch"],
        "config": dataclasses.asdict(memory.config),
        "rows": rows,
        "same_as_exact": shares,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
