"""Omniglot training-step time: embedded memory, the memory over gRPC, and no memory at all, side by side.

    .venv/bin/python benchmarks/bench_omniglot_step.py [--data ../shared/data/omniglot] [--episode-batches 12]

One training step = the reference encoder on 16 images, MemoryModule's fused
query + update (batch 16, memory 8,192, k 256, rep_dim 128), the loss, the
backward pass, gradient clipping and an Adam step: exactly what trainers/omniglot.py
does per episode step. Two identical trainers (same seed) run with connect("local")
and with a server this script starts (`lmem serve` on a free 127.0.0.1 port, or
on a Unix domain socket with --unix; stopped by PID at the end). Both see the same
episodes, so they also must compute the same losses. The anchor, a third trainer,
has no memory at all: the same encoder, a linear head onto the batch's 80 episode
labels, cross-entropy, backward, clipping and Adam. The three run alternately, one
episode batch each in turn, so load from elsewhere hits them alike.
Reported: median ms per step for each, the ratios (targets, issue 10: gRPC /
embedded <= 1.03, gRPC / no memory <= 1.08), and the authors' code's 21 ms per
step measured on this kind of machine (2-core CPU). Table and JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

from lifelong_memory.client import MemoryModule, connect
from lifelong_memory.trainers import omniglot, omniglot_data

AUTHORS_MS_PER_STEP = 21.0
TARGETS = {"grpc/embedded": 1.03, "grpc/none": 1.08}
HEAD_CLASSES = 16 * 5  # a batch of 16 episodes of 5 classes each, labelled apart


class LinearHead(nn.Module):
    """The step with no memory: a linear classifier on the representation, trained with cross-entropy."""

    def __init__(self, rep_dim: int):
        super().__init__()
        self.linear = nn.Linear(rep_dim, HEAD_CLASSES)

    def loss(self, representation: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.linear(representation), labels)


def train_without_memory(encoder, head, optimizer, images, labels, clip) -> float:
    """train_episode_batch's steps with the linear head in the memory's place."""
    encoder.train()
    losses = []
    for t in range(len(images)):
        loss = head.loss(encoder(omniglot.on_device(encoder, images[t])), torch.from_numpy(labels[t]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([*encoder.parameters(), *head.parameters()], clip)
        optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer(url: str | None, seed: int):
    """(store, encoder, memory module or linear head, optimizer); no store and a head without ``url``."""
    torch.manual_seed(seed)
    if url is None:
        encoder = omniglot.Encoder(rep_dim=128, dropout_keep=0.3)
        head = LinearHead(128)
        return None, encoder, head, torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=1e-4, eps=1e-4)
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
    parser.add_argument("--episode-batches", type=int, default=12, help="per trainer, after one warm-up batch")
    parser.add_argument("--unix", action="store_true", help="the server on a Unix domain socket instead of TCP")
    parser.add_argument("--out", default="benchmarks/results/omniglot-step.json")
    args = parser.parse_args()

    classes = omniglot_data.load_split(pathlib.Path(args.data), "reference").train
    sockets = tempfile.mkdtemp(prefix="bench-omniglot-")
    url = f"unix://{sockets}/lmem.sock" if args.unix else f"grpc://127.0.0.1:{free_port()}"
    address = ["--listen", url] if args.unix else ["--port", url.rsplit(":", 1)[1]]
    server = subprocess.Popen(
        [sys.executable, "-m", "lifelong_memory.client.cli", "serve", *address, "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        server.stdout.readline()
        trainers = {
            "embedded": trainer("local", 0),
            "grpc": trainer(url, 0),
            "none": trainer(None, 0),
        }
        # Each trainer keeps its own torch RNG (dropout), so all see the same masks.
        rng_states = {name: torch.get_rng_state() for name in trainers}
        step_ms = {name: [] for name in trainers}
        losses = {name: [] for name in trainers}
        rng = np.random.default_rng(0)
        for batch in range(args.episode_batches + 1):
            images, labels = omniglot_data.sample_episodes(classes, 16, 5, 30, rng)
            for name, (_, encoder, module, optimizer) in trainers.items():
                train = train_without_memory if name == "none" else omniglot.train_episode_batch
                torch.set_rng_state(rng_states[name])
                started = time.perf_counter()
                loss = train(encoder, module, optimizer, images, labels, clip=5.0)
                elapsed = time.perf_counter() - started
                rng_states[name] = torch.get_rng_state()
                if batch > 0:  # the first batch warms up allocators and connections
                    step_ms[name].append(1000 * elapsed / 30)
                    losses[name].append(loss)
        for store, *_ in trainers.values():
            if store is not None:
                store.delete_memory("bench-step")
                store.close()
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(sockets, ignore_errors=True)

    median = {name: statistics.median(values) for name, values in step_ms.items()}
    # Batches of the three trainers ran back to back: the median of the per-batch ratios sees the least load.
    ratios = {
        f"{a}/{b}": statistics.median(x / y for x, y in zip(step_ms[a], step_ms[b], strict=True))
        for a, b in (("grpc", "embedded"), ("grpc", "none"), ("embedded", "none"))
    }
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "load_average": os.getloadavg()},
        "ms_per_step": median,
        "per_batch_ms_per_step": step_ms,
        "ratios": ratios,
        "targets": {pair: {"goal": goal, "pass": ratios[pair] <= goal} for pair, goal in TARGETS.items()},
        "transport": "unix" if args.unix else "tcp",
        "authors_ms_per_step": AUTHORS_MS_PER_STEP,
        "same_losses": bool(np.allclose(losses["embedded"], losses["grpc"], atol=1e-5)),
    }  # fmt: skip
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2))

    print(
        f"Omniglot training step (batch 16, memory 8,192, k 256), {args.episode_batches} episode batches x 30 steps, "
        f"gRPC over {result['transport']}, {torch.get_num_threads()} torch threads, load {os.getloadavg()[0]:.2f}"
    )
    print(f"{'memory':<10} {'ms/step':>8} {'vs authors (21 ms)':>20}")
    for name in ("embedded", "grpc", "none"):
        print(f"{name:<10} {median[name]:8.1f} {median[name] / AUTHORS_MS_PER_STEP:19.2f}x")
    print("median of the per-batch ratios:")
    for pair, ratio in ratios.items():
        goal = TARGETS.get(pair)
        verdict = "" if goal is None else f" (target <= {goal}: {'PASS' if ratio <= goal else 'FAIL'})"
        print(f"  {pair:<14} {ratio:.3f}{verdict}")
    print(f"same losses embedded and gRPC: {result['same_losses']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
