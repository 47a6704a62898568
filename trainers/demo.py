"""A first look at the memory: learn to recognise classes after seeing one example.

Synthetic one-shot episodes. Every episode draws `episode_width` brand-new
classes (random prototypes pushed through a fixed random nonlinear map, with
noise per sample) and shows each class several times in random order. A small
MLP encoder + MemoryModule is trained with the memory loss only; the memory is
cleared between episode batches, as in the paper's Omniglot protocol. The
model cannot memorise classes (they are new every episode): it must learn an
embedding in which one stored example is enough.

    python -m lifelong_memory.trainers.demo [--memory local|grpc://host:port] [--steps 300]

Prints n-shot accuracy (accuracy on a class's (n+1)-th appearance) before and
after training.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from lifelong_memory.client import MemoryModule, connect

# Plain configuration values, overridable from the command line.
input_dim = 64
hidden_dim = 128
key_dim = 64
episode_width = 5  # classes per episode
episode_length = 30  # steps per episode
batch_episodes = 16  # episodes sharing one memory per step
memory_size = 8192
noise = 0.9  # per-sample noise relative to the class prototype
steps = 300
lr = 1e-3
seed = 0


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory", default="local", help="'local' (embedded) or grpc://host:port")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--seed", type=int, default=seed)
    return parser.parse_args()


def episode_batch(world: nn.Module, generator: torch.Generator):
    """Inputs [length, batch, input_dim] and labels [length, batch]; labels disjoint across the batch."""
    prototypes = torch.randn(batch_episodes, episode_width, input_dim, generator=generator)
    # Each class is shown once before any is shown twice.
    rounds = episode_length // episode_width + 1
    order = torch.cat(
        [
            torch.stack([torch.randperm(episode_width, generator=generator) for _ in range(batch_episodes)], 1)
            for _ in range(rounds)
        ]
    )[:episode_length]  # [length, batch] local class ids
    points = prototypes[torch.arange(batch_episodes), order] + noise * torch.randn(
        episode_length, batch_episodes, input_dim, generator=generator
    )
    with torch.no_grad():
        inputs = world(points)
    labels = order + episode_width * torch.arange(batch_episodes)
    return inputs, labels


def run_episodes(model: nn.Module, memory: MemoryModule, world: nn.Module, generator, train: bool, optimizer=None):
    """One episode batch on a cleared memory; returns (loss, correct[n_shot], seen[n_shot])."""
    memory.memory.clear()
    inputs, labels = episode_batch(world, generator)
    shots = torch.zeros(batch_episodes, episode_width * batch_episodes, dtype=torch.long)
    correct, seen = torch.zeros(6), torch.zeros(6)
    total_loss = 0.0
    model.train(train)
    for t in range(episode_length):
        out = memory(model(inputs[t]), labels[t])
        n = shots[torch.arange(batch_episodes), labels[t]].clamp(max=5)
        correct.index_add_(0, n, (out.predictions == labels[t]).float())
        seen.index_add_(0, n, torch.ones(batch_episodes))
        shots[torch.arange(batch_episodes), labels[t]] += 1
        if train:
            optimizer.zero_grad()
            out.loss.backward()
            nn.utils.clip_grad_norm_(list(model.parameters()) + list(memory.parameters()), 5.0)
            optimizer.step()
        total_loss += out.loss.item()
    return total_loss / episode_length, correct, seen


def evaluate(model, memory, world, episodes=20, seed_offset=10_000):
    generator = torch.Generator().manual_seed(seed_offset)
    correct, seen = torch.zeros(6), torch.zeros(6)
    with torch.no_grad():
        for _ in range(episodes):
            _, c, s = run_episodes(model, memory, world, generator, train=False)
            correct += c
            seen += s
    return correct / seen.clamp(min=1)


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    world = nn.Sequential(nn.Linear(input_dim, input_dim), nn.Tanh(), nn.Linear(input_dim, input_dim))
    model = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, key_dim))
    store = connect(args.memory)
    name = f"demo-{args.seed}"
    if name in {info.name for info in store.list_memories()}:
        store.delete_memory(name)
    memory = MemoryModule(store, key_dim, name=name, memory_size=memory_size, seed=args.seed)
    optimizer = torch.optim.Adam(list(model.parameters()) + list(memory.parameters()), lr=lr)

    before = evaluate(model, memory, world)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.time()
    for step in range(1, args.steps + 1):
        loss, correct, seen = run_episodes(model, memory, world, generator, train=True, optimizer=optimizer)
        if step % 50 == 0 or step == args.steps:
            one_shot = float(correct[1] / seen[1])
            print(f"step {step:4d}  loss {loss:+.4f}  train 1-shot {one_shot:.3f}  ({time.time() - started:.0f} s)")
    after = evaluate(model, memory, world)
    store.delete_memory(name)
    store.close()

    print(f"\nn-shot accuracy on new classes ({episode_width}-way, episode length {episode_length}):")
    print("           " + "  ".join(f"{n}-shot" for n in range(6)))
    for label, accuracy in (("untrained", before), ("trained", after)):
        print(f"{label:<10} " + "  ".join(f"{float(a):6.3f}" for a in accuracy))


if __name__ == "__main__":
    main()
