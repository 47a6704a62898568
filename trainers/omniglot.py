"""Omniglot one-shot learning with the memory module (Kaiser et al. 2017, section 4.1).

A convolutional encoder (the authors' released one) feeds MemoryModule; the
memory loss is the only loss. Training runs in batches of 16 episodes that
share one cleared memory; every `validate_every` episode batches the n-shot
accuracy is measured on test episodes, each with its own cleared memory.

    python -m lifelong_memory.trainers.omniglot --data ../shared/data/omniglot
    python -m lifelong_memory.trainers.omniglot --memory grpc://127.0.0.1:50051   # same numbers
    python -m lifelong_memory.trainers.omniglot --init authors --input raw      # the authors' encoder set-up
    python -m lifelong_memory.trainers.omniglot --init authors --input raw --adam tensorflow   # and their Adam
    python -m lifelong_memory.trainers.omniglot --evaluate runs/omniglot/checkpoint.pt

Every option below is a plain value with its default; each has a --flag.
Outputs in out_dir: checkpoint.pt, metrics.jsonl, accuracy.png, evaluation.json.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time

import numpy as np
import torch
from torch import nn

from lifelong_memory.client import MemoryModule, connect
from lifelong_memory.trainers import flags, omniglot_data
from lifelong_memory.trainers.random_states import restore_torch_random_states, torch_random_states

# -------------------------------------------------------------------- config
data = os.environ.get("OMNIGLOT_DIR", "../shared/data/omniglot")  # folder with images_*.zip and all_runs.zip; read only
download = False  # fetch missing archives from the upstream repository
split = "reference"  # "reference" (authors' code) or "paper" (Table 1, 1,200 training characters)
memory = "local"  # "local" (embedded) or "grpc://host:port"
memory_name = "omniglot"
rep_dim = 128  # 256 replicates the paper's numbers, say the authors
encoder = "convnet"  # "convnet" (the authors') or "resnet" (a small ResNet: another model, as for trainers/lifelong.py)
init = "he"  # encoder weights: "he" (He-normal) or "authors" (truncated normal, std 0.1, as their code)
input = "ink"  # "ink" (in [0, 1], ink = 1 on 0) or "raw" (0-255 pixels, white background 255, as their code)
episode_width = 5
episode_length = 30
batch_episodes = 16
memory_size = 8192
backend = "torch"  # the memory's search: "torch" (exact), "faiss", "lsh" or "faiss-ivf" (docs/approximate-search.md)
ivf_lists = 0  # faiss-ivf: lists (0: the memory's default); it trains once 64 x lists slots are filled
ivf_probes = 0  # faiss-ivf: lists a query visits (0: the memory's default)
retrain_index_every = 0  # faiss-ivf: retrain the quantizer on the keys of every n-th episode batch (0: never)
choose_k = 256
alpha = 0.1
age_noise = 8.0
dropout_keep = 0.3
learning_rate = 1e-4
adam_epsilon = 1e-4
adam = "torch"  # where Adam's epsilon goes: "torch", or "tensorflow" as the authors' TF 1 AdamOptimizer
clip_norm = 5.0
episode_batches = 4000
validate_every = 20
validation_episodes = 50
checkpoint_every = 100
evaluation_episodes = 500  # for the final N-way evaluation
out_dir = "runs/omniglot"
resume = False
evaluate = ""  # a checkpoint: skip training, run the final evaluation
threads = 0  # torch intra-op threads; 0 = torch's default
device = "cpu"  # where the encoder trains: "cpu" or "cuda" (the memory's own device is the server's)
seed = 0

# The authors' README and our runs of their code on a 2-core CPU (1-shot, 5-way, episode length 30).
AUTHORS_README = {500: 0.836, 4000: 0.960}
AUTHORS_MEASURED = {
    500: (0.54, 0.62),
    1000: (0.86, 0.88),
    1500: (0.940, 0.948),
    2000: (0.93, 0.93),
    2500: (0.956, 0.964),
    4000: (0.956, 0.964),
}
SHOTS = 6  # report 0..5-shot accuracy


def configure(argv: list[str] | None = None) -> dict:
    return flags.configure(globals(), __doc__, argv)


class Encoder(nn.Module):
    """conv3x3(1->64), conv3x3(64->64), maxpool, conv3x3(64->128), conv3x3(128->128), maxpool, linear."""

    def __init__(self, rep_dim: int, dropout_keep: float, init: str = "he"):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(128, 128, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(7 * 7 * 128, rep_dim),
        )
        self.dropout = nn.Dropout(1.0 - dropout_keep)
        # Zero biases, as the reference. He-normal weights pass the signal on at scale through every layer;
        # the authors' truncated normal (std 0.1, redrawn beyond 2 std, as TensorFlow's) starts all
        # embeddings nearly parallel, which is their code's flat start.
        if init not in ("he", "authors"):
            raise ValueError(f"init must be 'he' or 'authors', got {init!r}")
        for layer in self.features:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                if init == "he":
                    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                else:
                    nn.init.trunc_normal_(layer.weight, std=0.1, a=-0.2, b=0.2)
                nn.init.zeros_(layer.bias)
        self.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # channels_last: oneDNN's faster convolution layout on CPU (about 20% per training step here).
        images = images.unsqueeze(1).contiguous(memory_format=torch.channels_last)
        return self.dropout(self.features(images))


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with group norm, added to the input (through a strided 1x1 where the shape changes)."""

    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False),
            nn.GroupNorm(8, channels_out),
            nn.ReLU(),
            nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False),
            nn.GroupNorm(8, channels_out),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=False), nn.GroupNorm(8, channels_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResidualEncoder(nn.Module):
    """A small ResNet, a different model from the authors' convnet: a 3x3 stem of 32 channels, three residual
    blocks of 32, 64 and 128 channels halving the image (28 -> 14 -> 7 -> 4), linear.
    Group norm rather than batch norm: no running statistics, the same function in training and evaluation."""

    def __init__(self, rep_dim: int, dropout_keep: float):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False),
            nn.GroupNorm(8, 32),
            nn.ReLU(),
            ResidualBlock(32, 32, 2),
            ResidualBlock(32, 64, 2),
            ResidualBlock(64, 128, 2),
            nn.Flatten(),  # where a stroke is matters for a character: no global pooling, as the convnet
            nn.Linear(4 * 4 * 128, rep_dim),
        )
        self.dropout = nn.Dropout(1.0 - dropout_keep)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        self.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.unsqueeze(1).contiguous(memory_format=torch.channels_last)
        return self.dropout(self.features(images))


def build_encoder(name: str, rep_dim: int, dropout_keep: float, init: str = "he") -> nn.Module:
    if name == "convnet":
        return Encoder(rep_dim, dropout_keep, init)
    if name == "resnet":
        if init != "he":
            raise ValueError(f"--init {init} is the convnet's; the resnet starts He-normal")
        return ResidualEncoder(rep_dim, dropout_keep)
    raise ValueError(f"encoder must be 'convnet' or 'resnet', got {name!r}")


class TensorFlowAdam(torch.optim.Adam):
    """Adam as TensorFlow 1's AdamOptimizer (the authors' optimiser) computes it: epsilon is added to sqrt(v)
    before the bias correction, where torch's Adam adds it after. That is torch's update with epsilon
    eps / sqrt(1 - beta2^t): 32 times larger at step 1, 3.2 times at step 100, 1.05 times at step 3,000,
    so TensorFlow takes smaller early steps along weights with small gradients."""

    def __init__(self, params, lr: float, eps: float):
        super().__init__(params, lr=lr, eps=eps)
        for group in self.param_groups:
            group["tensorflow_eps"] = eps

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            state = self.state.get(group["params"][0], {})
            step = int(state.get("step", 0)) + 1  # the step about to be taken; TF counts it in beta2_power
            group["eps"] = group["tensorflow_eps"] / math.sqrt(1.0 - group["betas"][1] ** step)
        return super().step(closure)


def make_optimizer(parameters, kind: str, lr: float, eps: float) -> torch.optim.Adam:
    """Adam with torch's epsilon placement (``kind`` "torch") or TensorFlow 1's ("tensorflow")."""
    if kind == "torch":
        return torch.optim.Adam(parameters, lr=lr, eps=eps)
    if kind == "tensorflow":
        return TensorFlowAdam(parameters, lr=lr, eps=eps)
    raise ValueError(f"adam must be 'torch' or 'tensorflow', got {kind!r}")


def shot_counts(labels: np.ndarray) -> np.ndarray:
    """For labels [length, batch]: how many times each row's label was shown before."""
    counts = np.zeros_like(labels)
    seen: dict[int, int] = {}
    for t, b in np.ndindex(labels.shape):
        counts[t, b] = seen.get(labels[t, b], 0)
        seen[labels[t, b]] = counts[t, b] + 1
    return counts


def on_device(encoder: nn.Module, array: np.ndarray) -> torch.Tensor:
    """A numpy batch as a tensor where the encoder lives."""
    return torch.from_numpy(array).to(next(encoder.parameters()).device)


def train_step(encoder, module, optimizer, images, labels, clip):
    """One gradient step on one episode step's batch (the memory updated with its labels).
    Returns the memory's output and the global gradient norm before clipping."""
    out = module(encoder(on_device(encoder, images)), torch.from_numpy(labels))
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    norm = nn.utils.clip_grad_norm_([*encoder.parameters(), *module.parameters()], clip)
    optimizer.step()
    return out, float(norm)


def train_episode_batch(encoder, module, optimizer, images, labels, clip) -> float:
    """One batch of episodes on a cleared memory: a gradient step per episode step."""
    module.memory.clear()
    encoder.train()
    losses = [
        train_step(encoder, module, optimizer, images[t], labels[t], clip)[0].loss.item() for t in range(len(images))
    ]
    return float(np.mean(losses))


@torch.no_grad()
def evaluate_episodes(encoder, module, eval_memory, classes, width, length, episodes, rng) -> np.ndarray:
    """Per-episode n-shot accuracy [episodes, SHOTS] on test episodes, each on a cleared memory.

    As the reference evaluation: no dropout, no recent slot, the memory updated
    with each step's labels (that is how it learns the episode's classes).
    """
    encoder.eval()
    accuracy = np.full((episodes, SHOTS), np.nan)
    for e in range(episodes):
        images, labels = omniglot_data.sample_episodes(classes, 1, width, length, rng)
        queries = module.project(encoder(on_device(encoder, images[:, 0])))
        shots = shot_counts(labels)[:, 0]
        eval_memory.clear()
        correct = np.zeros(len(labels), dtype=bool)
        for t in range(len(labels)):
            r = eval_memory.query(
                queries[t : t + 1], torch.from_numpy(labels[t]), update=True, use_recent=False, fields=()
            )
            correct[t] = int(r.predictions[0]) == labels[t, 0]
        for n in range(SHOTS):
            if (shots == n).any():
                accuracy[e, n] = correct[shots == n].mean()
    return accuracy


def mean_and_interval(per_episode: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over episodes and the half-width of its 95% confidence interval."""
    n = np.sum(~np.isnan(per_episode), axis=0)
    mean = np.nanmean(per_episode, axis=0)
    return mean, 1.96 * np.nanstd(per_episode, axis=0, ddof=1) / np.sqrt(np.maximum(n, 1))


@torch.no_grad()
def lake_within_alphabet(encoder, module, eval_memory, runs) -> float:
    """Lake et al.'s 20-way one-shot task: store the 20 training drawings, classify the 20 tests."""
    encoder.eval()
    correct = []
    for run in runs:
        eval_memory.clear()
        train_queries = module.project(encoder(on_device(encoder, run.train)))
        eval_memory.query(train_queries, torch.arange(len(run.train)), update=True, use_recent=False, fields=())
        r = eval_memory.query(module.project(encoder(on_device(encoder, run.test))), fields=())
        correct.append(r.predictions.numpy() == run.answers)
    return float(np.mean(correct))


def final_evaluation(encoder, module, eval_memory, split_data, runs, config) -> dict:
    """5-way and 20-way accuracy by shot (0..5) on the test split, and Lake's 20-way task."""
    results = {"episodes": config["evaluation_episodes"], "split": config["split"]}
    rng = np.random.default_rng(config["seed"] + 2)
    for width in (5, 20):
        per_episode = evaluate_episodes(
            encoder, module, eval_memory, split_data.test, width, width * SHOTS, config["evaluation_episodes"], rng
        )
        mean, interval = mean_and_interval(per_episode)
        results[f"{width}-way"] = {"mean": mean.tolist(), "ci95": interval.tolist()}
    results["lake_20way_within_alphabet"] = lake_within_alphabet(encoder, module, eval_memory, runs)
    return results


def print_evaluation(results: dict) -> None:
    print(f"\nTest accuracy by shot ({results['split']} split, {results['episodes']} episodes each, mean ± 95% CI):")
    print("          " + "".join(f"{n}-shot".rjust(16) for n in range(SHOTS)))
    for way in ("5-way", "20-way"):
        cells = [f"{m:.3f} ± {c:.3f}" for m, c in zip(results[way]["mean"], results[way]["ci95"], strict=True)]
        print(f"{way:<10}" + "".join(cell.rjust(16) for cell in cells))
    print(f"Lake et al. 20-way within-alphabet one-shot (20 runs x 20): {results['lake_20way_within_alphabet']:.3f}")


def plot(metrics: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    steps = [m["episode_batch"] for m in metrics]
    for n in (1, 2, 5):
        axes.plot(steps, [m["shots"][n] for m in metrics], label=f"{n}-shot (this run)", lw=1.5 if n == 1 else 0.8)
    axes.scatter(
        list(AUTHORS_README),
        list(AUTHORS_README.values()),
        marker="*",
        s=120,
        c="k",
        zorder=3,
        label="authors' README, 1-shot",
    )
    steps = list(AUTHORS_MEASURED)
    low, high = np.array(list(AUTHORS_MEASURED.values())).T
    axes.errorbar(steps, (low + high) / 2, yerr=(high - low) / 2, fmt="s", c="tab:red", ms=5, capsize=4,
                  label="authors' code run here, 1-shot")  # fmt: skip
    axes.set(xlabel="episode batches", ylabel="accuracy", ylim=(0, 1), title="Omniglot 5-way, episode length 30")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def train(config, store, encoder, module, optimizer, eval_memory, split_data, rng, first, metrics, checkpoint_path):
    """Episode batches from ``first`` on, validating, plotting and checkpointing as configured."""
    out = checkpoint_path.parent
    # The metrics file restarts from the checkpoint's: validations after it, from a stopped run, are redone.
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    started, losses = time.time(), []
    for episode_batch in range(first, config["episode_batches"] + 1):
        images, labels = omniglot_data.sample_episodes(
            split_data.train, config["batch_episodes"], config["episode_width"], config["episode_length"], rng
        )
        step_started = time.time()
        losses.append(train_episode_batch(encoder, module, optimizer, images, labels, config["clip_norm"]))
        step_ms = 1000 * (time.time() - step_started) / config["episode_length"]
        if config["retrain_index_every"] and episode_batch % config["retrain_index_every"] == 0:
            # The lists follow the encoder as it learns: trained on this batch's keys, kept through the clears.
            module.memory.retrain_index()

        if episode_batch % config["validate_every"] == 0 or episode_batch == config["episode_batches"]:
            # Fresh validation episodes each time, as the reference; seeded by the step, so a resumed run
            # validates on the same episodes as an uninterrupted one.
            validation_rng = np.random.default_rng([config["seed"], 1, episode_batch])
            width, length = config["episode_width"], config["episode_length"]
            per_episode = evaluate_episodes(
                encoder,
                module,
                eval_memory,
                split_data.test,
                width,
                length,
                config["validation_episodes"],
                validation_rng,
            )
            shots = np.nanmean(per_episode, axis=0)
            metrics.append(
                {
                    "episode_batch": episode_batch,
                    "train_loss": float(np.mean(losses)),
                    "shots": shots.tolist(),
                    "step_ms": step_ms,
                    "elapsed_s": time.time() - started,
                }
            )
            losses = []
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics[-1]) + "\n")
            print(
                f"episode batch {episode_batch:5d}  loss {metrics[-1]['train_loss']:+.4f}  "
                + "  ".join(f"{n}-shot {a:.3f}" for n, a in enumerate(shots))
                + f"  {step_ms:.0f} ms/step"
            )
            plot(metrics, out / "accuracy.png")
        if episode_batch % config["checkpoint_every"] == 0 or episode_batch == config["episode_batches"]:
            # The training memory too: what it keeps through the clears (a trained quantizer) shapes the next batch.
            memory_file = f"memory-{episode_batch}.lmem"
            store.export_memory(config["memory_name"], out / memory_file)
            state = {
                "encoder": encoder.state_dict(),
                "memory_module": module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "numpy_rng": rng.bit_generator.state,
                **torch_random_states(),
                "episode_batch": episode_batch,
                "memory_file": memory_file,
                "metrics": metrics,
                "config": config,
            }
            torch.save(state, checkpoint_path.with_suffix(".tmp"))
            os.replace(checkpoint_path.with_suffix(".tmp"), checkpoint_path)
            for old in out.glob("memory-*.lmem"):
                if old.name != memory_file:
                    old.unlink()


# What a checkpoint's weights and metrics depend on, with the value a checkpoint from before the option meant.
# What a checkpoint of this trainer holds (flags.load_checkpoint tells another trainer's apart by it).
OMNIGLOT_CHECKPOINT = ("encoder", "memory_module", "episode_batch")

EXPERIMENT_SETTINGS = {
    "split": "reference",
    "input": "ink",
    "init": "he",
    "rep_dim": 128,
    "encoder": "convnet",
    "adam": "torch",
    "backend": "torch",
    "ivf_lists": 0,
    "ivf_probes": 0,
    "retrain_index_every": 0,
}


def check_same_experiment(config: dict, saved: dict, source) -> None:
    """Resuming or evaluating a checkpoint under other settings would mix two experiments: refuse, naming them."""
    differ = [
        f"--{key.replace('_', '-')} {saved.get(key, default)} (given {config[key]})"
        for key, default in EXPERIMENT_SETTINGS.items()
        if saved.get(key, default) != config[key]
    ]
    if differ:
        raise SystemExit(f"{source} was trained with " + ", ".join(differ) + "; pass the same settings")


def memory_fields(config: dict) -> dict:
    """The MemoryConfig fields (all but key_dim) of a run's memories."""
    return dict(
        memory_size=config["memory_size"],
        backend=config["backend"],
        ivf_lists=config["ivf_lists"],
        ivf_probes=config["ivf_probes"],
        choose_k=config["choose_k"],
        alpha=config["alpha"],
        age_noise=config["age_noise"],
        seed=config["seed"],
    )


def main() -> None:
    config = configure()
    if config["retrain_index_every"] and config["backend"] != "faiss-ivf":
        raise SystemExit(f"--retrain-index-every: only a faiss-ivf memory has a quantizer, not {config['backend']}")
    torch.manual_seed(config["seed"])
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    out = pathlib.Path(config["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    data_dir = pathlib.Path(config["data"])
    if config["download"]:
        omniglot_data.download(data_dir)
    split_data = omniglot_data.load_split(data_dir, config["split"], config["input"])
    print(
        f"{config['split']} split: {len(split_data.train)} training classes, {len(split_data.test)} test classes; "
        f"encoder {config['encoder']}, input {config['input']}, init {config['init']}, adam {config['adam']}, "
        f"memory backend {config['backend']}"
    )

    store = connect(config["memory"])
    memory_config = memory_fields(config)
    names = {info.name for info in store.list_memories()}
    for name in (config["memory_name"], config["memory_name"] + "-eval"):
        if name in names:  # this trainer owns its memories: start from fresh ones
            store.delete_memory(name)
    encoder = build_encoder(config["encoder"], config["rep_dim"], config["dropout_keep"], config["init"])
    encoder = encoder.to(config["device"])
    module = MemoryModule(store, config["rep_dim"], name=config["memory_name"], **memory_config).to(config["device"])
    eval_memory = store.create_memory(config["memory_name"] + "-eval", key_dim=config["rep_dim"], **memory_config)
    parameters = [*encoder.parameters(), *module.parameters()]
    optimizer = make_optimizer(parameters, config["adam"], config["learning_rate"], config["adam_epsilon"])
    rng = np.random.default_rng(config["seed"])
    first, metrics = 1, []

    checkpoint_path = out / "checkpoint.pt"
    source = config["evaluate"] or (checkpoint_path if config["resume"] and checkpoint_path.exists() else None)
    if source:
        state = flags.load_checkpoint(source, "omniglot", OMNIGLOT_CHECKPOINT, map_location=config["device"])
        check_same_experiment(config, state["config"], source)
        encoder.load_state_dict(state["encoder"])
        module.load_state_dict(state["memory_module"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["numpy_rng"]
        restore_torch_random_states(state)
        first = state["episode_batch"] + 1
        if not config["evaluate"] and "memory_file" in state:
            store.delete_memory(config["memory_name"])
            store.import_memory(config["memory_name"], out / state["memory_file"])
        metrics = state["metrics"]
        print(f"resumed from {source} after episode batch {state['episode_batch']}")

    if not config["evaluate"]:
        train(config, store, encoder, module, optimizer, eval_memory, split_data, rng, first, metrics, checkpoint_path)

    runs = omniglot_data.load_lake_runs(data_dir, config["input"])
    results = final_evaluation(encoder, module, eval_memory, split_data, runs, config)
    (out / "evaluation.json").write_text(json.dumps(results, indent=2))
    print_evaluation(results)
    if not config["evaluate"]:  # an evaluation writes only evaluation.json
        print(f"\nplot: {out / 'accuracy.png'}   metrics: {out / 'metrics.jsonl'}")
    store.delete_memory(config["memory_name"])
    store.delete_memory(config["memory_name"] + "-eval")
    store.close()


if __name__ == "__main__":
    flags.run(main)
