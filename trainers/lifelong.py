"""Omniglot in lifelong mode: one memory that is never cleared, shared by any number of trainers.

The paper's memory "works in a life-long manner, without the need to reset it". Here a trainer streams
batches of Omniglot drawings with their global class ids as labels into one memory that persists across
steps, restarts and trainer generations (a server's data directory, or an embedded store's --data-dir).
Classes come at Zipf-distributed frequencies, so some are seen constantly and some once in thousands of
steps. Drawings 16-19 of every class are never written: every `eval_every` steps the trainer asks the memory
about held-out drawings of random classes (without updating it) and reports, over the classes the memory
holds, accuracy by how long ago the class's newest entry was written (in memory commits, counting every
trainer's), by whose entry it is (this model's or another's), and by how often this trainer showed the class
(never, for a class only another model wrote: cross-model one-shot).

Several trainers, even different models, can train against one memory at once (each its own process, one
`--writer` tag each, the same --memory-name on one server): the memory's writer tags tell whose entry answered.

    python -m lifelong_memory.trainers.lifelong --data ../shared/data/omniglot --memory grpc://127.0.0.1:50051
    python -m lifelong_memory.trainers.lifelong --encoder mlp --writer mlp --memory grpc://127.0.0.1:50051

Every option below is a plain value with its default; each has a --flag.
Outputs in out_dir: checkpoint.pt, metrics.jsonl, accuracy-by-age.png.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import numpy as np
import torch
from torch import nn

from lifelong_memory.client import MemoryModule, connect
from lifelong_memory.trainers import flags, omniglot_data
from lifelong_memory.trainers.omniglot import Encoder

# -------------------------------------------------------------------- config
data = os.environ.get("OMNIGLOT_DIR", "data/omniglot")
memory = "local"  # "local" (embedded), or "grpc://host:port" to share the memory with other trainers
data_dir = ""  # with memory "local": a folder that keeps the memory across runs ("" = in this process only)
memory_name = "lifelong"
writer = "convnet"  # this trainer's writer tag: the memory keeps it with every slot it writes
encoder = "convnet"  # "convnet" (the authors' encoder) or "mlp" (a different model: an MLP on 14x14 images)
classes = 0  # training classes used (0: all 3,856 of the reference split)
rep_dim = 128
memory_size = 65536
choose_k = 256
age_noise = 8.0
zipf = 1.0  # class frequencies fall as 1 / rank^zipf
batch = 16  # drawings per step
steps = 20000
learning_rate = 1e-4
clip_norm = 5.0
dropout_keep = 0.3
eval_every = 1000
eval_classes = 500  # classes asked about at each evaluation
checkpoint_every = 500
out_dir = "runs/lifelong"
resume = False
threads = 0
seed = 0

WRITTEN_DRAWERS = 16  # drawings 0..15 of a class are shown; 16..19 only asked about
AGE_EDGES = [0, 100, 1000, 10000, 100000]  # buckets of an entry's age, in memory commits
SEEN_EDGES = [0, 1, 2, 4, 8, 10**9]  # buckets of how often this trainer showed the class (0: never)


def configure(argv: list[str] | None = None) -> dict:
    return flags.configure(globals(), __doc__, argv)


class MLPEncoder(nn.Module):
    """Another model for the same memory: average-pooled 14x14 images, two hidden layers of 512."""

    def __init__(self, rep_dim: int, dropout_keep: float):
        super().__init__()
        self.layers = nn.Sequential(
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(14 * 14, 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, rep_dim),
        )
        self.dropout = nn.Dropout(1.0 - dropout_keep)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.layers(images.unsqueeze(1)))


def build_encoder(config: dict) -> nn.Module:
    if config["encoder"] == "convnet":
        return Encoder(config["rep_dim"], config["dropout_keep"])
    if config["encoder"] == "mlp":
        return MLPEncoder(config["rep_dim"], config["dropout_keep"])
    raise SystemExit(f"--encoder must be 'convnet' or 'mlp', got {config['encoder']!r}")


def class_frequencies(count: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf probabilities over the classes, in a random order of ranks (fixed by the seed)."""
    weights = 1.0 / np.arange(1, count + 1) ** exponent
    return (weights / weights.sum())[rng.permutation(count)]


def bucket(values: np.ndarray, edges: list[int]) -> np.ndarray:
    return np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)


@torch.no_grad()
def evaluate(encoder, module, classes, seen, config, rng) -> dict:
    """Ask the memory about held-out drawings of random classes, without updating it. Over the classes it holds:
    accuracy by the age of the class's newest entry and by whose it is (this trainer's or another's), by how
    often this trainer showed the class (0: only others wrote it), and per writer."""
    encoder.eval()
    asked = rng.choice(len(classes), size=min(config["eval_classes"], len(classes)), replace=False)
    drawers = rng.integers(WRITTEN_DRAWERS, classes.shape[1], size=len(asked))
    images = torch.from_numpy(classes[asked, drawers])
    result = module.memory.query(module.project(encoder(images)), fields=())
    encoder.train()
    correct = result.predictions.numpy() == asked
    ages, writers = np.full(len(asked), np.inf), [""] * len(asked)
    for i, label in enumerate(asked.tolist()):
        found = module.memory.find_label(label)
        if len(found.slots):
            newest = int(found.slots[int(found.ages.argmin())])
            ages[i] = float(found.ages.min())
            writers[i] = module.memory.read_slots([newest]).writers[0]
    held = np.isfinite(ages)  # classes with an entry in the memory

    def accuracy(mask: np.ndarray) -> dict:
        n = int((mask & held).sum())
        mean = float(correct[mask & held].mean()) if n else float("nan")
        return {"n": n, "accuracy": mean, "ci95": 1.96 * float(np.sqrt(mean * (1 - mean) / n)) if n else float("nan")}

    own = np.array([w == config["writer"] for w in writers])
    by_age = bucket(np.where(held, ages, 0), AGE_EDGES)
    by_seen = bucket(seen[asked], SEEN_EDGES)
    return {
        "asked": len(asked),
        "held": int(held.sum()),
        "accuracy": accuracy(np.ones(len(asked), dtype=bool)),
        "by_age": {
            who: [accuracy(mine & (by_age == b)) for b in range(len(AGE_EDGES) - 1)]
            for who, mine in (("own", own), ("other", ~own))
        },
        "by_seen": [accuracy(by_seen == b) for b in range(len(SEEN_EDGES) - 1)],
        "by_writer": {
            w: accuracy(np.array([x == w for x in writers]))
            for w in sorted(set(writers[i] for i in np.flatnonzero(held)))
        },
    }


def plot(metrics: list[dict], path: pathlib.Path, writer_tag: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = metrics[-1]["evaluation"]
    figure, axes = plt.subplots(figsize=(8, 5))
    labels = [f"[{low:,}, {high:,})" for low, high in zip(AGE_EDGES[:-1], AGE_EDGES[1:], strict=True)]
    for offset, who in ((-0.2, "own"), (0.2, "other")):
        cells = last["by_age"][who]
        means = [c["accuracy"] if c["n"] else 0 for c in cells]
        errors = [c["ci95"] if c["n"] else 0 for c in cells]
        name = f"entries written by {writer_tag}" if who == "own" else "entries written by other trainers"
        axes.bar(np.arange(len(cells)) + offset, means, 0.4, yerr=errors, capsize=3, label=name)
        for x, c in enumerate(cells):
            axes.annotate(f"n={c['n']}", (x + offset, 0.02), ha="center", fontsize=7, rotation=90)
    axes.set_xticks(range(len(labels)), labels)
    axes.set(
        xlabel="age of the class's newest memory entry (memory commits)",
        ylabel="accuracy on a held-out drawing",
        ylim=(0, 1),
        title=f"lifelong memory, model {writer_tag!r}, after step {metrics[-1]['step']:,}",
    )
    axes.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    config = configure(argv)
    torch.manual_seed(config["seed"])
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    out = pathlib.Path(config["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    split = omniglot_data.load_split(pathlib.Path(config["data"]), "reference", "ink")
    classes = split.train[: config["classes"] or None]
    rng = np.random.default_rng(config["seed"])
    frequencies = class_frequencies(len(classes), config["zipf"], rng)

    store = connect(config["memory"], data_dir=config["data_dir"] or None)
    encoder = build_encoder(config)
    module = MemoryModule(
        store,
        config["rep_dim"],
        name=config["memory_name"],
        writer=config["writer"],
        memory_size=config["memory_size"],
        choose_k=config["choose_k"],
        age_noise=config["age_noise"],
        seed=config["seed"],
    )
    parameters = [*encoder.parameters(), *module.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=config["learning_rate"], eps=1e-4)
    seen = np.zeros(len(classes), dtype=np.int64)  # how often this trainer showed each class
    first, metrics = 1, []
    checkpoint_path = out / "checkpoint.pt"
    if config["resume"] and checkpoint_path.exists():
        state = torch.load(checkpoint_path, weights_only=False)
        encoder.load_state_dict(state["encoder"])
        module.load_state_dict(state["memory_module"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        seen, first, metrics = state["seen"], state["step"] + 1, state["metrics"]
        print(f"resumed after step {state['step']}; the memory goes on from where it is (it is never reset)")
    info = module.memory.info()
    print(
        f"memory {info.name!r}: {info.stats['filled_slots']} of {info.config.memory_size} slots filled, commit "
        f"{info.stats['commit_sequence']}; {len(classes)} classes, encoder {config['encoder']}, writer "
        f"{config['writer']!r}"
    )
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    started, losses = time.time(), []
    for step in range(first, config["steps"] + 1):
        labels = rng.choice(len(classes), size=config["batch"], p=frequencies)
        drawers = rng.integers(0, WRITTEN_DRAWERS, size=config["batch"])
        np.add.at(seen, labels, 1)
        output = module(encoder(torch.from_numpy(classes[labels, drawers])), torch.from_numpy(labels))
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        nn.utils.clip_grad_norm_(parameters, config["clip_norm"])
        optimizer.step()
        losses.append(output.loss.item())

        if step % config["eval_every"] == 0 or step == config["steps"]:
            evaluation = evaluate(encoder, module, classes, seen, config, np.random.default_rng([config["seed"], step]))
            stats = module.memory.info().stats
            metrics.append(
                {
                    "step": step,
                    "train_loss": float(np.mean(losses)),
                    "commit_sequence": stats["commit_sequence"],
                    "filled_slots": stats["filled_slots"],
                    "elapsed_s": time.time() - started,
                    "evaluation": evaluation,
                }
            )
            losses = []
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics[-1]) + "\n")
            own = evaluation["by_age"]["own"]
            print(
                f"step {step:6d}  loss {metrics[-1]['train_loss']:+.4f}  held-out accuracy "
                f"{evaluation['accuracy']['accuracy']:.3f}  by entry age (own) "
                + " ".join(f"{c['accuracy']:.2f}/{c['n']}" for c in own)
                + f"  filled {stats['filled_slots']}"
            )
            plot(metrics, out / "accuracy-by-age.png", config["writer"])
        if step % config["checkpoint_every"] == 0 or step == config["steps"]:
            state = {
                "encoder": encoder.state_dict(),
                "memory_module": module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "numpy_rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "seen": seen,
                "step": step,
                "metrics": metrics,
                "config": config,
            }
            torch.save(state, checkpoint_path.with_suffix(".tmp"))
            os.replace(checkpoint_path.with_suffix(".tmp"), checkpoint_path)
    store.close()


if __name__ == "__main__":
    main()
