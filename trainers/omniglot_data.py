"""Omniglot (Lake et al. 2015) for episodic one-shot training, read straight from the upstream zips.

The 32,460 PNGs are decoded once, resized to 28x28 (bilinear, as the reference
code) and cached as one .npz per archive in the user's cache directory
(``$LMEM_CACHE_DIR``, else ``$XDG_CACHE_HOME/lifelong-memory``, else
``~/.cache/lifelong-memory``); later runs load the cache in well under a second.

Two splits:
- ``reference``: the authors' code. Training: the 964 background characters,
  each rotated by 0/90/180/270 degrees, every rotation a class (3,856 classes).
  Test: the 659 evaluation characters, unrotated.
- ``paper``: Table 1 of the paper, after Vinyals et al. (2016): all 1,623
  characters, the first 1,200 (background then evaluation, in archive order)
  for training and the other 423 for testing, both augmented by the four
  rotations as classes of their own (4,800 / 1,692 classes).

Two model inputs: ``ink`` (ours: float32 in [0, 1], ink = 1 on a 0 background)
and ``raw`` (the authors' code: the 0-255 pixels as float32, background 255).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pathlib
import re
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

UPSTREAM = "https://github.com/brendenlake/omniglot/raw/master/python/"
ARCHIVES = ("images_background.zip", "images_evaluation.zip")
LAKE_RUNS = "all_runs.zip"
IMAGE_SIZE = 28
DRAWERS = 20
PAPER_TRAIN_CHARACTERS = 1200


@dataclass
class Characters:
    """Images [characters, 20 drawers, 28, 28] uint8 (255 = background) and their names."""

    images: np.ndarray
    names: list[str]  # "Alphabet/characterNN"


INPUTS = ("ink", "raw")


@dataclass
class Split:
    """Classes [classes, 20, 28, 28] float32, as ``as_model_input`` makes them."""

    train: np.ndarray
    test: np.ndarray


def cache_dir() -> pathlib.Path:
    if os.environ.get("LMEM_CACHE_DIR"):
        return pathlib.Path(os.environ["LMEM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "lifelong-memory"


def download(data_dir: pathlib.Path, names=(*ARCHIVES, LAKE_RUNS)) -> None:
    """Fetch missing archives from the upstream repository (needs a network)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        target = data_dir / name
        if not target.exists():
            print(f"downloading {UPSTREAM}{name}", file=sys.stderr)
            with _unique_partial(target) as partial:  # two processes may fetch at once: each its own file
                urllib.request.urlretrieve(UPSTREAM + name, partial)
                os.replace(partial, target)


def require(data_dir: pathlib.Path, name: str) -> pathlib.Path:
    path = data_dir / name
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found. Get the Omniglot archives from {UPSTREAM} (or pass --download), "
            "or point --data at a folder that holds them."
        )
    return path


def to_28(png: bytes) -> np.ndarray:
    """One 105x105 1-bit PNG as a 28x28 uint8 image, bilinear, as the reference preprocessing."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("L")
    return np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR), dtype=np.uint8)


def load_characters(archive: pathlib.Path, progress: bool = True) -> Characters:
    """All characters of one archive, decoded once and then served from the cache."""
    fingerprint = hashlib.sha256(archive.read_bytes()).hexdigest()[:16]  # a changed archive is decoded anew
    cached = cache_dir() / f"omniglot-{archive.stem}-{fingerprint}.npz"
    if cached.exists():
        with np.load(cached) as data:
            return Characters(data["images"], list(data["names"]))

    with zipfile.ZipFile(archive) as zipped:
        pngs = sorted(n for n in zipped.namelist() if n.endswith(".png"))
        by_character: dict[str, list[str]] = {}
        for name in pngs:
            alphabet, character = name.split("/")[-3:-1]
            by_character.setdefault(f"{alphabet}/{character}", []).append(name)
        names = sorted(by_character)
        images = np.empty((len(names), DRAWERS, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
        bar = tqdm(total=len(pngs), desc=f"preparing {archive.name}", unit="img", disable=not progress)
        for c, character in enumerate(names):
            files = sorted(by_character[character], key=lambda n: int(re.search(r"_(\d+)\.png$", n).group(1)))
            if len(files) != DRAWERS:
                raise ValueError(f"{archive}: {character} has {len(files)} drawings, expected {DRAWERS}")
            for d, name in enumerate(files):
                images[c, d] = to_28(zipped.read(name))
                bar.update()
        bar.close()

    cached.parent.mkdir(parents=True, exist_ok=True)
    with _unique_partial(cached) as partial:
        with open(partial, "wb") as f:
            np.savez(f, images=images, names=np.array(names))
        os.replace(partial, cached)
    return Characters(images, names)


@contextlib.contextmanager
def _unique_partial(target: pathlib.Path):
    """A temporary path beside ``target``, unique to this call, removed unless it was moved into place."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    try:
        yield name
    finally:
        pathlib.Path(name).unlink(missing_ok=True)


def with_rotations(images: np.ndarray) -> np.ndarray:
    """[C, 20, H, W] -> [4C, 20, H, W]: each character at 0/90/180/270 degrees, each a class."""
    rotated = [np.rot90(images, k, axes=(2, 3)) for k in range(4)]
    return np.stack(rotated, axis=1).reshape(-1, *images.shape[1:])


def as_model_input(images: np.ndarray, input: str = "ink") -> np.ndarray:
    """uint8 with white background -> float32: "ink" in [0, 1] with ink = 1, "raw" the pixels unchanged."""
    if input == "ink":
        return (1.0 - images.astype(np.float32) / 255.0).astype(np.float32)
    if input == "raw":
        return images.astype(np.float32)
    raise ValueError(f"input must be one of {INPUTS}, got {input!r}")


def load_split(data_dir: pathlib.Path, split: str = "reference", input: str = "ink", progress: bool = True) -> Split:
    background = load_characters(require(data_dir, ARCHIVES[0]), progress)
    evaluation = load_characters(require(data_dir, ARCHIVES[1]), progress)
    if split == "reference":
        train, test = with_rotations(background.images), evaluation.images
    elif split == "paper":
        everything = np.concatenate([background.images, evaluation.images])
        train = with_rotations(everything[:PAPER_TRAIN_CHARACTERS])
        test = with_rotations(everything[PAPER_TRAIN_CHARACTERS:])
    else:
        raise ValueError(f"split must be 'reference' or 'paper', got {split!r}")
    return Split(as_model_input(train, input), as_model_input(test, input))


@dataclass
class LakeRun:
    """One of Lake et al.'s 20-way within-alphabet runs: 20 training images (one per class), 20 tests."""

    train: np.ndarray  # [20, 28, 28] float32
    test: np.ndarray  # [20, 28, 28] float32
    answers: np.ndarray  # [20] int64: index into train of each test item's class


def load_lake_runs(data_dir: pathlib.Path, input: str = "ink") -> list[LakeRun]:
    runs = []
    with zipfile.ZipFile(require(data_dir, LAKE_RUNS)) as zipped:
        folders = sorted({n.split("/")[0] for n in zipped.namelist() if n.startswith("run")})
        for folder in folders:
            pairs = [line.split() for line in zipped.read(f"{folder}/class_labels.txt").decode().splitlines() if line]
            train_names = sorted({train for _, train in pairs})
            train = np.stack([to_28(zipped.read(name)) for name in train_names])
            test = np.stack([to_28(zipped.read(test)) for test, _ in pairs])
            answers = np.array([train_names.index(train_name) for _, train_name in pairs])
            runs.append(LakeRun(as_model_input(train, input), as_model_input(test, input), answers))
    return runs


def sample_episodes(classes: np.ndarray, batch: int, width: int, length: int, rng: np.random.Generator):
    """A batch of episodes as in the reference trainer.

    Each episode draws ``width`` classes and shows each about ``length / width``
    distinct drawings; every class is shown once before any is shown twice.
    Labels are local to the episode and disjoint across the batch
    (episode b uses b * width .. b * width + width - 1).
    Returns images [length, batch, 28, 28] and labels [length, batch] int64.
    """
    images = np.empty((length, batch, *classes.shape[2:]), dtype=classes.dtype)
    labels = np.empty((length, batch), dtype=np.int64)
    per_class = [length // width + (1 if i >= width - length % width else 0) for i in range(width)]
    for b in range(batch):
        chosen = rng.choice(len(classes), size=width, replace=False)
        shown = [
            (appearance, rng.random(), local, drawer)
            for local, (c, count) in enumerate(zip(chosen, per_class, strict=True))
            for appearance, drawer in enumerate(rng.choice(DRAWERS, size=count, replace=False))
        ]
        shown.sort()  # by appearance, random order within an appearance
        for t, (_, _, local, drawer) in enumerate(shown):
            images[t, b] = classes[chosen[local], drawer]
            labels[t, b] = b * width + local
    return images, labels
