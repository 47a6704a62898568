"""Omniglot training-step time: embedded memory vs the memory over gRPC, side by side in one run.

    .venv/bin/python benchmarks/bench_omniglot_step.py [--data ../shared/data/omniglot] [--episode-batches 6]

One training step = the reference encoder on 16 images, MemoryModule's fused
query + update (batch 16, memory 8,192, k 256, rep_dim 128), the loss, the
backward pass and an Adam step: exactly what trainers/omniglot.py does per
episode step. Two identical trainers (same seed) run alternately, one episode
batch each in turn, one with connect("local") and one with a server this
script starts (`lmem serve` on a free 127.0.0.1 port, stopped by PID at the end).
Both see the same episodes, so they also must compute the same losses.
Reported: median ms per step for each, the ratio, and the authors' code's
21 ms per step measured on this kind of machine (2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import socket
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from lifelong_memory.client import MemoryModule, connect
from lifelong_memory.trainers import omniglot, omniglot_data

AUTHORS_MS_PER_STEP = 21.0
TARGET_RATIO = 1.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer(url: str, seed: int):
    torch.manual_seed(seed)
    store = connect(url)
    if "bench-step" in {info.name for info in store.list_memories()}:
        store.delete_memory("bench-step")
    encoder = omniglot.Encoder(rep_dim=128, dropout_keep=0.3)
    module = MemoryModule(store, 128, name="bench-step", memory_size=8192, choose_k=256, seed=seed)
    optimizer = torch.optim.Adam([*encoder.parameters(), *module.parameters()], lr=1e-4, eps=1e-4)
    return store, encoder, module, optimizer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("OMNIGLOT_DIR", "../shared/data/omniglot"))
    parser.add_argument("--episode-batches", type=int, default=6, help="per trainer, after one warm-up batch")
    parser.add_argument("--out", default="benchmarks/results/omniglot-step.json")
    args = parser.parse_args()

    classes = omniglot_data.load_split(pathlib.Path(args.data), "reference").train
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "lifelong_memory.client.cli", "serve", "--port", str(port), "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        server.stdout.readline()
        trainers = {"embedded": trainer("local", 0), "grpc": trainer(f"grpc://127.0.0.1:{port}", 0)}
        # Each trainer keeps its own torch RNG (dropout), so both see the same masks.
        rng_states = {name: torch.get_rng_state() for name in trainers}
        step_ms = {name: [] for name in trainers}
        losses = {name: [] for name in trainers}
        rng = np.random.default_rng(0)
        for batch in range(args.episode_batches + 1):
            images, labels = omniglot_data.sample_episodes(classes, 16, 5, 30, rng)
            for name, (_, encoder, module, optimizer) in trainers.items():
                torch.set_rng_state(rng_states[name])
                started = time.perf_counter()
                loss = omniglot.train_episode_batch(encoder, module, optimizer, images, labels, clip=5.0)
                elapsed = time.perf_counter() - started
                rng_states[name] = torch.get_rng_state()
                if batch > 0:  # the first batch warms up allocators and connections
                    step_ms[name].append(1000 * elapsed / 30)
                    losses[name].append(loss)
        for store, *_ in trainers.values():
            store.delete_memory("bench-step")
            store.close()
    finally:
        server.kill()
        server.wait()

    median = {name: statistics.median(values) for name, values in step_ms.items()}
    ratio = median["grpc"] / median["embedded"]
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "ms_per_step": median,
        "per_batch_ms_per_step": step_ms,
        "grpc_over_embedded": ratio,
        "authors_ms_per_step": AUTHORS_MS_PER_STEP,
        "same_losses": bool(np.allclose(losses["embedded"], losses["grpc"], atol=1e-5)),
    }  # fmt: skip
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2))

    print(f"Omniglot training step (batch 16, memory 8,192, k 256), {args.episode_batches} episode batches x 30 steps")
    print(f"{'memory':<10} {'ms/step':>8} {'vs authors (21 ms)':>20}")
    for name in ("embedded", "grpc"):
        print(f"{name:<10} {median[name]:8.1f} {median[name] / AUTHORS_MS_PER_STEP:19.2f}x")
    verdict = "PASS" if ratio <= TARGET_RATIO else "FAIL"
    print(f"gRPC / embedded: {ratio:.3f} (target <= {TARGET_RATIO}): {verdict}; same losses: {result['same_losses']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
