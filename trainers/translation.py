"""Translation with the memory module: one-shot rare words on Multi30k En->De (Kaiser et al. 2017, section 4.3).

The paper puts the memory into GNMT; this trainer does the same to a small attention encoder-decoder that one
CPU core trains in half an hour, on Multi30k (29,000 English-German image descriptions).

  vocabulary: one sentencepiece unigram model per language, trained on the training split only (kept in the
              checkpoint, so an evaluation reads the vocabulary its weights were trained with), or another run's
              with --vocabulary-dir: sentencepiece versions train different vocabularies from the same lines.
  baseline:   a 1-layer bidirectional LSTM encoder, a 1-layer LSTM decoder started from the encoder's mean,
              Luong's general attention; the attention vector (tanh of the decoder output and the context)
              goes to the output softmax. Beam search with length-normalised scores.
  memory:     the same, wired as the paper's GNMT: at every decoder step the attention vector queries
              MemoryModule (its projection, l2-normalised); a memory value is a target subword id; the
              embedding of the nearest neighbour's value, weighted by that neighbour's softmax score, is
              concatenated with the attention vector and the output layer, one linear layer, mixes the two
              before the final softmax. The memory loss (triplet) is added to the cross-entropy, and every
              training step updates the memory with the reference subwords. With --recall-gate the recalled
              embedding is also scaled by a learned gate, a sigmoid of a linear function of the attention
              vector and the nearest neighbour's cosine similarity, so the model can learn when to trust it.
              With --tied-recall the recalled subword's embedding is the output layer's own row for that
              subword (in the half that reads the recall): a recall then raises that subword's logit.
              With --context-training every step is trained as the context test is run: first one pass of
              memory updates (memorise) over other training pairs that share a rare word with the batch
              (context_pairs), then the step, so training meets recalls of rare words from other sentences.
              With --recall-mix M (evaluation only) the output distribution is mixed with the memory's own:
              (1 - M) p_model + M p_memory, p_memory the k neighbours' softmax weights on their values.

Evaluation (at the end of training, or --evaluate CHECKPOINT): beam search on test_2016_flickr and
test_2017_flickr, BLEU and chrF with sacrebleu on the detokenized output; the paper's one-shot context test
on each (the even lines, from index 0, are the context: 3 passes of memory updates only, no weight change;
then BLEU on the odd lines, before and after); and accuracy on reference words seen at most once in training.

    python -m lifelong_memory.trainers.translation --model baseline --out-dir runs/translation-baseline
    python -m lifelong_memory.trainers.translation --model memory --out-dir runs/translation-memory
    python -m lifelong_memory.trainers.translation --resume --out-dir runs/translation-memory   # continue
    python -m lifelong_memory.trainers.translation --resume --steps 8400 --decay-steps 1200 \
        --out-dir runs/translation-memory   # a cooldown branched from the constant-rate step-7200 checkpoint
    python -m lifelong_memory.trainers.translation --branch-from runs/translation-memory/checkpoint.pt \\
        --context-training --context-word-max 20 --steps 8400 --decay-steps 1200 \\
        --out-dir runs/translation-memory-branch   # the same, in a run of its own, with other context training
    python -m lifelong_memory.trainers.translation --evaluate runs/translation-memory/checkpoint.pt \\
        --memory grpc://127.0.0.1:50051 --out-dir runs/translation-memory-grpc   # the memory served remotely
    python -m lifelong_memory.trainers.translation --device cuda --memory-device cuda   # model and memory on a GPU

Every option below is a plain value with its default; each has a --flag.
Outputs in out_dir: checkpoint.pt (with memory-STEP.lmem, the memory at that step), metrics.jsonl,
bleu.png, evaluation.json, translations-SET.txt (one line per test sentence), vocabulary.LANG.model (the two
sentencepiece models, for --vocabulary-dir: another run, on another machine, on the same subwords).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import pathlib
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lifelong_memory.client import MemoryModule, connect
from lifelong_memory.trainers import flags
from lifelong_memory.trainers.random_states import restore_torch_random_states, torch_random_states
from lifelong_memory.trainers.statistics import record_validation, wilson_interval

# -------------------------------------------------------------------- config
model = "memory"  # "memory" or "baseline" (no memory)
data_dir = "../shared/data/multi30k"  # the gzipped Multi30k task-1 files (train.en.gz, ...); read only
source_language = "en"
target_language = "de"
train_pairs = 0  # use the first N training pairs; 0: all 29,000
test_pairs = 0  # use the first N lines of each test set; 0: all
validation_pairs = 200  # greedy BLEU on the first N validation lines at each validation
vocab_size = 5000  # subwords per language
vocabulary_dir = ""  # use the vocabulary.LANG.model files there (every run writes its own) instead of training them
max_train_length = 60  # training pairs with more subwords on either side are left out
embedding_dim = 128
hidden = 256
dropout = 0.2
label_smoothing = 0.1
memory = "local"  # "local" (embedded) or "grpc://host:port"
memory_name = "translation"
key_dim = 64
memory_size = 16_384  # at least a batch's rows: one query per target subword (up to 64 x 61), each may write a slot
search_dtype = "float32"  # memory's search scores: "bfloat16" halves the cost on CPUs with bf16 instructions only
recall_gate = False  # memory model: gate the recalled embedding on the attention vector and the nearest similarity
tied_recall = False  # memory model: a recalled subword is embedded by its own output-layer row (see Translator)
recall_mix = 0.0  # memory model, evaluation only: this share of the output distribution is the memory's (Translator)
context_training = False  # memory model: before each step, memorise other pairs sharing a rare word (context_pairs)
context_word_max = 5  # context_training: words seen 2 .. this many times in the training targets count as rare
choose_k = 16
alpha = 0.1
age_noise = 8.0
batch_size = 64
learning_rate = 2e-3
clip_norm = 5.0
steps = 3600  # 8 epochs of 29,000 pairs
decay_steps = 0  # a cooldown: the learning rate falls linearly to zero over the last N steps; 0: constant throughout
validate_every = 600
checkpoint_every = 600
beam = 4
length_penalty = 1.0  # beam hypotheses are ranked by log-probability / length ** length_penalty
context_passes = 3  # the paper's one-shot test: passes of memory updates over the even lines
test_sets = "test_2016_flickr,test_2017_flickr"
out_dir = "runs/translation"
resume = False
branch_from = ""  # another run's checkpoint: go on from its step in out_dir; only BRANCH_SETTINGS may differ from it
evaluate = ""  # a checkpoint: skip training, run the final evaluation
threads = 1  # torch intra-op threads; 0 = torch's default
device = "cpu"  # where the model trains and translates: "cpu" or "cuda"
memory_device = "cpu"  # the memory's own device (its config.device; a server's GPU where --memory is grpc://)
seed = 0

PAD, BOS, EOS, UNK = 0, 1, 2, 3  # sentencepiece ids, fixed when the vocabularies are trained
RARE = ("never", "once", "at most once")  # reference words by how often the training targets hold them
WORD = re.compile(r"\w+")


def configure(argv: list[str] | None = None) -> dict:
    return flags.configure(globals(), __doc__, argv)


# ---------------------------------------------------------------------- data


def read_lines(config: dict, split: str, language: str, limit: int) -> list[str]:
    path = pathlib.Path(config["data_dir"]) / f"{split}.{language}.gz"
    if not path.exists():
        raise SystemExit(f"--data-dir: {path} not found (the Multi30k task-1 raw files, e.g. train.en.gz)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    return lines[:limit] if limit else lines


def train_vocabulary(lines: list[str], vocab_size: int, seed: int) -> bytes:
    """A sentencepiece unigram model of ``lines``, as bytes: no files, deterministic (one thread, fixed seed)."""
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=PAD,
        bos_id=BOS,
        eos_id=EOS,
        unk_id=UNK,
        hard_vocab_limit=False,  # a tiny slice has fewer pieces than asked for; take what there is
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def vocabulary_files(directory, config: dict) -> tuple[pathlib.Path, pathlib.Path]:
    sides = ("source_language", "target_language")
    return tuple(pathlib.Path(directory) / f"vocabulary.{config[side]}.model" for side in sides)


def given_vocabularies(config: dict, saved: dict | None, source) -> tuple[bytes, bytes] | None:
    """The vocabularies a run uses rather than training its own: the checkpoint's when it resumes or evaluates, or
    --vocabulary-dir's (sentencepiece's training differs between its versions, so runs on two machines compare
    like with like only on one vocabulary); given both, they must be the same."""
    if not config["vocabulary_dir"]:
        return saved["vocabularies"] if saved else None
    files = vocabulary_files(config["vocabulary_dir"], config)
    if missing := [str(f) for f in files if not f.exists()]:
        raise SystemExit(f"--vocabulary-dir: {', '.join(missing)} not found")
    given = tuple(f.read_bytes() for f in files)
    if saved and given != tuple(saved["vocabularies"]):
        raise SystemExit(f"{source} was trained on another vocabulary than --vocabulary-dir {config['vocabulary_dir']}")
    return given


def vocabulary_fingerprint(vocabularies) -> str:
    """The first 16 hex digits of the SHA-256 of both sentencepiece models: equal fingerprints, same subwords."""
    digest = hashlib.sha256()
    for vocabulary in vocabularies:
        digest.update(vocabulary.serialized_model_proto())
    return digest.hexdigest()[:16]


def processor(model_bytes: bytes):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=model_bytes)


@dataclass
class Pairs:
    source: list[list[int]]  # subword ids, no BOS/EOS
    target: list[list[int]]
    source_text: list[str]
    target_text: list[str]

    def __len__(self) -> int:
        return len(self.source)

    def subset(self, rows) -> Pairs:
        return Pairs(*([getattr(self, k)[i] for i in rows] for k in Pairs.__annotations__))


def encode_pairs(source_text, target_text, vocabularies) -> Pairs:
    source_vocab, target_vocab = vocabularies
    return Pairs(source_vocab.encode(source_text), target_vocab.encode(target_text), source_text, target_text)


@dataclass
class Task:
    vocabularies: tuple  # sentencepiece processors (source, target)
    train: Pairs
    validation: Pairs
    tests: dict[str, Pairs]
    train_word_counts: Counter  # whole words of the training targets


def make_task(config: dict, vocabulary_models: tuple[bytes, bytes] | None) -> tuple[Task, tuple[bytes, bytes]]:
    """The data, subword-encoded; the vocabularies are trained on the training split unless given."""
    src, tgt = config["source_language"], config["target_language"]
    train_source = read_lines(config, "train", src, config["train_pairs"])
    train_target = read_lines(config, "train", tgt, config["train_pairs"])
    if vocabulary_models is None:
        vocabulary_models = (
            train_vocabulary(train_source, config["vocab_size"], config["seed"]),
            train_vocabulary(train_target, config["vocab_size"], config["seed"]),
        )
    vocabularies = tuple(processor(m) for m in vocabulary_models)
    train = encode_pairs(train_source, train_target, vocabularies)
    keep = [
        i
        for i in range(len(train))
        if 0 < len(train.source[i]) <= config["max_train_length"]
        and 0 < len(train.target[i]) <= config["max_train_length"]
    ]
    limit = config["validation_pairs"]
    validation = encode_pairs(
        read_lines(config, "val", src, limit), read_lines(config, "val", tgt, limit), vocabularies
    )
    tests = {
        name: encode_pairs(
            read_lines(config, name, src, config["test_pairs"]),
            read_lines(config, name, tgt, config["test_pairs"]),
            vocabularies,
        )
        for name in config["test_sets"].split(",")
    }
    counts = Counter(word for line in train_target for word in WORD.findall(line))
    return Task(vocabularies, train.subset(keep), validation, tests, counts), vocabulary_models


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """One epoch's batches, a function of (seed, epoch) only, so a resumed run draws the same ones; cut from
    chunks of 32 batches sorted by length (less padding)."""
    rng = np.random.default_rng([seed, 1, epoch])
    order = rng.permutation(len(lengths))
    chunk = 32 * batch_size
    batches = []
    for start in range(0, len(order), chunk):
        rows = order[start : start + chunk]
        rows = rows[np.argsort(lengths[rows], kind="stable")]
        batches += [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def padded(
    sequences: list[list[int]], prefix: tuple[int, ...] = (), suffix: tuple[int, ...] = (), device="cpu"
) -> torch.Tensor:
    rows = [[*prefix, *s, *suffix] for s in sequences]
    out = np.full((len(rows), max(map(len, rows))), PAD, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return torch.from_numpy(out).to(device)


def as_batch(pairs: Pairs, rows, device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source (ends in EOS), decoder input (BOS first) and decoder target (EOS last) of ``rows``, on ``device``."""
    source = padded([pairs.source[i] for i in rows], suffix=(EOS,), device=device)
    target = [pairs.target[i] for i in rows]
    return source, padded(target, prefix=(BOS,), device=device), padded(target, suffix=(EOS,), device=device)


def rare_word_pairs(pairs: Pairs, train_counts: Counter, most: int) -> dict[str, np.ndarray]:
    """Per word seen 2 .. ``most`` times in the training targets, the pairs whose target holds it."""
    holders: dict[str, list[int]] = {}
    for i, line in enumerate(pairs.target_text):
        for word in set(WORD.findall(line)):
            if 2 <= train_counts[word] <= most:
                holders.setdefault(word, []).append(i)
    return {word: np.array(rows) for word, rows in holders.items() if len(rows) > 1}


def context_pairs(pairs: Pairs, rows: np.ndarray, holders: dict[str, np.ndarray], rng) -> list[int]:
    """For each rare word (a key of ``holders``) in the targets of ``rows``, one other pair holding it, drawn by
    ``rng``: a training batch's context, as the even lines are the odd lines' in the context test. At most one
    pair per row of the batch."""
    chosen: list[int] = []
    for row in rows:
        for word in sorted(set(WORD.findall(pairs.target_text[row])) & holders.keys()):
            others = holders[word][~np.isin(holders[word], rows)]
            if len(others):
                chosen.append(int(others[rng.integers(len(others))]))
    chosen = list(dict.fromkeys(chosen))  # first draw of each, in order
    return chosen[: len(rows)]


# --------------------------------------------------------------------- model


class Translator(nn.Module):
    """Bidirectional LSTM encoder, LSTM decoder with Luong's general attention; with a memory, the nearest
    neighbour's value, embedded and weighted by its softmax score, joins the attention vector at the output."""

    def __init__(
        self,
        source_vocab,
        target_vocab,
        embedding_dim,
        hidden,
        dropout,
        memory: MemoryModule | None = None,
        recall_gate: bool = False,
        tied_recall: bool = False,
        recall_mix: float = 0.0,
    ):
        super().__init__()
        self.source_embed = nn.Embedding(source_vocab, embedding_dim, padding_idx=PAD)
        self.target_embed = nn.Embedding(target_vocab, embedding_dim, padding_idx=PAD)
        self.encoder = nn.LSTM(embedding_dim, hidden // 2, bidirectional=True, batch_first=True)
        self.bridge = nn.Linear(hidden, hidden)
        self.decoder = nn.LSTM(embedding_dim, hidden, batch_first=True)
        self.attention = nn.Linear(hidden, hidden, bias=False)
        self.mix = nn.Linear(2 * hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.memory = memory
        if memory is not None:
            # Tied: the embedding of a recalled subword v is v's row in the half of the output layer that reads the
            # recall, so the recall adds weight * |row v|^2 to v's own logit. That row learns at every step, as every
            # output row does; an embedding of its own learns only when v is recalled: rarely, for a rare word.
            self.value_embedding = None if tied_recall else nn.Embedding(target_vocab, hidden)
            # the attention vector and the nearest neighbour's cosine similarity -> how much of the recall to use
            self.recall_gate = nn.Linear(hidden + 1, 1) if recall_gate else None
        self.output = nn.Linear(hidden * (2 if memory is not None else 1), target_vocab)
        # Evaluation only, not a weight: p = (1 - mix) p_model + mix p_memory, where p_memory puts each of the k
        # neighbours' softmax weights on its value (as kNN-LM, Khandelwal et al. 2020, not the paper's wiring).
        self.recall_mix = recall_mix

    @property
    def device(self) -> torch.device:
        return self.output.weight.device

    def encode(self, source: torch.Tensor):
        """Attention keys and values [B, S, H], the padding mask [B, S] and the decoder's initial state."""
        lengths = (source != PAD).sum(dim=1)
        packed = nn.utils.rnn.pack_padded_sequence(  # the lengths on the host, as packing requires
            self.dropout(self.source_embed(source)), lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        encoded, _ = self.encoder(packed)
        encoded, _ = nn.utils.rnn.pad_packed_sequence(encoded, batch_first=True, total_length=source.shape[1])
        padding = source == PAD
        mean = encoded.sum(dim=1) / lengths[:, None]
        h = torch.tanh(self.bridge(mean))[None]
        return (self.attention(encoded), encoded, padding), (h, torch.zeros_like(h))

    def decode(self, encoded, decoder_inputs, state, labels=None):
        """Logits [B, T, V] for the decoder steps, the new state and the memory's output (None without one).

        With a memory, every step whose input is not PAD queries it, in row-major order; ``labels`` [B, T] (the
        reference subwords, PAD where there is none) make it learn from them (update) and give the memory loss;
        without, it is only read."""
        attention_keys, values, padding = encoded
        decoded, state = self.decoder(self.dropout(self.target_embed(decoder_inputs)), state)
        scores = (decoded @ attention_keys.transpose(1, 2)).masked_fill(padding[:, None, :], -math.inf)
        context = torch.softmax(scores, dim=-1) @ values
        attention_vector = self.dropout(torch.tanh(self.mix(torch.cat([decoded, context], dim=-1))))
        if self.memory is None:
            return self.output(attention_vector), state, None
        steps = decoder_inputs != PAD if labels is None else labels != PAD
        if not steps.any():
            return self.output(torch.cat([attention_vector, torch.zeros_like(attention_vector)], dim=-1)), state, None
        out = self.memory(attention_vector[steps], None if labels is None else labels[steps])
        nearest = out.neighbor_values[:, 0]  # the memory's answer, a subword id (-1: an empty slot)
        weight = out.neighbor_weights[:, 0] * (nearest >= 0)
        if self.recall_gate is not None:
            similarity = (out.query * out.result.neighbor_keys[:, 0].to(out.query.device)).sum(dim=1, keepdim=True)
            gate_input = torch.cat([attention_vector[steps], similarity.to(attention_vector.dtype)], dim=1)
            weight = weight * torch.sigmoid(self.recall_gate(gate_input))[:, 0]
        recalled = torch.zeros_like(attention_vector)
        recalled[steps] = self.embed_value(nearest.clamp(min=0)) * weight[:, None]
        logits = self.output(torch.cat([attention_vector, recalled], dim=-1))
        if self.recall_mix and not self.training:
            logits[steps] = self.mixed_log_probabilities(logits[steps], out)
        return logits, state, out

    def mixed_log_probabilities(self, logits: torch.Tensor, out) -> torch.Tensor:
        """log((1 - mix) softmax(logits) + mix p_memory) for the rows that queried the memory; empty slots
        carry no weight."""
        values = out.neighbor_values
        weights = out.neighbor_weights * (values >= 0)
        memory = torch.zeros_like(logits).scatter_add_(1, values.clamp(min=0), weights.to(logits.dtype))
        return torch.log(torch.softmax(logits, dim=-1) * (1 - self.recall_mix) + memory * self.recall_mix)

    def embed_value(self, values: torch.Tensor) -> torch.Tensor:
        if self.value_embedding is None:
            return self.output.weight[values, self.output.in_features // 2 :]
        return self.value_embedding(values)


def learning_rate_at(step: int, config: dict) -> float:
    """The learning rate of training step ``step`` (from 1): constant, then with ``decay_steps`` falling linearly
    over the last ones to 1/decay_steps of it at the last step. The constant phase does not depend on where the
    decay starts, so a cooldown can branch from any of its checkpoints (--resume with more --steps)."""
    rate = config["learning_rate"]
    if not config["decay_steps"]:
        return rate
    return rate * min(1.0, (config["steps"] - step + 1) / config["decay_steps"])


def train_step(model, optimizer, source, decoder_inputs, targets, config) -> tuple[float, float]:
    """One gradient step: label-smoothed cross-entropy of every target subword, plus the memory loss."""
    model.train()
    encoded, state = model.encode(source)
    logits, _, recall = model.decode(encoded, decoder_inputs, state, targets)
    memory_loss = None if recall is None else recall.loss
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=PAD,
        label_smoothing=config["label_smoothing"],
    )
    total = loss if memory_loss is None else loss + memory_loss
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    nn.utils.clip_grad_norm_(model.parameters(), config["clip_norm"])
    optimizer.step()
    return loss.item(), 0.0 if memory_loss is None else memory_loss.item()


@torch.no_grad()
def validation_loss(model, pairs: Pairs, batch_size: int = 50) -> float:
    """Per-subword cross-entropy (no smoothing) of the references, the memory only read."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        rows = range(start, min(start + batch_size, len(pairs)))
        source, decoder_inputs, targets = as_batch(pairs, rows, model.device)
        encoded, state = model.encode(source)
        logits, _, _ = model.decode(encoded, decoder_inputs, state)
        total += nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=PAD, reduction="sum"
        ).item()
        count += int((targets != PAD).sum())
    return total / count


def select(state, rows: torch.Tensor):
    return tuple(s[:, rows] for s in state)


@torch.no_grad()
def beam_search(model, source: torch.Tensor, beam: int, length_penalty: float) -> list[list[int]]:
    """The best hypothesis per source row (subword ids, without EOS), by log-probability / length ** penalty.

    Hypotheses that ended stay in the beam with their score frozen; the search stops when every beam has
    ended or after 2 * source length + 10 steps."""
    model.eval()
    batch, device = source.shape[0], source.device
    (keys, values, padding), state = model.encode(source)
    expand = torch.arange(batch, device=device).repeat_interleave(beam)
    encoded = (keys[expand], values[expand], padding[expand])
    state = select(state, expand)
    scores = torch.full((batch, beam), -math.inf, device=device)
    scores[:, 0] = 0.0
    tokens = torch.full((batch * beam, 1), BOS, dtype=torch.int64, device=device)
    ended = torch.zeros(batch * beam, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch * beam, device=device)
    for _ in range(2 * source.shape[1] + 10):
        logits, state, _ = model.decode(encoded, tokens[:, -1:], state)
        log_probs = torch.log_softmax(logits[:, -1], dim=-1)
        # An ended hypothesis continues with PAD at no cost, so it keeps its score and its place.
        log_probs[ended] = -math.inf
        log_probs[ended, PAD] = 0.0
        vocab = log_probs.shape[-1]
        total = (scores.reshape(-1, 1) + log_probs).reshape(batch, beam * vocab)
        scores, choice = total.topk(beam, dim=1)
        origin = (torch.arange(batch, device=device)[:, None] * beam + choice // vocab).reshape(-1)
        token = (choice % vocab).reshape(-1)
        tokens = torch.cat([tokens[origin], token[:, None]], dim=1)
        state = select(state, origin)
        lengths = lengths[origin] + (~ended[origin]).float()
        ended = ended[origin] | (token == EOS)
        if ended.all():
            break
    ranked = (scores.reshape(-1) / lengths.clamp(min=1) ** length_penalty).reshape(batch, beam)
    best = torch.arange(batch, device=device) * beam + ranked.argmax(dim=1)
    hypotheses = []
    for row in tokens[best, 1:].tolist():
        hypotheses.append([t for t in row if t not in (PAD, EOS)] if EOS not in row else row[: row.index(EOS)])
    return hypotheses


def translate(model, pairs: Pairs, beam: int, length_penalty: float, target_vocab, batch_size: int = 50) -> list[str]:
    """Detokenized translations of every source sentence, in order (batches sorted by length)."""
    order = np.argsort([len(s) for s in pairs.source], kind="stable")
    out = [""] * len(pairs)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        source = padded([pairs.source[i] for i in rows], suffix=(EOS,), device=model.device)
        for row, hypothesis in zip(rows, beam_search(model, source, beam, length_penalty), strict=True):
            out[row] = target_vocab.decode(hypothesis)
    return out


def bleu_chrf(hypotheses: list[str], references: list[str]) -> dict:
    import sacrebleu

    return {
        "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
        "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
    }


# ------------------------------------------------------------------ rare words


def rare_word_accuracy(hypotheses, references, train_counts: Counter, context_words: set | None = None) -> dict:
    """For reference words (case-sensitive \\w+ runs) by how often the training targets hold them: the fraction
    of their occurrences the hypothesis has too (clipped: a word twice in the reference needs it twice), with a
    95% Wilson interval (occurrences counted as independent trials), and up to 5 examples of each kind.
    With ``context_words``, also "in context": the rare words (at most once in training) the context holds."""
    groups = {name: [0, 0, [], []] for name in (*RARE, *(("in context",) if context_words is not None else ()))}
    for line, (hypothesis, reference) in enumerate(zip(hypotheses, references, strict=True)):
        produced = Counter(WORD.findall(hypothesis))
        for word, needed in Counter(WORD.findall(reference)).items():
            seen = train_counts[word]
            if seen > 1:
                continue
            names = [RARE[seen], "at most once"]
            if context_words is not None and word in context_words:
                names.append("in context")
            hit = min(needed, produced[word])
            for name in names:
                group = groups[name]
                group[0] += hit
                group[1] += needed
                examples = group[2] if hit else group[3]
                if len(examples) < 5:
                    examples.append({"line": line, "word": word, "reference": reference, "hypothesis": hypothesis})
    return {
        name: {
            "correct": correct,
            "n": n,
            "accuracy": correct / n if n else math.nan,
            "ci95": wilson_interval(correct, n),
            "translated": right,
            "missed": wrong,
        }
        for name, (correct, n, right, wrong) in groups.items()
    }


def rare_word_ceiling(hypotheses, references, train_counts: Counter, context_words: set) -> dict:
    """The most the context could add through the paper's mechanism, recalling a rare word it holds: BLEU
    with every line whose reference holds a word seen at most once in training and present in the context
    replaced by its reference (as if the recall fixed the whole line), the other lines as translated."""
    rare = {word for word in context_words if train_counts[word] <= 1}
    lines = [i for i, reference in enumerate(references) if rare & set(WORD.findall(reference))]
    fixed = list(hypotheses)
    for i in lines:
        fixed[i] = references[i]
    return {"lines": len(lines), **bleu_chrf(fixed, references)}


# ------------------------------------------------------------------ the context test


@torch.no_grad()
def memorise(model, pairs: Pairs, batch_size: int = 8) -> None:
    """One pass of memory updates over ``pairs``: the decoder, teacher-forced with the references and without
    dropout, queries the memory at every step with the reference subword as the label; no weight changes.
    A batch is one memory update of one row per target subword: 8 sentences stay under a server's --max-batch."""
    model.eval()
    for start in range(0, len(pairs), batch_size):
        rows = range(start, min(start + batch_size, len(pairs)))
        source, decoder_inputs, targets = as_batch(pairs, rows, model.device)
        encoded, state = model.encode(source)
        model.decode(encoded, decoder_inputs, state, targets)


@torch.no_grad()
def teacher_forced_recall(model, pairs: Pairs, batch_size: int = 8) -> dict:
    """On the reference subwords of ``pairs``, teacher-forced, the memory only read: the fraction the model's most
    probable subword gets right, the fraction the memory's nearest value gets right, and the fraction only the
    memory gets right (what the memory could add, if the output layer followed it). Batches as in memorise."""
    model.eval()
    model_right = memory_right = only_memory = n = 0
    for start in range(0, len(pairs), batch_size):
        rows = range(start, min(start + batch_size, len(pairs)))
        source, decoder_inputs, targets = as_batch(pairs, rows, model.device)
        encoded, state = model.encode(source)
        logits, _, recall = model.decode(encoded, decoder_inputs, state)
        reference = targets[targets != PAD]
        argmax_right = logits[targets != PAD].argmax(dim=-1) == reference
        n += len(reference)
        model_right += int(argmax_right.sum())
        if recall is not None:
            nearest_right = recall.neighbor_values[:, 0] == reference
            memory_right += int(nearest_right.sum())
            only_memory += int((nearest_right & ~argmax_right).sum())
    with_memory = model.memory is not None
    return {
        "subwords": n,
        "model": model_right / n,
        "memory": memory_right / n if with_memory else None,
        "only_memory": only_memory / n if with_memory else None,
    }


def context_test(model, store, pairs: Pairs, train_counts: Counter, config: dict, target_vocab) -> dict:
    """The paper's one-shot test: BLEU on the odd lines before and after ``context_passes`` passes of memory
    updates over the even lines (index 0 is even). The memory is put back as it was afterwards."""
    even, odd = pairs.subset(range(0, len(pairs), 2)), pairs.subset(range(1, len(pairs), 2))
    context_words = {word for line in even.target_text for word in WORD.findall(line)}
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        saved = pathlib.Path(scratch) / "before-context.lmem"
        if model.memory is not None:
            store.export_memory(config["memory_name"], saved)
        for when in ("without", "with"):
            if when == "with" and model.memory is not None:
                for _ in range(config["context_passes"]):
                    memorise(model, even)
            hypotheses = translate(model, odd, config["beam"], config["length_penalty"], target_vocab)
            results[when] = {
                **bleu_chrf(hypotheses, odd.target_text),
                "rare_words": rare_word_accuracy(hypotheses, odd.target_text, train_counts, context_words),
                "teacher_forced": teacher_forced_recall(model, odd),
            }
            if when == "without":
                ceiling = rare_word_ceiling(hypotheses, odd.target_text, train_counts, context_words)
        if model.memory is not None:
            store.delete_memory(config["memory_name"])
            store.import_memory(config["memory_name"], saved)
    results["gain_bleu"] = results["with"]["bleu"] - results["without"]["bleu"]
    results["rare_word_ceiling"] = {**ceiling, "gain_bleu": ceiling["bleu"] - results["without"]["bleu"]}
    results["context_lines"], results["test_lines"] = len(even), len(odd)
    return results


# ------------------------------------------------------------------ training


def validate(model, task: Task, config: dict) -> dict:
    target_vocab = task.vocabularies[1]
    hypotheses = translate(model, task.validation, 1, config["length_penalty"], target_vocab)
    return {"loss": validation_loss(model, task.validation), **bleu_chrf(hypotheses, task.validation.target_text)}


def plot(metrics: list[dict], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, loss_axes = plt.subplots(figsize=(8, 5))
    steps = [m["step"] for m in metrics]
    loss_axes.plot(steps, [m["train_loss"] for m in metrics], c="tab:gray", label="training loss (smoothed CE)")
    loss_axes.plot(steps, [m["validation"]["loss"] for m in metrics], c="tab:red", label="validation loss")
    loss_axes.set(xlabel="training steps", ylabel="cross-entropy per subword", title=title)
    bleu_axes = loss_axes.twinx()
    bleu_axes.plot(steps, [m["validation"]["bleu"] for m in metrics], c="tab:blue", marker="o", label="validation BLEU")
    bleu_axes.set(ylabel="BLEU (greedy, validation)")
    handles = loss_axes.get_legend_handles_labels()[0] + bleu_axes.get_legend_handles_labels()[0]
    loss_axes.legend(handles=handles, loc="center right", fontsize=8)
    loss_axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def save_checkpoint(path, model, optimizer, store, config, step, metrics, vocabulary_models) -> None:
    """The checkpoint and, beside it, the memory at the same step; written so that a crash leaves a pair."""
    out = path.parent
    memory_file = None
    if model.memory is not None:
        memory_file = f"memory-{step}.lmem"
        store.export_memory(config["memory_name"], out / memory_file)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        **torch_random_states(),  # dropout's draws go on where they stopped
        "step": step,
        "metrics": metrics,
        "config": config,
        "memory_file": memory_file,
        "vocabularies": vocabulary_models,
    }
    torch.save(state, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    for old in out.glob("memory-*.lmem"):
        if old.name != memory_file:
            old.unlink()


def train(config, model, optimizer, store, task: Task, first_step, metrics, checkpoint_path, vocabulary_models):
    """Training steps from ``first_step`` on, validating, plotting and checkpointing as configured."""
    out = checkpoint_path.parent
    # The metrics file restarts from the checkpoint's: validations after it, from a stopped run, are redone.
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    lengths = np.array([max(len(s), len(t)) for s, t in zip(task.train.source, task.train.target, strict=True)])
    steps_per_epoch = math.ceil(len(lengths) / config["batch_size"])
    losses, memory_losses, cpu_started = [], [], time.process_time()
    batches = None
    if config["context_training"]:
        holders = rare_word_pairs(task.train, task.train_word_counts, config["context_word_max"])
    for step in range(first_step, config["steps"] + 1):
        epoch, index = divmod(step - 1, steps_per_epoch)
        if batches is None or index == 0:
            batches = epoch_batches(lengths, config["batch_size"], config["seed"], epoch)
        if config["context_training"]:
            rng = np.random.default_rng([config["seed"], 2, step])  # a function of the step: resumes draw the same
            memorise(model, task.train.subset(context_pairs(task.train, batches[index], holders, rng)), batch_size=32)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, config)
        loss, memory_loss = train_step(model, optimizer, *as_batch(task.train, batches[index], model.device), config)
        losses.append(loss)
        memory_losses.append(memory_loss)

        if step % config["validate_every"] == 0 or step == config["steps"]:
            trained_until = time.process_time()
            validation = validate(model, task, config)
            m = record_validation(metrics, out / "metrics.jsonl", config, step, steps_per_epoch, losses, memory_losses,
                                  cpu_started, trained_until, learning_rate=learning_rate_at(step, config),
                                  validation=validation)  # fmt: skip
            losses, memory_losses, cpu_started = [], [], time.process_time()
            print(
                f"step {step:6d}  epoch {m['epoch']:5.2f}  loss {m['train_loss']:.4f}  memory loss "
                f"{m['memory_loss']:+.4f}  validation: loss {validation['loss']:.4f}, greedy BLEU "
                f"{validation['bleu']:.2f}  {m['step_cpu_ms']:.0f} CPU ms/step  {m['cpu_s'] / 60:.1f} CPU min",
                flush=True,
            )
            plot(metrics, out / "bleu.png", f"Multi30k {config['source_language']}->{config['target_language']}, "
                 f"{config['model']}")  # fmt: skip
        if step % config["checkpoint_every"] == 0 or step == config["steps"]:
            save_checkpoint(checkpoint_path, model, optimizer, store, config, step, metrics, vocabulary_models)


def final_evaluation(
    model, store, task: Task, config: dict, out: pathlib.Path, trained_steps: int, trained_config: dict
) -> dict:
    """The test sets' evaluation; ``trained_config`` is the configuration the weights were trained under."""
    target_vocab = task.vocabularies[1]
    results = {
        "model": config["model"],
        "seed": config["seed"],
        "trained_steps": trained_steps,
        "learning_rate": trained_config["learning_rate"],
        "decay_steps": trained_config["decay_steps"],
        "branched_from": trained_config.get("branched_from"),
        "memory": config["memory"],
        "recall_mix": config["recall_mix"],
        "vocabulary": vocabulary_fingerprint(task.vocabularies),
        "versions": package_versions(),
        # Same code, seed and vocabulary train other weights on AVX-512 kernels than on AVX2 ones (README).
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "train_pairs": len(task.train),
        "tests": {},
    }
    for name, pairs in task.tests.items():
        started = time.process_time()
        hypotheses = translate(model, pairs, config["beam"], config["length_penalty"], target_vocab)
        (out / f"translations-{name}.txt").write_text("".join(h + "\n" for h in hypotheses))
        results["tests"][name] = {
            "lines": len(pairs),
            **bleu_chrf(hypotheses, pairs.target_text),
            "rare_words": rare_word_accuracy(hypotheses, pairs.target_text, task.train_word_counts),
            "context": context_test(model, store, pairs, task.train_word_counts, config, target_vocab),
            "cpu_s": time.process_time() - started,
        }
    return results


def package_versions() -> dict[str, str]:
    """What the numbers depend on besides the code: the scorer's and the model's libraries, and the tokenizer's
    (which trained the vocabulary, unless it came from a checkpoint or --vocabulary-dir)."""
    import sacrebleu
    import sentencepiece

    return {"torch": torch.__version__, "sentencepiece": sentencepiece.__version__, "sacrebleu": sacrebleu.__version__}


def print_evaluation(results: dict) -> None:
    setting = f"{results['model']}, memory {results['memory']}"
    setting += f", recall mix {results['recall_mix']}" if results["recall_mix"] else ""
    print(f"\nTest ({setting}), beam search, sacrebleu on detokenized output:")
    for name, test in results["tests"].items():
        context = test["context"]
        print(
            f"{name}: {test['lines']} lines  BLEU {test['bleu']:.2f}  chrF {test['chrf']:.2f}   context test "
            f"(odd lines after {context['context_lines']} even ones): BLEU {context['without']['bleu']:.2f} -> "
            f"{context['with']['bleu']:.2f} ({context['gain_bleu']:+.2f}), chrF {context['without']['chrf']:.2f} "
            f"-> {context['with']['chrf']:.2f}"
        )
        ceiling = context["rare_word_ceiling"]
        print(
            f"  at most {ceiling['gain_bleu']:+.2f} BLEU from the context's rare words: {ceiling['lines']} odd lines "
            "hold a word seen at most once in training that the even lines hold"
        )
        for label, rare in (
            ("all lines", test["rare_words"]),
            ("odd lines, no context", context["without"]["rare_words"]),
            ("odd lines, with context", context["with"]["rare_words"]),
        ):
            print(
                f"  rare reference words, {label}: "
                + ", ".join(
                    f"{group} {cell['accuracy']:.3f} [{cell['ci95'][0]:.3f}, {cell['ci95'][1]:.3f}] (n={cell['n']})"
                    for group, cell in rare.items()
                )
            )


# What a checkpoint's weights and memory depend on: resuming or evaluating under other values would mix experiments.
EXPERIMENT_SETTINGS = ("model", "source_language", "target_language", "train_pairs", "vocab_size", "max_train_length",
                       "embedding_dim", "hidden", "key_dim", "memory_size", "choose_k", "recall_gate",
                       "tied_recall", "context_training", "context_word_max", "seed")  # fmt: skip


# What a branch (--branch-from) may change: how the steps after the branch train, not what the weights are.
BRANCH_SETTINGS = ("context_training", "context_word_max")


def with_defaults(saved: dict) -> dict:
    """A checkpoint's configuration, each setting added since it was written at its default: what it trained with."""
    return configure([]) | saved


def check_same_experiment(config: dict, saved: dict, source, may_differ: tuple[str, ...] = ()) -> None:
    saved = with_defaults(saved)
    differ = [
        f"--{key.replace('_', '-')} {saved[key]} (given {config[key]})"
        for key in EXPERIMENT_SETTINGS
        if saved[key] != config[key] and key not in may_differ
    ]
    if differ:
        raise SystemExit(f"{source} was trained with " + ", ".join(differ) + "; pass the same settings")


def check_same_schedule(config: dict, saved: dict, trained_steps: int, source) -> None:
    """A resumed run goes on only if its schedule gives the steps already trained the rates they were trained at: a
    cooldown branches from a checkpoint of the constant phase, not from one inside another decay."""
    saved = with_defaults(saved)
    for step in range(1, trained_steps + 1):
        trained, given = learning_rate_at(step, saved), learning_rate_at(step, config)
        if trained != given:
            raise SystemExit(
                f"{source} trained step {step} at learning rate {trained:.6g}, but --steps {config['steps']} "
                f"--decay-steps {config['decay_steps']} --learning-rate {config['learning_rate']} give it {given:.6g}; "
                f"resume with --steps {saved['steps']} --decay-steps {saved['decay_steps']} --learning-rate "
                f"{saved['learning_rate']}"
            )


def main(argv: list[str] | None = None) -> None:
    config = configure(argv)
    if config["model"] not in ("memory", "baseline"):
        raise SystemExit(f"--model must be 'memory' or 'baseline', got {config['model']!r}")
    if not 0.0 <= config["recall_mix"] <= 1.0 or (config["recall_mix"] and config["model"] != "memory"):
        raise SystemExit(f"--recall-mix must be in [0, 1] and needs --model memory, got {config['recall_mix']}")
    if config["context_training"] and config["model"] != "memory":
        raise SystemExit("--context-training needs --model memory")
    if torch.device(config["device"]).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {config['device']}: this torch sees no CUDA device")
    torch.manual_seed(config["seed"])
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    out = pathlib.Path(config["out_dir"])
    out.mkdir(parents=True, exist_ok=True)

    checkpoint_path = out / "checkpoint.pt"
    if config["branch_from"] and config["evaluate"]:
        raise SystemExit("--branch-from trains from a checkpoint; --evaluate evaluates one: give one of them")
    if config["branch_from"] and not config["resume"] and checkpoint_path.exists():
        raise SystemExit(f"--branch-from starts a run of its own, but {checkpoint_path} exists (--resume goes on)")
    resuming = config["resume"] and checkpoint_path.exists()
    source = config["evaluate"] or (checkpoint_path if resuming else None) or config["branch_from"] or None
    state = flags.load_checkpoint(source, "translation", ("model", "step", "vocabularies")) if source else None
    branching = bool(state) and source == config["branch_from"]
    if state:
        check_same_experiment(config, state["config"], source, BRANCH_SETTINGS if branching else ())
        if not config["evaluate"]:
            check_same_schedule(config, state["config"], state["step"], source)
    # Where the weights left the run that trained their first steps, and how that run trained them.
    if branching:
        trained = with_defaults(state["config"])
        config["branched_from"] = {"checkpoint": str(source), "step": state["step"]} | {
            key: trained[key] for key in BRANCH_SETTINGS
        }
    else:
        config["branched_from"] = with_defaults(state["config"]).get("branched_from") if state else None
    task, vocabulary_models = make_task(config, given_vocabularies(config, state, source))
    for path, vocabulary_model in zip(vocabulary_files(out, config), vocabulary_models, strict=True):
        path.write_bytes(vocabulary_model)
    print(
        f"{len(task.train)} training pairs, vocabularies {task.vocabularies[0].get_piece_size()} "
        f"{config['source_language']} / {task.vocabularies[1].get_piece_size()} {config['target_language']} "
        f"subwords (fingerprint {vocabulary_fingerprint(task.vocabularies)}); CPU kernels "
        f"{torch.backends.cpu.get_cpu_capability()}; test sets: "
        + ", ".join(f"{name} {len(p)}" for name, p in task.tests.items()),
        flush=True,
    )

    store, module = None, None
    if config["model"] == "memory":
        store = connect(config["memory"])
        if config["memory_name"] in {info.name for info in store.list_memories()}:
            store.delete_memory(config["memory_name"])  # this trainer owns its memory: fresh, or the checkpoint's
        if state:
            memory_file = pathlib.Path(source).parent / state["memory_file"]
            store.import_memory(config["memory_name"], memory_file, device=config["memory_device"])
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
            search_dtype=config["search_dtype"],
            device=config["memory_device"],
        )
    vocab = [v.get_piece_size() for v in task.vocabularies]
    model = Translator(
        *vocab,
        config["embedding_dim"],
        config["hidden"],
        config["dropout"],
        module,
        config["recall_gate"],
        config["tied_recall"],
        config["recall_mix"],
    ).to(config["device"])
    optimizer = torch.optim.Adam(model.parameters(), lr=config["learning_rate"])
    first_step, metrics = 1, []
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_torch_random_states(state)
        first_step, metrics = state["step"] + 1, state["metrics"]
        doing = "evaluating" if config["evaluate"] else "branched from" if branching else "resumed from"
        print(f"{doing} {source} after step {state['step']}")

    if not config["evaluate"]:
        train(config, model, optimizer, store, task, first_step, metrics, checkpoint_path, vocabulary_models)

    trained_steps = state["step"] if config["evaluate"] else config["steps"]
    trained_config = with_defaults(state["config"]) if config["evaluate"] else config
    results = final_evaluation(model, store, task, config, out, trained_steps, trained_config)
    (out / "evaluation.json").write_text(json.dumps(results, indent=2))
    print_evaluation(results)
    if not config["evaluate"]:
        print(f"\nplot: {out / 'bleu.png'}   metrics: {out / 'metrics.jsonl'}")
    if store is not None:
        store.delete_memory(config["memory_name"])
        store.close()


if __name__ == "__main__":
    flags.run(main)
