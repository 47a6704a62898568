"""The synthetic rare-symbol trainer: the task's data, a tiny run above chance, exact resume, local == remote."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from lifelong_memory.trainers import synthetic

CONFIG = {"seed": 3, "digits": 7, "train_sequences": 2000, "validation_sequences": 100, "test_sequences": 300,
          "min_length": 8, "max_length": 40}  # fmt: skip


def test_the_task_is_deterministic_and_as_the_paper_describes():
    f, train, validation, test = synthetic.make_task(CONFIG)
    f_again, train_again, _, test_again = synthetic.make_task(CONFIG)
    np.testing.assert_array_equal(f, f_again)
    np.testing.assert_array_equal(train.inputs, train_again.inputs)
    np.testing.assert_array_equal(test.targets, test_again.targets)
    assert len(f) == 4**7 and len(train) == 2000 and len(validation) == 100 and len(test) == 300
    for sequences in (train, validation, test):
        for i in range(len(sequences)):
            length = sequences.lengths[i]
            x, y = sequences.inputs[i], sequences.targets[i]
            assert 8 <= length <= 40 and (x[length:] == synthetic.PAD).all() and (x[:length] != synthetic.PAD).all()
            block = np.flatnonzero(x >= synthetic.DIGIT)
            assert len(block) == 7 and (np.diff(block) == 1).all(), "one continuous block of 7 digits"
            assert ((x[:length] == synthetic.A) | (x[:length] == synthetic.B) | (x[:length] >= synthetic.DIGIT)).all()
            symbol = int("".join(str(d - synthetic.DIGIT) for d in x[block]), 4)
            assert symbol == sequences.symbols[i]
            assert int("".join(str(d - synthetic.DIGIT) for d in y[block]), 4) == f[symbol]
            outside = np.ones(len(x), dtype=bool)
            outside[block] = False
            np.testing.assert_array_equal(y[outside], x[outside])


def test_no_two_sets_share_a_sequence_and_test_items_know_how_often_x_was_seen():
    _, train, validation, test = synthetic.make_task(CONFIG)
    sets = [{row.tobytes() for row in s.inputs} for s in (train, validation, test)]
    assert not sets[0] & sets[1] and not sets[0] & sets[2] and not sets[1] & sets[2]
    assert len(sets[2]) == len(test), "no repeated test sequence"
    counts = np.bincount(train.symbols, minlength=4**7)
    np.testing.assert_array_equal(test.seen, counts[test.symbols])
    np.testing.assert_array_equal(train.seen, counts[train.symbols])
    # Short sequences have few A/B contexts; the redraw still finds new ones instead of repeating training ones.
    # 256 sequences exist at this size: the training set takes most, the rest are found, and asking for
    # more than exist is refused instead of searched for ever.
    short = {**CONFIG, "digits": 2, "min_length": 3, "max_length": 4, "train_sequences": 200,
             "validation_sequences": 20, "test_sequences": 20}  # fmt: skip
    _, train, validation, test = synthetic.make_task(short)
    held_out = {r.tobytes() for r in validation.inputs} | {r.tobytes() for r in test.inputs}
    assert len(held_out) == 40 and not {r.tobytes() for r in train.inputs} & held_out
    with pytest.raises(ValueError, match="found .* of 200 held-out sequences"):
        synthetic.make_task({**short, "test_sequences": 200})


def test_epoch_batches_cover_the_training_set_once_and_depend_only_on_seed_and_epoch():
    lengths = np.random.default_rng(0).integers(8, 41, 1000)
    batches = synthetic.epoch_batches(1000, 64, seed=0, epoch=2, lengths=lengths)
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(1000))
    again = synthetic.epoch_batches(1000, 64, seed=0, epoch=2, lengths=lengths)
    assert all((a == b).all() for a, b in zip(batches, again, strict=True))
    other = synthetic.epoch_batches(1000, 64, seed=0, epoch=3, lengths=lengths)
    assert not all(len(a) == len(b) and (a == b).all() for a, b in zip(batches, other, strict=True))


def test_flags_are_the_config_values_only(monkeypatch):
    """Module attributes such as __name__ and __doc__ are strings too; they are no options."""
    monkeypatch.setattr(sys, "argv", ["synthetic"])
    config = synthetic.configure()
    # argparse would name a flag ----name-- "name__": every option must be one of the module's config values.
    assert [key for key in config if not hasattr(synthetic, key)] == []
    assert config["memory_size"] == synthetic.memory_size and config["model"] == "memory"


def test_a_checkpoint_is_only_resumed_or_evaluated_under_its_own_settings():
    config = {key: 1 for key in synthetic.EXPERIMENT_SETTINGS}
    synthetic.check_same_experiment(config, dict(config), "same.pt")
    with pytest.raises(SystemExit, match=r"run.pt was trained with --memory-size 2 \(given 1\)"):
        synthetic.check_same_experiment(config, {**config, "memory_size": 2}, "run.pt")


@pytest.mark.parametrize("block_encoder", [True, False])
def test_the_block_encoders_query_is_the_same_for_the_same_x_in_any_context(block_encoder):
    """What lets a test item find its x's entry from training: with the block encoder the query depends on x
    alone; the attention-mixed state (--no-block-encoder) also carries the As and Bs around the block."""
    torch.manual_seed(0)
    model = synthetic.Seq2Seq(16, 32, 3, block_encoder=block_encoder).eval()
    A, B, D = synthetic.A, synthetic.B, synthetic.DIGIT
    inputs = torch.tensor([[A, D + 1, D + 2, D + 3, B, A, B], [B, B, A, B, D + 1, D + 2, D + 3], [A, D, D, D, B, A, B]])
    encoded = model.encode(inputs)
    if block_encoder:
        query = encoded[3]
    else:  # the decoder's attention-mixed state at the block's first digit, teacher forced
        starts = synthetic.block_positions(inputs) == 0
        decoded, _ = model.decoder(model.embed(synthetic.teacher_forced(inputs)))
        context = torch.softmax(decoded @ encoded[0].transpose(1, 2), dim=-1) @ encoded[1]
        query = torch.tanh(model.mix(torch.cat([decoded, context], dim=-1)))[starts]
    same_x, other_x = (query[0] - query[1]).abs().max(), (query[0] - query[2]).abs().max()
    assert other_x > 1e-3
    assert (same_x == 0) == block_encoder, (same_x, other_x)


# A task small enough to learn in seconds: 3 digits (64 symbols), each seen about 16 times in training.
TINY = ["--digits", "3", "--train-sequences", "1000", "--validation-sequences", "100", "--test-sequences", "200",
        "--min-length", "4", "--max-length", "8", "--embedding-dim", "16", "--hidden", "32", "--key-dim", "16",
        "--memory-size", "512", "--choose-k", "8", "--batch-size", "50", "--learning-rate", "0.01",
        "--validate-every", "20", "--checkpoint-every", "20", "--threads", "1"]  # fmt: skip


def run_trainer(out: pathlib.Path, *flags: str) -> tuple[list[dict], dict]:
    subprocess.run([sys.executable, "-m", "lifelong_memory.trainers.synthetic", *TINY, "--out-dir", str(out), *flags],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return metrics, json.loads((out / "evaluation.json").read_text())


@pytest.mark.parametrize("design", [["--model", "baseline"], ["--model", "memory"], ["--no-block-encoder"]])
def test_a_tiny_run_learns_above_chance(tmp_path, design):
    metrics, evaluation = run_trainer(tmp_path, *design, "--epochs", "10")
    seen = evaluation["test"]["3+"]
    assert seen["n"] == 200
    # Chance: a quarter of the digits, one block in 4^3 = 64.
    assert seen["digit"]["ci95"][0] > 0.25 + 0.1, seen
    assert seen["block"]["mean"] > 3 / 64, seen
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"] / 2
    assert (tmp_path / "accuracy.png").stat().st_size > 0


def test_resume_continues_exactly_where_the_run_stopped(tmp_path):
    straight, straight_evaluation = run_trainer(tmp_path / "straight", "--epochs", "3")
    run_trainer(tmp_path / "resumed", "--epochs", "2")
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:  # a validation logged after the last checkpoint
        f.write(json.dumps({"step": 99, "train_loss": 9.0}) + "\n")
    resumed, resumed_evaluation = run_trainer(tmp_path / "resumed", "--epochs", "3", "--resume")
    assert [m["step"] for m in resumed] == [m["step"] for m in straight] == [20, 40, 60]
    for a, b in zip(straight, resumed, strict=True):
        assert (a["train_loss"], a["memory_loss"], a["validation"]) == (
            b["train_loss"],
            b["memory_loss"],
            b["validation"],
        )
    assert straight_evaluation == resumed_evaluation
    assert [p.name for p in (tmp_path / "resumed").glob("memory-*.lmem")] == ["memory-60.lmem"]


def test_a_memory_served_over_grpc_gives_the_same_numbers(tmp_path, server_url):
    # The server searches in this process: with the trainer's one thread, as the embedded memory does. (Early in
    # training the queries are nearly parallel, and a product summed in another order can rank near-ties apart.)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local, local_evaluation = run_trainer(tmp_path / "local", "--epochs", "2")
        remote, remote_evaluation = run_trainer(tmp_path / "remote", "--epochs", "2", "--memory", server_url)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(local, remote, strict=True):
        assert (a["train_loss"], a["memory_loss"], a["validation"]) == (
            b["train_loss"],
            b["memory_loss"],
            b["validation"],
        )
    assert local_evaluation == remote_evaluation
