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

Entry age by design (`--probe-classes`): classes of Omniglot's evaluation split, which neither the stream nor an
episodic checkpoint ever showed, are the probes. Each trainer writes its own block of them (`--probe-group`),
one drawing once each, in waves from `--probe-start`; every evaluation then asks about every probe class the
memory holds, whoever wrote it, with its four held-out drawings, and records the age of its entry (memory
commits since the write; this trainer's steps for its own probes). So accuracy is measured on entries of known
age, up to the length of the run, and across models (a probe only the other model wrote).

`--init-from` starts the convnet and its query projection from an episodic Omniglot checkpoint
(trainers/omniglot.py): an encoder that already separates classes. Its input view (`--input`) must match.

    python -m lifelong_memory.trainers.lifelong --data ../shared/data/omniglot --memory grpc://127.0.0.1:50051
    python -m lifelong_memory.trainers.lifelong --encoder mlp --writer mlp --memory grpc://127.0.0.1:50051
    python -m lifelong_memory.trainers.lifelong --init-from runs/omniglot/checkpoint.pt --input raw --probe-classes 200

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
from lifelong_memory.server.memory import EMPTY
from lifelong_memory.trainers import flags, omniglot_data
from lifelong_memory.trainers.omniglot import EXPERIMENT_SETTINGS, OMNIGLOT_CHECKPOINT
from lifelong_memory.trainers.omniglot import build_encoder as omniglot_encoder

# -------------------------------------------------------------------- config
data = os.environ.get("OMNIGLOT_DIR", "../shared/data/omniglot")
memory = "local"  # "local" (embedded), or "grpc://host:port" to share the memory with other trainers
data_dir = ""  # with memory "local": a folder that keeps the memory across runs ("" = in this process only)
memory_name = "lifelong"
writer = "convnet"  # this trainer's writer tag: the memory keeps it with every slot it writes
encoder = "convnet"  # "convnet" (the authors'), "resnet" (a small ResNet) or "mlp" (an MLP on 14x14 images)
input = "ink"  # this trainer's view of the images, as omniglot.py's --input: "ink" (in [0, 1]) or "raw" (0-255)
init_from = ""  # an omniglot.py checkpoint: the encoder and its query projection start from its weights
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
align_to = ""  # other trainers' writer tags (comma-separated): each query also learns to be answered by their entries
align_weight = 1.0  # the weight of that loss against the memory's own
align_refresh = 50  # steps between reads of the other trainers' entries
read_only_steps = 0  # the first steps learn from the memory's keys without writing (a late joiner aligns first)
probe_classes = 0  # evaluation-split classes this trainer writes once each and asks about at every evaluation
probe_group = 0  # this trainer's block of probe classes: [group * probe_classes, (group + 1) * probe_classes)
probe_start = 1  # the step of the first probe wave
probe_every = 50  # steps between probe waves
probe_wave = 20  # probe classes written per wave
checkpoint_every = 500
out_dir = "runs/lifelong"
resume = False
threads = 0
seed = 0
report = ""  # comma-separated out_dirs of finished runs: print their summary, plot them side by side, train nothing
report_targets = "0.25,0.5,0.75"  # the accuracies whose first step the report gives
report_plot = "lifelong-report.png"

WRITTEN_DRAWERS = 16  # drawings 0..15 of a class are shown; 16..19 only asked about
AGE_EDGES = [0, 100, 1000, 10000, 100000]  # buckets of an entry's age, in memory commits
PROBE_WRITTEN_DRAWER = 0  # the one drawing of a probe class that is written
PROBE_AGE_EDGES = [0, 100, 300, 1000, 3000, 10000, 30000, 100000]  # probe entries' ages, in memory commits
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
    if config["encoder"] in ("convnet", "resnet"):
        return omniglot_encoder(config["encoder"], config["rep_dim"], config["dropout_keep"])
    if config["encoder"] == "mlp":
        return MLPEncoder(config["rep_dim"], config["dropout_keep"])
    raise SystemExit(f"--encoder must be 'convnet', 'resnet' or 'mlp', got {config['encoder']!r}")


# What a resumed run must share with its checkpoint: its weights' shapes, its memory's name and config, its writer
# tag (the server's address may change: a server restarted elsewhere keeps the memory).
RESUME_SETTINGS = ("encoder", "input", "rep_dim", "dropout_keep", "memory_name", "writer", "memory_size", "choose_k",
                   "age_noise")  # fmt: skip


def check_trained_with(config: dict, trained: dict, keys, source) -> None:
    """SystemExit naming each of ``keys`` whose value in ``trained`` (a checkpoint's settings) is not ``config``'s."""
    differ = [
        f"--{key.replace('_', '-')} {trained[key]} (given {config[key]})" for key in keys if trained[key] != config[key]
    ]
    if differ:
        raise SystemExit(f"{source} was trained with " + ", ".join(differ) + "; pass the same settings")


def initialise_from(encoder: nn.Module, module: MemoryModule, path: str, config: dict) -> None:
    """The encoder (convnet or resnet) and its query projection from an episodic checkpoint of trainers/omniglot.py.
    Its encoder saw every training-split class in episodes, so from here on the encoder is pre-trained, not learned
    in this run."""
    state = flags.load_checkpoint(path, "omniglot", OMNIGLOT_CHECKPOINT)
    saved = state["config"]
    check_trained_with(config, EXPERIMENT_SETTINGS | saved, ("encoder", "input", "rep_dim"), f"--init-from {path}")
    encoder.load_state_dict(state["encoder"])
    module.load_state_dict(state["memory_module"])
    print(
        f"encoder and query projection pre-trained: from {path} (omniglot.py, {state['episode_batch']} episode "
        f"batches, {saved.get('split', 'reference')} split, {saved.get('encoder', 'convnet')}, "
        f"input {saved.get('input', 'ink')}, "
        f"init {saved.get('init', 'he')}, seed {saved.get('seed')})"
    )


def probe_block(pool_size: int, config: dict) -> range:
    """This trainer's probe classes, as indices into the evaluation split."""
    size = config["probe_classes"]
    block = range(config["probe_group"] * size, (config["probe_group"] + 1) * size)
    if block.stop > pool_size:
        raise SystemExit(
            f"--probe-group {config['probe_group']} with --probe-classes {config['probe_classes']} needs evaluation-"
            f"split classes up to {block.stop}; there are {pool_size}"
        )
    return block


def probe_wave_at(step: int, block: range, config: dict) -> range:
    """The probe classes this trainer writes at ``step`` (empty when none)."""
    since = step - config["probe_start"]
    if since < 0 or since % config["probe_every"]:
        return range(0)
    first = block.start + since // config["probe_every"] * config["probe_wave"]
    return range(min(first, block.stop), min(first + config["probe_wave"], block.stop))


@torch.no_grad()
def write_probes(encoder, module, pool, label_offset, wave: range) -> np.ndarray:
    """One drawing of each class in ``wave``, written once, with no dropout and no gradient. Returns the slots."""
    encoder.eval()
    images = torch.from_numpy(pool[wave.start : wave.stop, PROBE_WRITTEN_DRAWER])
    labels = torch.arange(wave.start, wave.stop) + label_offset
    result = module.memory.query(module.project(encoder(images)), labels, update=True, use_recent=False, fields=())
    encoder.train()
    return result.written_slots.numpy()


@torch.no_grad()
def ask_probes(encoder, module, pool, label_offset, written_at: dict, step: int) -> dict:
    """Every probe class the memory holds, whoever wrote it, asked with its held-out drawings (no update): how
    many of them it answers, and the age of its entry in memory commits (and in this trainer's steps, -1 for a
    probe another trainer wrote)."""
    held, slots, ages = [], [], []
    for index in range(len(pool)):
        found = module.memory.find_label(label_offset + index)
        if len(found.slots):
            newest = int(found.ages.argmin())
            held.append(index)
            slots.append(int(found.slots[newest]))
            ages.append(int(found.ages[newest]))
    own_lost = len(set(written_at) - set(held))
    if not held:
        return {"labels": [], "age_commits": [], "age_steps": [], "writers": [], "correct": [], "lost": own_lost}
    encoder.eval()
    images = torch.from_numpy(pool[held, WRITTEN_DRAWERS:].reshape(-1, *pool.shape[2:]))
    predictions = module.memory.query(module.project(encoder(images)), fields=()).predictions.numpy()
    encoder.train()
    asked = pool.shape[1] - WRITTEN_DRAWERS
    correct = (predictions.reshape(len(held), asked) == np.array(held)[:, None] + label_offset).sum(axis=1)
    return {
        "labels": [label_offset + index for index in held],
        "age_commits": ages,
        "age_steps": [step - written_at[index] if index in written_at else -1 for index in held],
        "writers": module.memory.read_slots(slots).writers,
        "correct": correct.tolist(),
        "lost": own_lost,  # this trainer's probes no longer in the memory (overwritten)
        "drawings": asked,
    }


def probe_accuracy(evaluations: list[dict], keep, edges: list[int] = PROBE_AGE_EDGES, age: str = "age_commits"):
    """Accuracy on probe entries by age bucket, over the given evaluations' probes for which ``keep(writer)``
    holds. A probe asked at several evaluations within one bucket counts once (the mean of its answers), so the
    95% interval, 1.96 standard errors over probes, is over independent entries. Returns one dict per bucket."""
    per_probe: list[dict[int, list[float]]] = [{} for _ in edges[:-1]]
    for probes in evaluations:
        rows = zip(probes["labels"], probes["writers"], probes[age], probes["correct"], strict=True)
        for label, writer, entry_age, right in rows:
            if keep(writer) and entry_age >= 0:
                cell = per_probe[bucket(np.array([entry_age]), edges)[0]]
                cell.setdefault(label, []).append((right / probes["drawings"], entry_age))
    cells = []
    for low, high, probes in zip(edges[:-1], edges[1:], per_probe, strict=True):
        means = np.array([np.mean([right for right, _ in v]) for v in probes.values()])
        n = len(means)
        sd = float(means.std(ddof=1)) if n > 1 else float("nan")
        cells.append(
            {
                "ages": [low, high],
                "n": n,
                "accuracy": float(means.mean()) if n else float("nan"),
                "mean_age": float(np.mean([a for v in probes.values() for _, a in v])) if n else float("nan"),
                "ci95": 1.96 * sd / np.sqrt(n) if n > 1 else float("nan"),
            }
        )
    return cells


def writer_entries(memory, writers: set[str], chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys [n, D] and values [n] of every filled slot whose last write or merge carried one of ``writers``,
    read in chunks of slots (each chunk one committed state)."""
    size = memory.config.memory_size
    keys, values = [], []
    for start in range(0, size, chunk):
        read = memory.read_slots(range(start, min(start + chunk, size)))
        theirs = torch.tensor([w in writers for w in read.writers]) & (read.values != EMPTY)
        keys.append(read.keys[theirs])
        values.append(read.values[theirs])
    return torch.cat(keys), torch.cat(values)


def cross_model_loss(
    query: torch.Tensor,
    labels: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    negative_keys: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """The memory's loss with its positive taken from ``keys`` (another model's entries) alone: the nearest of them
    of the row's class, against the nearer of the memory's own negative (``negative_keys``, the nearest entry of
    another class, whoever wrote it) and the nearest of ``keys`` of another class, margin ``alpha``. So a query
    learns to find the other model's entry of its class before any entry of another class, its own model's too.
    Rows with no entry of their class in ``keys`` add nothing."""
    similarities = query @ keys.T
    same = labels[:, None] == values[None, :]
    rows = same.any(dim=1)
    if not rows.any():
        return query.sum() * 0.0
    positive = similarities.masked_fill(~same, -torch.inf).amax(dim=1)
    negative = torch.maximum(similarities.masked_fill(same, -torch.inf).amax(dim=1), (query * negative_keys).sum(dim=1))
    return (torch.relu(negative - positive + alpha) - alpha)[rows].mean()


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
    often this trainer showed the class (0: only others wrote it), per writer of the newest entry (by_writer) and
    per writer of the entry that answered, the nearest (by_answering_writer)."""
    encoder.eval()
    asked = rng.choice(len(classes), size=min(config["eval_classes"], len(classes)), replace=False)
    drawers = rng.integers(WRITTEN_DRAWERS, classes.shape[1], size=len(asked))
    images = torch.from_numpy(classes[asked, drawers])
    result = module.memory.query(module.project(encoder(images)), fields=("neighbors",))
    encoder.train()
    correct = result.predictions.numpy() == asked
    answering = module.memory.read_slots(result.neighbor_slots[:, 0].clamp(min=0)).writers
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
        "by_answering_writer": {
            w: accuracy(np.array([x == w for x in answering]))
            for w in sorted(set(answering[i] for i in np.flatnonzero(held)))
        },
    }


def probe_writers(metrics: list[dict]) -> list[str]:
    return sorted({w for m in metrics for w in m["evaluation"].get("probes", {}).get("writers", [])})


def plot(metrics: list[dict], path: pathlib.Path, writer_tag: str) -> None:
    """Left: accuracy against the age of the memory entry that holds the class, for probe classes by whose entry
    it is (without probes: the stream's classes, at the last evaluation). Right: accuracy against this trainer's
    steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_age, by_step) = plt.subplots(1, 2, figsize=(13, 5))
    probes = [m["evaluation"]["probes"] for m in metrics if "probes" in m["evaluation"]]
    if probes:
        edges = PROBE_AGE_EDGES
        series = {
            (f"own entries ({writer_tag})" if w == writer_tag else f"entries written by {w}"): probe_accuracy(
                probes, lambda writer, w=w: writer == w
            )
            for w in probe_writers(metrics)
        }
        what = "probe classes (one entry each)"
    else:
        edges = AGE_EDGES
        last = metrics[-1]["evaluation"]["by_age"]
        series = {f"own entries ({writer_tag})": last["own"], "entries written by other trainers": last["other"]}
        what = "stream classes (newest entry), last evaluation"
    centres = np.sqrt(np.maximum(edges[:-1], 1) * np.array(edges[1:]))  # where a cell without its mean age goes
    for offset, (name, cells) in zip(np.linspace(0.93, 1.07, len(series)), series.items(), strict=True):
        shown = [i for i, c in enumerate(cells) if c["n"]]
        x = [cells[i].get("mean_age", centres[i]) * offset for i in shown]
        by_age.errorbar(
            x,
            [cells[i]["accuracy"] for i in shown],
            yerr=[np.nan_to_num(cells[i]["ci95"]) for i in shown],
            marker="o",
            capsize=3,
            label=name,
        )
        for at, i in zip(x, shown, strict=True):
            by_age.annotate(f"{cells[i]['n']}", (at, cells[i]["accuracy"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")  # fmt: skip
    by_age.set_xscale("log")
    by_age.set(
        xlabel="age of the entry (memory commits since it was written)",
        ylabel="accuracy on held-out drawings",
        ylim=(0, 1.02),
        title=f"{what}; n = entries, 95% intervals",
    )
    by_age.grid(alpha=0.3)
    if series:  # before the first probe is written there is nothing to name
        by_age.legend(loc="lower left")

    steps = [m["step"] for m in metrics]
    by_step.plot(steps, [m["evaluation"]["accuracy"]["accuracy"] for m in metrics], label="stream classes")
    for w in probe_writers(metrics):
        cells = [
            probe_accuracy([m["evaluation"]["probes"]], lambda writer, w=w: writer == w, [0, 10**9])[0]
            if "probes" in m["evaluation"]
            else {"n": 0}
            for m in metrics
        ]
        name = f"probe classes, own entries ({writer_tag})" if w == writer_tag else f"probe classes, {w}'s entries"
        by_step.plot([s for s, c in zip(steps, cells, strict=True) if c["n"]], [c["accuracy"] for c in cells if c["n"]],
                     marker=".", label=name)  # fmt: skip
    by_step.set(xlabel=f"steps of {writer_tag}", ylabel="accuracy on held-out drawings", ylim=(0, 1.02),
                title=f"model {writer_tag!r}, after step {metrics[-1]['step']:,}")  # fmt: skip
    by_step.grid(alpha=0.3)
    by_step.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def first_step_at(metrics: list[dict], accuracy_of, target: float) -> int | None:
    """The first evaluated step whose accuracy reaches ``target`` (None: never in this run)."""
    return next((m["step"] for m in metrics if accuracy_of(m) >= target), None)


def format_cells(cells: list[dict]) -> str:
    return "  ".join(
        f"[{c['ages'][0]:,}, {c['ages'][1]:,}): {c['accuracy']:.3f} ± {c['ci95']:.3f} (n {c['n']})"
        for c in cells
        if c["n"]
    )


def summarize(out_dirs: list[str], targets: list[float], plot_path: pathlib.Path) -> None:
    """Per finished run: its model, the last evaluation's accuracy on stream and probe classes by whose entry,
    probe accuracy by entry age over every evaluation, and the first step at each target accuracy. Then one
    figure, a panel per run, of accuracy against entry age by writer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, len(out_dirs), figsize=(5.5 * len(out_dirs), 4.6), squeeze=False)
    for out_dir, axes in zip(out_dirs, panels[0], strict=True):
        run = pathlib.Path(out_dir)
        config = torch.load(run / "checkpoint.pt", weights_only=False)["config"]
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        last, tag = metrics[-1], config["writer"]
        origin = "pre-trained" if config.get("init_from") else "from scratch"
        print(
            f"\n{run}: {config['encoder']} {origin}"
            + (f" ({config['init_from']})" if config.get("init_from") else "")
            + f", writer {tag!r}, "
            f"{last['step']:,} steps, memory commit {last['commit_sequence']:,}, "
            f"{last['filled_slots']:,} of {config['memory_size']:,} slots filled"
        )
        stream = last["evaluation"]["accuracy"]
        answered = last["evaluation"].get("by_answering_writer", {})  # absent in runs from before it was measured
        print(
            f"  stream classes: {stream['accuracy']:.3f} ± {stream['ci95']:.3f} (n {stream['n']})"
            + "".join(f"; answered by {w}'s entries: {c['accuracy']:.3f} (n {c['n']})" for w, c in answered.items())
        )
        probes = [m["evaluation"]["probes"] for m in metrics if "probes" in m["evaluation"]]
        for writer in probe_writers(metrics):
            whose = "own entries" if writer == tag else f"entries written by {writer}"
            cell = probe_accuracy(probes[-1:], lambda w, writer=writer: w == writer, [0, 10**9])[0]
            print(
                f"  probe classes, {whose}, last evaluation: {cell['accuracy']:.3f} ± {cell['ci95']:.3f} "
                f"(n {cell['n']} classes; own entries lost: {probes[-1]['lost']})"
            )
            latest = probe_accuracy(probes[-1:], lambda w, writer=writer: w == writer)
            print(f"    by entry age in commits, last evaluation (one encoder, one memory): {format_cells(latest)}")
            cells = probe_accuracy(probes, lambda w, writer=writer: w == writer)
            print(f"    by entry age in commits, over every evaluation: {format_cells(cells)}")
            if writer == tag:
                steps = probe_accuracy(probes, lambda w, writer=writer: w == writer, age="age_steps")
                print(f"    by entry age in own steps: {format_cells(steps)}")
            shown = [c for c in cells if c["n"]]
            axes.errorbar(
                [c["mean_age"] for c in shown],
                [c["accuracy"] for c in shown],
                yerr=[np.nan_to_num(c["ci95"]) for c in shown],
                marker="o",
                capsize=3,
                label=whose,
            )
        reached = [first_step_at(metrics, lambda m: m["evaluation"]["accuracy"]["accuracy"], t) for t in targets]
        print(
            "  first step at stream accuracy "
            + ", ".join(f"{t}: {s or 'not reached'}" for t, s in zip(targets, reached, strict=True))
        )
        axes.set_xscale("log")
        axes.set(
            xlabel="entry age (memory commits)",
            ylabel="accuracy on held-out drawings",
            ylim=(0, 1.02),
            title=f"{run.name}: {tag} ({config['encoder']}, {origin})",
        )
        axes.grid(alpha=0.3)
        axes.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    figure.savefig(plot_path, dpi=110)
    plt.close(figure)
    print(f"\nplot: {plot_path}")


def main(argv: list[str] | None = None) -> None:
    config = configure(argv)
    if config["report"]:
        targets = [float(t) for t in config["report_targets"].split(",")]
        summarize(config["report"].split(","), targets, pathlib.Path(config["report_plot"]))
        return
    torch.manual_seed(config["seed"])
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    out = pathlib.Path(config["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    if config["resume"] and (out / "checkpoint.pt").exists() and config["memory"] == "local" and not config["data_dir"]:
        raise SystemExit(
            "--resume: an embedded memory without --data-dir ended with the run that trained it, and this run would "
            "go on with an empty one; keep the memory with --data-dir, or share a server's with --memory grpc://..."
        )
    split = omniglot_data.load_split(pathlib.Path(config["data"]), "reference", config["input"])
    classes = split.train[: config["classes"] or None]
    # Probe classes come from the evaluation split, with labels after every training class's: global and disjoint.
    probe_pool, probe_offset = split.test, len(split.train)
    block = probe_block(len(probe_pool), config) if config["probe_classes"] else range(0)
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
    probes_written_at: dict[int, int] = {}  # this trainer's probe classes (evaluation-split index) -> step written
    first, metrics = 1, []
    aligned_writers = set(filter(None, config["align_to"].split(",")))
    aligned = None  # (keys, values) of their entries, read every align_refresh steps
    checkpoint_path = out / "checkpoint.pt"
    if config["resume"] and checkpoint_path.exists():
        state = flags.load_checkpoint(checkpoint_path, "lifelong", ("encoder", "memory_module", "step", "seen"))
        check_trained_with(config, config | state["config"], RESUME_SETTINGS, checkpoint_path)
        encoder.load_state_dict(state["encoder"])
        module.load_state_dict(state["memory_module"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        seen, first, metrics = state["seen"], state["step"] + 1, state["metrics"]
        probes_written_at = state["probes_written_at"]
        aligned = state.get("aligned") if aligned_writers else None  # a resume without --align-to drops them
        print(f"resumed after step {state['step']}; the memory goes on from where it is (it is never reset)")
    elif config["init_from"]:
        initialise_from(encoder, module, config["init_from"], config)
    info = module.memory.info()
    print(
        f"memory {info.name!r}: {info.stats['filled_slots']} of {info.config.memory_size} slots filled, commit "
        f"{info.stats['commit_sequence']}; {len(classes)} classes, encoder {config['encoder']}, writer "
        f"{config['writer']!r}"
    )
    if block:
        print(f"probe classes: evaluation-split classes {block.start}-{block.stop - 1}, labels from {probe_offset}")
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    started, losses = time.time(), []
    for step in range(first, config["steps"] + 1):
        labels = rng.choice(len(classes), size=config["batch"], p=frequencies)
        drawers = rng.integers(0, WRITTEN_DRAWERS, size=config["batch"])
        np.add.at(seen, labels, 1)
        images = torch.from_numpy(classes[labels, drawers])
        if aligned_writers and (step - 1) % config["align_refresh"] == 0:
            aligned = writer_entries(module.memory, aligned_writers)
        # Read-only, the loss's positive keys can only be other trainers' entries: the query projection is pulled
        # into their key space before this model writes keys of its own that its later queries would find first.
        output = module(encoder(images), torch.from_numpy(labels), update=step > config["read_only_steps"])
        loss = output.loss
        if aligned is not None:
            # The memory's loss only ever meets this model's own keys (they are its queries' nearest), so its keys
            # of a class drift apart from another model's. With its positive from the other model's entries, a
            # query learns to find their entry of its class before any other class's: the two key spaces meet.
            loss = loss + config["align_weight"] * cross_model_loss(
                output.query, torch.from_numpy(labels), *aligned, output.result.negative_keys, module.alpha
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(parameters, config["clip_norm"])
        optimizer.step()
        losses.append(loss.item())
        wave = probe_wave_at(step, block, config) if block else range(0)
        if wave:
            write_probes(encoder, module, probe_pool, probe_offset, wave)
            probes_written_at.update(dict.fromkeys(wave, step))

        if step % config["eval_every"] == 0 or step == config["steps"]:
            evaluation = evaluate(encoder, module, classes, seen, config, np.random.default_rng([config["seed"], step]))
            if config["probe_classes"]:
                evaluation["probes"] = ask_probes(encoder, module, probe_pool, probe_offset, probes_written_at, step)
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
                + f"  filled {stats['filled_slots']}  answered by "
                + " ".join(f"{w} {c['accuracy']:.2f}/{c['n']}" for w, c in evaluation["by_answering_writer"].items())
            )
            if config["probe_classes"]:
                probes = evaluation["probes"]
                by_writer = {
                    w: probe_accuracy([probes], lambda writer, w=w: writer == w, [0, 10**9])[0]
                    for w in sorted(set(probes["writers"]))
                }
                print(
                    "        probe classes by whose entry: "
                    + "  ".join(f"{w} {c['accuracy']:.3f}/{c['n']}" for w, c in by_writer.items())
                    + f"  own lost {probes['lost']}"
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
                "probes_written_at": probes_written_at,
                "aligned": aligned,  # the other trainers' entries as last read: a resumed run goes on with them
                "step": step,
                "metrics": metrics,
                "config": config,
            }
            torch.save(state, checkpoint_path.with_suffix(".tmp"))
            os.replace(checkpoint_path.with_suffix(".tmp"), checkpoint_path)
    store.close()


if __name__ == "__main__":
    flags.run(main)
