"""The synthetic rare-symbol task with the memory module (Kaiser et al. 2017, section 4.2).

A fixed random function f maps the 4^7 = 16,384 symbols x, each written as 7
base-4 digits, onto themselves. An input is a sequence of As and Bs (length up
to 40) holding one block of 7 digits x; the output is the same sequence with
the block replaced by f(x). With 40,000 training sequences each mapping is seen
about 2.4 times, many once or never, so a sequence model learns the copying
but not the rare mappings; a memory can remember them.

Two models, both a 2-layer LSTM encoder-decoder with attention that also encodes
the block's 7 digits alone (one tanh layer over their embeddings):
  baseline: no memory; the block's encoding joins the output layer at the
            block's steps, so it sees what the memory model's query sees.
  memory:   the same, with MemoryModule queried once per sequence, at the
            decoder step of the block's first digit (the output's block sits
            where the input's does), with the block's encoding (standardised)
            as the query and the target block f(x), one of 16,384 symbols, as
            the value. At each step of the block, as the paper does for
            translation, the embedded answer of the recalled value (its digit
            for that step), weighted by its softmax score, is concatenated with
            the attention-mixed state before the output layer.
            Why the block's symbol and not each step's digit as the value: with
            4 values any slot of the same digit, a quarter of the memory, is a
            positive, and the memory loss trains a 4-way digit classifier instead
            of one key per mapping. Why once per block: one value holds the whole
            answer, and the search is most of a step's time. Why the block's own
            encoding as the query: the attention-mixed state (--no-block-encoder,
            the paper's query for translation) also carries the As and Bs around
            the block, and new contexts then missed the entries written in
            training ones (docs/results.md has both).

    python -m lifelong_memory.trainers.synthetic --model baseline --out-dir runs/synthetic-baseline
    python -m lifelong_memory.trainers.synthetic --model memory --out-dir runs/synthetic-memory
    python -m lifelong_memory.trainers.synthetic --memory grpc://127.0.0.1:50051   # same numbers, remote
    python -m lifelong_memory.trainers.synthetic --resume                          # continue from the checkpoint
    python -m lifelong_memory.trainers.synthetic --evaluate runs/synthetic-memory/checkpoint.pt

Every option below is a plain value with its default; each has a --flag.
Outputs in out_dir: checkpoint.pt (with memory-STEP.lmem, the memory at that
step), metrics.jsonl, accuracy.png, evaluation.json.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lifelong_memory.client import MemoryModule, connect
from lifelong_memory.trainers import flags
from lifelong_memory.trainers.statistics import record_validation, wilson_interval

# -------------------------------------------------------------------- config
model = "memory"  # "memory" or "baseline" (no memory)
digits = 7  # x has this many base-4 digits: 4^7 = 16,384 symbols
train_sequences = 40_000
validation_sequences = 1_000  # learning curves; drawn like the test set, disjoint from it
test_sequences = 10_000  # the final evaluation
min_length = 8
max_length = 40
embedding_dim = 32
hidden = 128
# The model also encodes the block's 7 digits alone (their embeddings through one tanh layer). With the memory
# that encoding is the query, the same for the same x in any context; without, it joins the output layer at the
# block's steps, so the baseline sees what the memory sees. False: the memory's query is the attention-mixed
# state (the paper's query for translation) and the baseline is the paper's plain LSTM with attention.
block_encoder = True
memory = "local"  # "local" (embedded) or "grpc://host:port"
memory_name = "synthetic"
key_dim = 64
memory_size = 500_000  # the paper's "half a million"
choose_k = 32
alpha = 0.1
age_noise = 8.0
batch_size = 64
learning_rate = 1e-3
clip_norm = 5.0
epochs = 12  # the copying of long A/B runs needs them; the memory's recall is complete after 2 (docs/results.md)
validate_every = 313  # training batches (half an epoch of 40,000 sequences)
checkpoint_every = 313
compare = ""  # another run's metrics.jsonl, drawn dashed beside this run's curves
out_dir = "runs/synthetic"
resume = False
evaluate = ""  # a checkpoint: skip training, run the final evaluation
threads = 1  # torch intra-op threads; 0 = torch's default
seed = 0

PAD, GO, A, B, DIGIT = 0, 1, 2, 3, 4  # tokens; the digits 0..3 are tokens 4..7
VOCAB = 8
SEEN = ("0", "1", "2", "3+")  # how often a test item's x occurred in training
PAPER = {"baseline": "about 1%", "memory": "over 30%"}  # test accuracy reported in the paper (section 4.2)


def configure(argv: list[str] | None = None) -> dict:
    return flags.configure(globals(), __doc__, argv)


# ---------------------------------------------------------------------- data


@dataclass
class Sequences:
    inputs: np.ndarray  # int64 [n, max_length], PAD after the end
    targets: np.ndarray  # int64 [n, max_length]: the inputs with the block replaced by f(x)
    lengths: np.ndarray  # int64 [n]
    symbols: np.ndarray  # int64 [n]: x
    seen: np.ndarray  # int64 [n]: how many training sequences hold this x (training: including itself)

    def __len__(self) -> int:
        return len(self.lengths)

    def subset(self, rows) -> Sequences:
        return Sequences(self.inputs[rows], self.targets[rows], self.lengths[rows], self.symbols[rows], self.seen[rows])


def base4(symbols: np.ndarray, digits: int) -> np.ndarray:
    """[n] symbols as [n, digits] base-4 digits, most significant first."""
    return (symbols[:, None] // 4 ** np.arange(digits - 1, -1, -1)) % 4


def sample_sequences(n: int, f: np.ndarray, config: dict, rng: np.random.Generator) -> Sequences:
    lengths = rng.integers(config["min_length"], config["max_length"] + 1, n)
    starts = rng.integers(0, lengths - config["digits"] + 1)
    symbols = rng.integers(0, len(f), n)
    positions = np.arange(config["max_length"])
    inputs = np.where(positions < lengths[:, None], rng.integers(A, B + 1, (n, config["max_length"])), PAD)
    block = (np.arange(n)[:, None], starts[:, None] + np.arange(config["digits"]))
    targets = inputs.copy()
    inputs[block] = DIGIT + base4(symbols, config["digits"])
    targets[block] = DIGIT + base4(f[symbols], config["digits"])
    return Sequences(inputs, targets, lengths, symbols, np.zeros(n, dtype=np.int64))


def make_task(config: dict) -> tuple[np.ndarray, Sequences, Sequences, Sequences]:
    """f, then the training, validation and test sets: deterministic in the seed.

    Validation and test sequences are drawn afresh (new A/B contexts, positions and
    symbols); any that equals a training sequence, or one drawn before it, is redrawn,
    so no two sets share a sequence.
    """
    rng = np.random.default_rng(config["seed"])
    f = rng.integers(0, 4 ** config["digits"], 4 ** config["digits"])
    train = sample_sequences(config["train_sequences"], f, config, rng)
    counts = np.bincount(train.symbols, minlength=len(f))
    train.seen = counts[train.symbols]
    taken = {row.tobytes() for row in train.inputs}
    held_out = []
    for n in (config["validation_sequences"], config["test_sequences"]):
        rows: list[Sequences] = []
        for _ in range(100):
            if sum(map(len, rows)) == n:
                break
            candidates = sample_sequences(n, f, config, rng)
            fresh = []
            for i, row in enumerate(candidates.inputs):
                if row.tobytes() not in taken:
                    taken.add(row.tobytes())
                    fresh.append(i)
            rows.append(candidates.subset(np.array(fresh[: n - sum(map(len, rows))], dtype=np.int64)))
        else:
            raise ValueError(
                f"found {sum(map(len, rows))} of {n} held-out sequences unlike any training one in "
                f"100 draws: too few sequences of length {config['min_length']}-{config['max_length']}"
            )
        sequences = Sequences(*(np.concatenate([getattr(r, k) for r in rows]) for k in Sequences.__annotations__))
        sequences.seen = counts[sequences.symbols]
        held_out.append(sequences)
    return f, train, held_out[0], held_out[1]


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, lengths: np.ndarray) -> list[np.ndarray]:
    """One epoch's batches, a function of (seed, epoch) only, so a resumed run draws the same ones. Batches
    are cut from chunks of 32 sorted by length: less padding, about twice as fast as random batches."""
    rng = np.random.default_rng([seed, 1, epoch])
    order = rng.permutation(n)
    chunk = 32 * batch_size
    batches = []
    for start in range(0, n, chunk):
        rows = order[start : start + chunk]
        rows = rows[np.argsort(lengths[rows], kind="stable")]
        batches += [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


# --------------------------------------------------------------------- model


class Seq2Seq(nn.Module):
    """2-layer LSTM encoder (bidirectional, as GNMT's bottom layer) and 2-layer LSTM decoder with Luong's
    general attention; with a memory, the memory's answer joins the attention-mixed state before the output."""

    def __init__(
        self, embedding_dim: int, hidden: int, digits: int, memory: MemoryModule | None = None, block_encoder=True
    ):
        super().__init__()
        self.digits = digits
        self.embed = nn.Embedding(VOCAB, embedding_dim)
        self.encoder = nn.LSTM(embedding_dim, hidden // 2, num_layers=2, bidirectional=True, batch_first=True)
        self.decoder = nn.LSTM(embedding_dim, hidden, num_layers=2, batch_first=True)
        self.attention = nn.Linear(hidden, hidden, bias=False)
        self.mix = nn.Linear(2 * hidden, hidden)
        self.block_encoder = (
            nn.Sequential(nn.Linear(digits * embedding_dim, hidden), nn.Tanh()) if block_encoder else None
        )
        self.memory = memory
        if memory is not None:
            # The attention-mixed states at the block's start share a large common part (each says "a digit
            # now"): sent as they are, all queries were nearly parallel (mean cosine 0.9999 after 1.5 epochs) and
            # the memory loss had no gradient. Standardised per feature over the batch, they differ by x.
            self.query_norm = nn.BatchNorm1d(hidden, affine=False)
            self.value_embedding = nn.Embedding(4, hidden)
        joined = memory is not None or block_encoder  # the recalled digit, or the block's encoding
        self.output = nn.Linear(hidden * (2 if joined else 1), VOCAB)

    def encode(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Attention keys and values [B, T, H], the padding mask [B, T] and the block's own encoding [B, H]."""
        encoded, _ = self.encoder(self.embed(inputs))
        block = None
        if self.block_encoder is not None:
            digits = inputs[inputs >= DIGIT].view(len(inputs), self.digits)  # each input holds one block
            block = self.block_encoder(self.embed(digits).flatten(1))
        return self.attention(encoded), encoded, inputs == PAD, block

    def decode(self, encoded, decoder_inputs, state, block_position, labels=None, recall=None):
        """Logits [B, T', VOCAB] for decoder steps, the decoder state, the memory loss and the recall.

        ``block_position`` [B, T'] is each step's digit in the block (-1 outside it); the memory is queried at
        the block's first digit, and its answer, the recall (symbol and softmax weight per row, carried from
        call to call), joins every step of the block. With ``labels`` (the target symbol f(x) of each queried
        row) the memory learns from them and the memory loss is returned; without, it is only read.
        """
        attention_keys, values, padding, block = encoded
        decoded, state = self.decoder(self.embed(decoder_inputs), state)
        scores = (decoded @ attention_keys.transpose(1, 2)).masked_fill(padding[:, None, :], -math.inf)
        context = torch.softmax(scores, dim=-1) @ values
        mixed = torch.tanh(self.mix(torch.cat([decoded, context], dim=-1)))
        in_block = (block_position >= 0)[..., None]
        if self.memory is None:
            if block is None:
                return self.output(mixed), state, None, None
            return self.output(torch.cat([mixed, block[:, None, :] * in_block], dim=-1)), state, None, None
        if recall is None:
            recall = (torch.full(mixed.shape[:1], -1), torch.zeros(mixed.shape[:1]))
        symbol, weight = recall
        memory_loss = None
        starts = block_position == 0
        if starts.any():
            rows = starts.nonzero()[:, 0]
            query = mixed[starts] if block is None else block[rows]
            out = self.memory(self.query_norm(query), labels)
            nearest = out.neighbor_values[:, 0]  # the memory's prediction, a symbol (-1: an empty slot)
            symbol = symbol.index_put((rows,), nearest)
            weight = weight.index_put((rows,), out.neighbor_weights[:, 0] * (nearest >= 0))
            memory_loss = out.loss
        place = 4 ** (self.digits - 1 - block_position.clamp(min=0))
        digit = symbol[:, None].clamp(min=0) // place % 4
        recalled = self.value_embedding(digit) * weight[:, None, None] * in_block
        return self.output(torch.cat([mixed, recalled], dim=-1)), state, memory_loss, (symbol, weight)


def as_batch(sequences: Sequences, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of ``rows``, cut to the longest of them."""
    length = int(sequences.lengths[rows].max())
    return torch.from_numpy(sequences.inputs[rows, :length]), torch.from_numpy(sequences.targets[rows, :length])


def teacher_forced(targets: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.full_like(targets[:, :1], GO), targets[:, :-1]], dim=1)


def block_positions(inputs: torch.Tensor) -> torch.Tensor:
    """For each step, which digit of the block it is (0 = most significant), -1 outside the block."""
    is_digit = inputs >= DIGIT
    return torch.where(is_digit, is_digit.cumsum(dim=1) - 1, -1)


def block_symbols(targets: torch.Tensor, digits: int) -> torch.Tensor:
    """The target block of each row, f(x), as a symbol."""
    block = (targets[targets >= DIGIT] - DIGIT).view(-1, digits)
    return (block * 4 ** torch.arange(digits - 1, -1, -1)).sum(dim=1)


def train_step(model, optimizer, inputs, targets, clip) -> tuple[float, float]:
    """One gradient step on a batch: cross-entropy of every output token, plus the memory loss."""
    model.train()
    logits, _, memory_loss, _ = model.decode(
        model.encode(inputs),
        teacher_forced(targets),
        None,
        block_positions(inputs),
        block_symbols(targets, model.digits),
    )
    loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=PAD)
    total = loss if memory_loss is None else loss + memory_loss
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return loss.item(), 0.0 if memory_loss is None else memory_loss.item()


@torch.no_grad()
def greedy_decode(model, inputs: torch.Tensor) -> torch.Tensor:
    """The model's output for each input, one token at a time, as long as the input (the task's outputs are)."""
    model.eval()
    encoded = model.encode(inputs)
    previous = torch.full_like(inputs[:, :1], GO)
    positions = block_positions(inputs)
    state, recall, outputs = None, None, []
    for t in range(inputs.shape[1]):
        logits, state, _, recall = model.decode(encoded, previous, state, positions[:, t : t + 1], recall=recall)
        previous = logits.argmax(dim=-1)
        outputs.append(previous)
    return torch.cat(outputs, dim=1)


def score(model, sequences: Sequences, batch_size: int = 500) -> dict[str, np.ndarray]:
    """Per sequence: the whole output right, the digit block right, and the fraction of block digits right."""
    whole, block, digit = [], [], []
    for start in range(0, len(sequences), batch_size):
        rows = np.arange(start, min(start + batch_size, len(sequences)))
        inputs, targets = as_batch(sequences, rows)
        right = (greedy_decode(model, inputs) == targets) | (targets == PAD)
        in_block = inputs >= DIGIT
        whole.append(right.all(dim=1).numpy())
        block.append((right | ~in_block).all(dim=1).numpy())
        digit.append(((right & in_block).sum(dim=1) / in_block.sum(dim=1)).numpy())
    return {"sequence": np.concatenate(whole), "block": np.concatenate(block), "digit": np.concatenate(digit)}


def seen_bucket(seen: np.ndarray) -> np.ndarray:
    """0, 1, 2 or 3 (for 3+): the index into SEEN."""
    return np.minimum(seen, 3)


def breakdown(scores: dict[str, np.ndarray], seen: np.ndarray) -> dict:
    """Accuracy and its 95% interval by how often x was seen in training, for all items and for 1-2 times."""
    buckets = seen_bucket(seen)
    groups = {name: buckets == i for i, name in enumerate(SEEN)}
    groups["1-2"] = (buckets == 1) | (buckets == 2)
    groups["all"] = np.ones_like(buckets, dtype=bool)
    results = {}
    for group, rows in groups.items():
        n = int(rows.sum())
        results[group] = {"n": n}
        for measure, right in scores.items():
            mean = float(right[rows].mean()) if n else math.nan
            # The digit fraction's interval counts digits as trials; they are not independent within a sequence,
            # so it is narrower than the truth: read it as a rough guide.
            trials = n * (7 if measure == "digit" else 1)
            results[group][measure] = {"mean": mean, "ci95": wilson_interval(mean * trials, trials)}
    return results


def print_evaluation(results: dict) -> None:
    print(
        f"\nTest accuracy ({results['model']}, {results['test_sequences']} sequences) by times x was seen in training:"
    )
    print(f"{'seen':<6}{'n':>7}" + "".join(f"{m:>24}" for m in ("whole sequence", "digit block", "per digit")))
    for group in (*SEEN, "1-2", "all"):
        cells = results["test"][group]
        line = f"{group:<6}{cells['n']:>7}"
        for measure in ("sequence", "block", "digit"):
            low, high = cells[measure]["ci95"]
            line += f"{cells[measure]['mean']:>10.4f} [{low:.4f}, {high:.4f}]"
        print(line)
    print(f"paper (section 4.2): {PAPER[results['model']]} test accuracy")


def plot(metrics: list[dict], path: pathlib.Path, compare: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for runs, style in ((metrics, "-"), (compare, "--")):
        if not runs:
            continue
        epochs = [m["epoch"] for m in runs]
        name = runs[0]["model"]
        axes.plot(epochs, [m["train_block"] for m in runs], style, c="tab:gray", label=f"{name}: training sequences")
        axes.plot(epochs, [m["validation"]["1-2"] for m in runs], style, c="tab:blue", label=f"{name}: x seen 1-2")
        axes.plot(epochs, [m["validation"]["3+"] for m in runs], style, c="tab:green", label=f"{name}: x seen 3+")
        axes.plot(epochs, [m["validation"]["0"] for m in runs], style, c="tab:red", label=f"{name}: x never seen")
    axes.set(xlabel="epochs", ylabel="digit-block accuracy (greedy)", ylim=(-0.02, 1.02), title=title)
    axes.grid(alpha=0.3)
    axes.legend(loc="center right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ------------------------------------------------------------------ training


def validate(model, train, validation, config) -> tuple[dict, float]:
    """Block accuracy on validation sequences by times seen, and on as many training sequences (fixed ones)."""
    scores = score(model, validation)
    buckets = seen_bucket(validation.seen)
    by_seen = {name: float(scores["block"][buckets == i].mean()) for i, name in enumerate(SEEN)}
    by_seen["1-2"] = float(scores["block"][(buckets == 1) | (buckets == 2)].mean())
    by_seen["all"] = float(scores["block"].mean())
    train_rows = np.random.default_rng([config["seed"], 2]).choice(len(train), len(validation), replace=False)
    return by_seen, float(score(model, train.subset(train_rows))["block"].mean())


def save_checkpoint(path, model, optimizer, store, config, step, metrics) -> None:
    """The checkpoint and, beside it, the memory at the same step; written so that a crash leaves a pair."""
    out = path.parent
    memory_file = None
    if model.memory is not None:
        memory_file = f"memory-{step}.lmem"
        store.export_memory(config["memory_name"], out / memory_file)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "metrics": metrics,
        "config": config,
        "memory_file": memory_file,
    }
    torch.save(state, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    for old in out.glob("memory-*.lmem"):
        if old.name != memory_file:
            old.unlink()


def read_metrics(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def train(config, model, optimizer, store, task, first_step, metrics, checkpoint_path) -> None:
    """Training batches from ``first_step`` on, validating, plotting and checkpointing as configured."""
    _, train_set, validation, _ = task
    out = checkpoint_path.parent
    compare = read_metrics(pathlib.Path(config["compare"])) if config["compare"] else []
    # The metrics file restarts from the checkpoint's: validations after it, from a stopped run, are redone.
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    steps_per_epoch = math.ceil(len(train_set) / config["batch_size"])
    total_steps = config["epochs"] * steps_per_epoch
    losses, memory_losses, cpu_started = [], [], time.process_time()
    batches = None
    for step in range(first_step, total_steps + 1):
        epoch, index = divmod(step - 1, steps_per_epoch)
        if batches is None or index == 0:
            batches = epoch_batches(len(train_set), config["batch_size"], config["seed"], epoch, train_set.lengths)
        inputs, targets = as_batch(train_set, batches[index])
        loss, memory_loss = train_step(model, optimizer, inputs, targets, config["clip_norm"])
        losses.append(loss)
        memory_losses.append(memory_loss)

        if step % config["validate_every"] == 0 or step == total_steps:
            trained_until = time.process_time()
            by_seen, train_block = validate(model, train_set, validation, config)
            m = record_validation(metrics, out / "metrics.jsonl", config, step, steps_per_epoch, losses, memory_losses,
                                  cpu_started, trained_until, validation=by_seen, train_block=train_block)  # fmt: skip
            losses, memory_losses, cpu_started = [], [], time.process_time()
            print(
                f"step {step:6d}  epoch {m['epoch']:5.2f}  loss {m['train_loss']:.4f}  memory loss "
                f"{m['memory_loss']:+.4f}  block accuracy: training {train_block:.3f}, validation "
                + ", ".join(f"seen {k} {v:.3f}" for k, v in by_seen.items())
                + f"  {m['step_cpu_ms']:.0f} CPU ms/step  {m['cpu_s'] / 60:.1f} CPU min",
                flush=True,
            )
            plot(metrics, out / "accuracy.png", compare, f"Synthetic rare-symbol task, {config['model']}")
        if step % config["checkpoint_every"] == 0 or step == total_steps:
            save_checkpoint(checkpoint_path, model, optimizer, store, config, step, metrics)


def final_evaluation(model, task, config) -> dict:
    _, train_set, _, test = task
    results = {
        "model": config["model"],
        "test_sequences": len(test),
        "train_sequences": len(train_set),
        "test": breakdown(score(model, test), test.seen),
    }
    return results


# What a checkpoint's weights and memory depend on: resuming or evaluating under other values would mix experiments.
EXPERIMENT_SETTINGS = ("model", "digits", "train_sequences", "min_length", "max_length", "embedding_dim", "hidden",
                       "key_dim", "memory_size", "choose_k", "block_encoder", "seed")  # fmt: skip


def check_same_experiment(config: dict, saved: dict, source) -> None:
    differ = [
        f"--{key.replace('_', '-')} {saved[key]} (given {config[key]})"
        for key in EXPERIMENT_SETTINGS
        if saved[key] != config[key]
    ]
    if differ:
        raise SystemExit(f"{source} was trained with " + ", ".join(differ) + "; pass the same settings")


def main() -> None:
    config = configure()
    if config["model"] not in ("memory", "baseline"):
        raise SystemExit(f"--model must be 'memory' or 'baseline', got {config['model']!r}")
    torch.manual_seed(config["seed"])
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    out = pathlib.Path(config["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    task = make_task(config)
    _, train_set, validation, test = task
    print(
        f"{len(train_set)} training, {len(validation)} validation, {len(test)} test sequences over "
        f"{4 ** config['digits']} symbols; test items by times x was seen in training: "
        + ", ".join(f"{name} {int((seen_bucket(test.seen) == i).sum())}" for i, name in enumerate(SEEN))
    )

    checkpoint_path = out / "checkpoint.pt"
    source = config["evaluate"] or (checkpoint_path if config["resume"] and checkpoint_path.exists() else None)
    state = flags.load_checkpoint(source, "synthetic", ("model", "step", "digits")) if source else None
    if state:
        check_same_experiment(config, state["config"], source)

    store, module = None, None
    if config["model"] == "memory":
        store = connect(config["memory"])
        if config["memory_name"] in {info.name for info in store.list_memories()}:
            store.delete_memory(config["memory_name"])  # this trainer owns its memory: fresh, or the checkpoint's
        if state:
            store.import_memory(config["memory_name"], pathlib.Path(source).parent / state["memory_file"])
        module = MemoryModule(
            store,
            config["key_dim"],
            config["hidden"],
            name=config["memory_name"],
            return_neighbors=True,
            memory_size=config["memory_size"],
            choose_k=config["choose_k"],
            alpha=config["alpha"],
            age_noise=config["age_noise"],
            seed=config["seed"],
        )
    model = Seq2Seq(config["embedding_dim"], config["hidden"], config["digits"], module, config["block_encoder"])
    optimizer = torch.optim.Adam(model.parameters(), lr=config["learning_rate"])
    first_step, metrics = 1, []
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        first_step, metrics = state["step"] + 1, state["metrics"]
        print(f"resumed from {source} after step {state['step']}")

    if not config["evaluate"]:
        train(config, model, optimizer, store, task, first_step, metrics, checkpoint_path)

    results = final_evaluation(model, task, config)
    (out / "evaluation.json").write_text(json.dumps(results, indent=2))
    print_evaluation(results)
    if not config["evaluate"]:  # an evaluation writes only evaluation.json
        print(f"\nplot: {out / 'accuracy.png'}   metrics: {out / 'metrics.jsonl'}")
    if store is not None:
        store.delete_memory(config["memory_name"])
        store.close()


if __name__ == "__main__":
    flags.run(main)
