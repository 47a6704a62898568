"""Whose entries answer each model of a shared lifelong memory, and how near its queries come to another model's.

    .venv/bin/python benchmarks/lifelong_key_spaces.py --data-dir runs/ll13/server-data --memory lifelong-13-pair \
        runs/ll13/pair-convnet runs/ll13/pair-convnet-b

For each finished trainers/lifelong.py run (its checkpoint.pt: encoder, query projection, input view), against
the memory as a server or embedded store left it: one held-out drawing (17) of 200 stream classes and of every
held probe class, asked without updating; per group of probe classes (whoever wrote them) the accuracy, what the
nearest entry held (a stream class, another probe class), whose it was, and the mean cosine similarity of the
query to the probe class's own entry. A model whose queries never come near another's entries cannot answer
from them, whatever their labels.
"""

from __future__ import annotations

import argparse
import collections
import pathlib

import numpy as np
import torch

from lifelong_memory.client import MemoryModule, connect
from lifelong_memory.trainers import lifelong, omniglot_data

ASKED_DRAWER = 17


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="the memory's data directory (a stopped server's)")
    parser.add_argument("--memory", required=True, help="the memory's name")
    parser.add_argument("runs", nargs="+", help="out_dirs of lifelong runs that trained against that memory")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with connect("local", data_dir=args.data_dir) as store:
        for run in args.runs:
            state = torch.load(pathlib.Path(run) / "checkpoint.pt", weights_only=False)
            config = state["config"]
            split = omniglot_data.load_split(pathlib.Path(config["data"]), "reference", config["input"], False)
            encoder = lifelong.build_encoder(config)
            encoder.load_state_dict(state["encoder"])
            encoder.eval()
            module = MemoryModule(store, config["rep_dim"], name=args.memory)
            module.load_state_dict(state["memory_module"])
            memory, offset = module.memory, len(split.train)
            stream = np.random.default_rng(0).choice(config["classes"] or len(split.train), 200, replace=False)
            groups = {"stream": (split.train, stream, stream)}
            held = [i for i in range(len(split.test)) if len(memory.find_label(offset + i).slots)]
            owners = collections.defaultdict(list)
            for i in held:
                found = memory.find_label(offset + i)
                owners[memory.read_slots([int(found.slots[0])]).writers[0]].append(i)
            for writer, indices in sorted(owners.items()):
                groups[f"probes written by {writer}"] = (split.test, np.array(indices), np.array(indices) + offset)
            print(f"\n{run} (writer {config['writer']!r}) against {args.memory!r}")
            for name, (images, indices, labels) in groups.items():
                with torch.no_grad():
                    queries = module.project(encoder(torch.from_numpy(images[indices, ASKED_DRAWER])))
                result = memory.query(queries, fields=("neighbors",))
                predictions = result.predictions.numpy()
                answering = collections.Counter(memory.read_slots(result.neighbor_slots[:, 0]).writers)
                line = (
                    f"  {name:<28} n {len(indices):4d}  accuracy {np.mean(predictions == labels):.3f}  nearest entry "
                    f"a stream class {np.mean(predictions < offset):.3f}, written by {dict(answering)}"
                )
                if name != "stream":
                    own_keys = torch.stack(
                        [memory.read_slots([int(memory.find_label(int(y)).slots[0])]).keys[0] for y in labels]
                    )
                    line += f"; cosine to the class's own entry {float((queries * own_keys).sum(1).mean()):.3f}"
                print(line)


if __name__ == "__main__":
    main()
