"""What a trainer's command line says when it is given a path, a checkpoint or a memory it cannot use: one line
naming it, not a traceback."""

from __future__ import annotations

import sys

import pytest
import torch

from lifelong_memory.client import Unavailable
from lifelong_memory.trainers import flags, lifelong, omniglot, synthetic, translation


def command_line(trainer, monkeypatch, *args: str):
    """``trainer``'s main with ``args`` as its command line (some mains read sys.argv only)."""
    monkeypatch.setattr(sys, "argv", [trainer.__name__, *args])
    flags.run(trainer.main)


@pytest.mark.parametrize("trainer", [omniglot, synthetic, translation])
def test_a_checkpoint_that_is_not_there_is_named(trainer, tmp_path, monkeypatch):
    missing = tmp_path / "nope.pt"
    with pytest.raises(SystemExit, match=f"{missing}: no such checkpoint"):
        command_line(trainer, monkeypatch, "--evaluate", str(missing), "--out-dir", str(tmp_path / "out"))


@pytest.mark.parametrize(
    "trainer, name, lacks",
    [
        (omniglot, "omniglot", "memory_module, episode_batch"),
        (synthetic, "synthetic", "digits"),
        (translation, "translation", "vocabularies"),
    ],
)
def test_another_trainer_s_checkpoint_is_refused_naming_the_trainer(trainer, name, lacks, tmp_path, monkeypatch):
    other = tmp_path / "other.pt"  # a lifelong run's checkpoint has an encoder, a model-less step and no digits
    torch.save({"config": {}, "encoder": {}, "model": {}, "step": 3, "seen": []}, other)
    with pytest.raises(SystemExit, match=f"{other}: not a checkpoint of the {name} trainer \\(it holds no {lacks}\\)"):
        command_line(trainer, monkeypatch, "--evaluate", str(other), "--out-dir", str(tmp_path / "out"))


def test_resuming_a_lifelong_run_whose_embedded_memory_was_not_kept_is_refused(tmp_path, monkeypatch):
    torch.save({}, tmp_path / "checkpoint.pt")
    with pytest.raises(SystemExit, match="--resume: an embedded memory without --data-dir ended with the run"):
        command_line(lifelong, monkeypatch, "--resume", "--out-dir", str(tmp_path))


def test_an_unreachable_memory_server_is_one_line():
    def training():
        raise Unavailable("failed to connect to all addresses; last error: 127.0.0.1:1")

    with pytest.raises(SystemExit, match="the memory answered UNAVAILABLE: failed to connect"):
        flags.run(training)
