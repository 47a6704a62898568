"""Cross-model one-shot after training: a class one model wrote once, asked by another model.

    .venv/bin/python benchmarks/cross_model_one_shot.py --data-dir runs/x13/aligned/server-data --memory shared \
        runs/x13/aligned/convnet-a runs/x13/aligned/convnet-b --out benchmarks/results/cross-model-aligned.json

The finished trainers/lifelong.py runs are frozen (their checkpoints: encoder, query projection, input view).
The classes are evaluation-split classes that no run wrote as a probe and no stream or episodic checkpoint
showed: from the first one after the runs' probe blocks. For every writer model W and asking model Q:

- **shared memory**: W writes drawing 0 of each class once, with no gradient, into a copy of the memory as the
  runs left it (every stream and probe entry of every model), and Q asks about drawings 1-19 without updating:
  the lifelong setting, every class the memory holds competing;
- **fresh memory**: the same into an empty memory that holds only those entries (an N-way 1-shot test);
- **5-way episodes**: W writes one drawing each of 5 random classes into a cleared memory, Q asks another
  drawing of each, over --episodes episodes: the paper's 5-way 1-shot, across models.

W = Q is each model's same-model one-shot, the number cross-model one-shot is compared with. Accuracy per class
(mean of its answers), 95% intervals as 1.96 standard errors over classes (episodes for the 5-way rows).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import tempfile

import numpy as np
import torch

from lifelong_memory.client import MemoryModule, connect
from lifelong_memory.trainers import lifelong, omniglot_data

WRITTEN_DRAWER = 0


class Model:
    """A finished lifelong run, frozen: its config and writer tag, its encoder and its query projection."""

    def __init__(self, run: pathlib.Path):
        state = torch.load(run / "checkpoint.pt", weights_only=False)
        self.config = state["config"]
        self.name = self.config["writer"]
        self.encoder = lifelong.build_encoder(self.config)
        self.encoder.load_state_dict(state["encoder"])
        self.encoder.eval()
        self.projection = MemoryModule(connect("local"), self.config["rep_dim"], name="projection")
        self.projection.load_state_dict(state["memory_module"])
        self.queries = None  # [class, drawer, D], once ``encode`` has run

    @torch.no_grad()
    def encode(self, classes: np.ndarray) -> None:
        """The query for every drawing of the given evaluation-split classes, in this model's input view."""
        config = self.config
        split = omniglot_data.load_split(pathlib.Path(config["data"]), "reference", config["input"], False)
        images = torch.from_numpy(split.test[classes].reshape(-1, *split.test.shape[2:]))
        queries = torch.cat([self.projection.project(self.encoder(chunk)) for chunk in images.split(512)])
        self.queries = queries.reshape(len(classes), split.test.shape[1], -1)


def interval(per_unit: np.ndarray) -> dict:
    n = len(per_unit)
    return {"accuracy": float(per_unit.mean()), "ci95": float(1.96 * per_unit.std(ddof=1) / np.sqrt(n)), "n": n}


def write(memory, writer: Model, rows: np.ndarray, labels: np.ndarray) -> None:
    """``writer``'s query of drawing 0 of each class (rows of its queries), written once with the class label."""
    memory.query(writer.queries[rows, WRITTEN_DRAWER], torch.from_numpy(labels), update=True, use_recent=False,
                 fields=())  # fmt: skip


def ask(memory, asker: Model, rows: np.ndarray, labels: np.ndarray, drawers: np.ndarray) -> np.ndarray:
    """``asker``'s queries of the given drawers of each class, without updating: the share answered right, per
    class."""
    asked = asker.queries[rows][:, drawers].reshape(-1, asker.queries.shape[2])
    predictions = torch.cat([memory.query(chunk, fields=()).predictions for chunk in asked.split(1024)])
    return (predictions.numpy().reshape(len(rows), len(drawers)) == labels[:, None]).mean(axis=1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="the shared memory's data directory (a stopped server's)")
    parser.add_argument("--memory", required=True, help="the shared memory's name")
    parser.add_argument("--episodes", type=int, default=500, help="5-way 1-shot episodes per writer and asker")
    parser.add_argument("--classes", type=int, default=0, help="how many classes (0: every one left)")
    parser.add_argument("--out", help="write the results here as JSON")
    parser.add_argument("--plot", help="draw them here as a PNG: accuracy per writer and asker, per setting")
    parser.add_argument("runs", nargs="+", help="out_dirs of lifelong runs that trained against that memory")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    models = [Model(pathlib.Path(run)) for run in args.runs]
    first = max((m.config["probe_group"] + 1) * m.config["probe_classes"] for m in models)  # past every probe block
    split = omniglot_data.load_split(pathlib.Path(models[0].config["data"]), progress=False)
    classes = np.arange(first, len(split.test))[: args.classes or None]
    if not len(classes):
        raise SystemExit(f"the runs' probe blocks use every evaluation-split class up to {first}: none is left")
    for model in models:
        model.encode(classes)
    rows, labels = np.arange(len(classes)), classes + len(split.train)  # labels as trainers/lifelong.py's probes
    asked_drawers = np.arange(1, models[0].queries.shape[1])
    rng = np.random.default_rng(0)
    episodes = [(rng.choice(rows, 5, replace=False), rng.choice(asked_drawers, 5)) for _ in range(args.episodes)]
    results = {"runs": args.runs, "classes": [int(classes[0]), int(classes[-1])], "episodes": args.episodes}
    results |= {"shared": {}, "fresh": {}, "five_way": {}}
    shown = f"{len(classes)} evaluation-split classes ({classes[0]}-{classes[-1]})"
    print(f"{shown}, each written once and asked {len(asked_drawers)} times")
    for writer in models:
        pairs = {asker.name: f"{writer.name}->{asker.name}" for asker in models}
        with tempfile.TemporaryDirectory() as scratch:
            copy = pathlib.Path(scratch) / "memory"
            shutil.copytree(args.data_dir, copy)
            with connect("local", data_dir=copy) as store:
                shared = store.memory(args.memory, writer=writer.name)
                info = shared.info()
                held = info.stats["filled_slots"]
                if len(classes) > info.config.memory_size:
                    raise SystemExit(f"{len(classes)} classes do not fit a memory of {info.config.memory_size} slots")
                write(shared, writer, rows, labels)
                for asker in models:
                    results["shared"][pairs[asker.name]] = interval(ask(shared, asker, rows, labels, asked_drawers))
        with connect("local") as store:
            size, dim = len(classes), writer.queries.shape[2]
            fresh = store.create_memory("fresh", key_dim=dim, memory_size=size, choose_k=min(256, size))
            write(fresh, writer, rows, labels)
            for asker in models:
                results["fresh"][pairs[asker.name]] = interval(ask(fresh, asker, rows, labels, asked_drawers))
            episodic = store.create_memory("episodes", key_dim=dim, memory_size=64, choose_k=5)
            correct = {asker.name: [] for asker in models}
            for chosen, drawers in episodes:
                episodic.clear()
                write(episodic, writer, chosen, labels[chosen])
                for asker in models:
                    asked = asker.queries[chosen, drawers]
                    answers = episodic.query(asked, fields=()).predictions.numpy()
                    correct[asker.name].append(np.mean(answers == labels[chosen]))
            for asker in models:
                results["five_way"][pairs[asker.name]] = interval(np.array(correct[asker.name]))
        print(f"\nentries written by {writer.name} (into the shared memory's {held:,} entries; alone; 5-way episodes)")
        for asker in models:
            cells = "  ".join(
                f"{setting} {results[setting][pairs[asker.name]]['accuracy']:.3f} "
                f"± {results[setting][pairs[asker.name]]['ci95']:.3f}"
                for setting in ("shared", "fresh", "five_way")
            )
            print(f"  asked by {asker.name:<12} {'(same model)' if asker is writer else '(cross-model)':<14} {cells}")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    if args.plot:
        plot(results, [m.name for m in models], pathlib.Path(args.plot))


def plot(results: dict, names: list[str], path: pathlib.Path) -> None:
    """One panel per setting: a bar per writer and asker, cross-model bars hatched, 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ways = results["classes"][1] - results["classes"][0] + 1
    settings = {"shared": "the shared memory", "fresh": f"a fresh memory ({ways}-way)", "five_way": "5-way episodes"}
    pairs = [(writer, asker) for writer in names for asker in names]
    figure, panels = plt.subplots(1, len(settings), figsize=(4.5 * len(settings), 4.2), sharey=True)
    for axes, (setting, title) in zip(panels, settings.items(), strict=True):
        cells = [results[setting][f"{writer}->{asker}"] for writer, asker in pairs]
        bars = axes.bar(range(len(pairs)), [c["accuracy"] for c in cells], yerr=[c["ci95"] for c in cells],
                        capsize=3, color=[f"C{names.index(asker)}" for _, asker in pairs])  # fmt: skip
        for bar, (writer, asker) in zip(bars, pairs, strict=True):
            bar.set_hatch("" if writer == asker else "//")
        axes.set_xticks(range(len(pairs)), [f"{w}\n→ {a}" for w, a in pairs], fontsize=7)
        axes.set(title=title, ylim=(0, 1))
        axes.grid(axis="y", alpha=0.3)
    panels[0].set_ylabel("accuracy (written by → asked by; hatched: cross-model)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
