"""The Omniglot trainer: data, episodes, a tiny training run, and local == remote."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from lifelong_memory.client import MemoryModule, connect
from lifelong_memory.trainers import omniglot, omniglot_data

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
pytestmark = pytest.mark.skipif(not DATA.exists(), reason=f"Omniglot archives not at {DATA}")


@pytest.fixture(scope="module")
def characters(tmp_path_factory):
    os.environ["LMEM_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    try:
        background = omniglot_data.load_characters(DATA / "images_background.zip", progress=False)
        evaluation = omniglot_data.load_characters(DATA / "images_evaluation.zip", progress=False)
        cached = omniglot_data.load_characters(DATA / "images_background.zip", progress=False)
        yield background, evaluation, cached
    finally:
        del os.environ["LMEM_CACHE_DIR"]


def test_archives_hold_964_and_659_characters_of_20_drawers(characters):
    background, evaluation, cached = characters
    assert background.images.shape == (964, 20, 28, 28)
    assert evaluation.images.shape == (659, 20, 28, 28)
    assert len({n.split("/")[0] for n in background.names}) == 30
    assert len({n.split("/")[0] for n in evaluation.names}) == 20
    # Strokes are dark on white, and every drawing has some ink.
    assert background.images.max() == 255 and (background.images.min(axis=(2, 3)) < 255).all()
    np.testing.assert_array_equal(cached.images, background.images)  # served from the cache


def test_splits_and_rotations(characters):
    background, evaluation, _ = characters
    rotated = omniglot_data.with_rotations(background.images[:3])
    assert rotated.shape == (12, 20, 28, 28)
    np.testing.assert_array_equal(rotated[1], np.rot90(background.images[0], 1, axes=(1, 2)))
    np.testing.assert_array_equal(rotated[4], background.images[1])
    x = omniglot_data.as_model_input(background.images[:1])
    assert x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1


def test_raw_input_is_the_authors_pixels_and_ink_input_is_ours(characters):
    background, _, _ = characters
    images = background.images[:5]
    raw = omniglot_data.as_model_input(images, "raw")
    ink = omniglot_data.as_model_input(images, "ink")
    assert raw.dtype == ink.dtype == np.float32
    np.testing.assert_array_equal(raw, images)  # 0-255 as the authors feed them
    assert np.median(raw) == 255 and raw.min() < 50, "white background, dark strokes"
    assert np.median(ink) == 0 and ink.max() > 0.8 and ink.min() >= 0, "0 background, ink towards 1"
    np.testing.assert_allclose(ink, 1 - raw / 255, atol=1e-6)
    with pytest.raises(ValueError, match="input must be one of"):
        omniglot_data.as_model_input(images, "scaled")


def test_split_sizes_and_composition(characters):
    background, evaluation, _ = characters
    reference = omniglot_data.load_split(DATA, "reference", "raw", progress=False)
    assert reference.train.shape == (964 * 4, 20, 28, 28) and reference.test.shape == (659, 20, 28, 28)
    np.testing.assert_array_equal(reference.test, evaluation.images)
    del reference
    paper = omniglot_data.load_split(DATA, "paper", "raw", progress=False)
    assert paper.train.shape == (1200 * 4, 20, 28, 28) and paper.test.shape == (423 * 4, 20, 28, 28)
    # Training: the 964 background characters, then the first 236 evaluation ones, each at four rotations.
    np.testing.assert_array_equal(paper.train[:4], omniglot_data.with_rotations(background.images[:1]))
    np.testing.assert_array_equal(paper.train[-4:], omniglot_data.with_rotations(evaluation.images[235:236]))
    # Test: the remaining 423 evaluation characters, each at four rotations.
    np.testing.assert_array_equal(paper.test, omniglot_data.with_rotations(evaluation.images[236:]))


@pytest.mark.parametrize(
    ("init", "expected_std"),
    # He-normal: sqrt(2 / fan_in) per layer. The authors': a normal of std 0.1 redrawn beyond 2 std,
    # whose std is 0.1 * 0.8796.
    [("he", None), ("authors", 0.1 * 0.8796)],
)
def test_encoder_initialisation(init, expected_std):
    torch.manual_seed(0)
    encoder = omniglot.Encoder(rep_dim=128, dropout_keep=1.0, init=init)
    layers = [m for m in encoder.features if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 5
    for layer in layers:
        weight = layer.weight.detach()
        fan_in = weight[0].numel()
        std = expected_std or (2 / fan_in) ** 0.5
        assert float(weight.std()) == pytest.approx(std, rel=0.1), (init, layer)
        assert torch.count_nonzero(layer.bias) == 0
        if init == "authors":
            assert float(weight.abs().max()) <= 0.2
    with pytest.raises(ValueError, match="init must be"):
        omniglot.Encoder(rep_dim=8, dropout_keep=1.0, init="xavier")


@pytest.mark.parametrize(
    ("init", "input", "low", "high"),
    [("authors", "raw", 0.95, 1.0), ("he", "raw", 0.95, 1.0), ("authors", "ink", 0.5, 0.9), ("he", "ink", 0.5, 0.9)],
)
def test_raw_input_starts_with_nearly_parallel_queries(characters, init, input, low, high):
    """Why the authors' curve starts flat: at initialisation, with raw input (white background) under either
    initialisation, all test characters get nearly the same query; with ink input they are spread."""
    _, evaluation, _ = characters
    torch.manual_seed(0)
    encoder = omniglot.Encoder(rep_dim=128, dropout_keep=1.0, init=init).eval()
    module = MemoryModule(connect("local"), 128, name=f"cosine-{init}", memory_size=64, choose_k=8)
    with torch.no_grad():
        queries = module.project(
            encoder(torch.from_numpy(omniglot_data.as_model_input(evaluation.images[:40, 0], input)))
        )
    cosine = queries @ queries.T
    mean_pairwise = float((cosine.sum() - cosine.diagonal().sum()) / (40 * 39))
    assert low <= mean_pairwise <= high


def test_flags_are_exactly_the_config_values():
    config = omniglot.configure(["--rep-dim", "256", "--no-resume"])
    assert config["rep_dim"] == 256 and config["resume"] is False
    assert not [key for key in config if key.startswith("_")]  # the module's __name__, __doc__, ... are no options
    assert {"data", "split", "seed", "episode_batches", "evaluate"} <= set(config)


def test_the_resnet_is_another_model_of_the_same_interface():
    torch.manual_seed(0)
    images = torch.rand(5, 28, 28)
    resnet = omniglot.build_encoder("resnet", 64, dropout_keep=1.0).eval()
    convnet = omniglot.build_encoder("convnet", 64, dropout_keep=1.0).eval()
    assert resnet(images).shape == convnet(images).shape == (5, 64)
    assert {type(m) for m in resnet.modules()} >= {omniglot.ResidualBlock, torch.nn.GroupNorm}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in resnet.modules())  # same function in eval and train
    resnet.train()  # in training too, no statistics across the batch: a drawing's key is its own
    assert torch.allclose(resnet(images[:2]), resnet(images)[:2], atol=1e-5)
    with pytest.raises(ValueError, match="--init authors is the convnet's"):
        omniglot.build_encoder("resnet", 64, 1.0, init="authors")
    with pytest.raises(ValueError, match="encoder must be 'convnet' or 'resnet', got 'vit'"):
        omniglot.build_encoder("vit", 64, 1.0)


def test_a_checkpoint_is_only_resumed_or_evaluated_under_its_own_settings():
    config = {"split": "reference", "input": "ink", "init": "he", "rep_dim": 128, "adam": "torch", "backend": "torch",
              "encoder": "convnet", "ivf_lists": 0, "ivf_probes": 0, "retrain_index_every": 0}  # fmt: skip
    omniglot.check_same_experiment(config, {"split": "reference", "rep_dim": 128}, "old.pt")  # before the options
    omniglot.check_same_experiment(config, dict(config), "same.pt")
    with pytest.raises(SystemExit, match=r"run.pt was trained with --input raw \(given ink\), --init authors"):
        omniglot.check_same_experiment(config, {**config, "input": "raw", "init": "authors"}, "run.pt")
    with pytest.raises(SystemExit, match=r"run.pt was trained with --encoder resnet \(given convnet\)"):
        omniglot.check_same_experiment(config, {**config, "encoder": "resnet"}, "run.pt")
    with pytest.raises(SystemExit, match=r"run.pt was trained with --adam tensorflow \(given torch\)"):
        omniglot.check_same_experiment(config, {**config, "adam": "tensorflow"}, "run.pt")
    with pytest.raises(SystemExit, match=r"run.pt was trained with --backend lsh \(given torch\)"):
        omniglot.check_same_experiment(config, {**config, "backend": "lsh"}, "run.pt")
    with pytest.raises(SystemExit, match=r"run.pt was trained with --ivf-lists 4 \(given 0\)"):
        omniglot.check_same_experiment(config, {**config, "ivf_lists": 4}, "run.pt")


def tensorflow_adam_reference(theta, gradients, lr, eps, beta1=0.9, beta2=0.999):
    """TensorFlow 1's ApplyAdam, written out in float64: lr_t = lr sqrt(1 - beta2^t) / (1 - beta1^t),
    theta -= lr_t m / (sqrt(v) + eps)."""
    m, v, trajectory = np.zeros_like(theta), np.zeros_like(theta), []
    for t, g in enumerate(gradients, start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        theta = theta - lr * np.sqrt(1 - beta2**t) / (1 - beta1**t) * m / (np.sqrt(v) + eps)
        trajectory.append(theta)
    return trajectory


@pytest.mark.parametrize("kind", ["tensorflow", "torch"])
def test_tensorflow_adam_takes_tensorflow_1s_steps(kind):
    """Gradients of about the size of epsilon, where the two placements differ most: --adam tensorflow
    follows TF 1's formula step by step, torch's Adam does not."""
    rng = np.random.default_rng(0)
    theta0 = rng.normal(size=50)
    gradients = [rng.normal(scale=1e-3, size=50) * rng.choice([1e-2, 1.0, 1e2], size=50) for _ in range(40)]
    weight = torch.nn.Parameter(torch.tensor(theta0))
    optimizer = omniglot.make_optimizer([weight], kind, lr=1e-2, eps=1e-4)
    expected = tensorflow_adam_reference(theta0, gradients, lr=1e-2, eps=1e-4)
    errors = []
    for g, theta in zip(gradients, expected, strict=True):
        weight.grad = torch.tensor(g)
        optimizer.step()
        errors.append(np.abs(weight.detach().numpy() - theta).max() / np.abs(theta - theta0).max())
    if kind == "tensorflow":
        assert max(errors) < 1e-9, errors
    else:
        assert max(errors) > 0.1, "torch's placement differs from TF 1's at these gradients"


def test_tensorflow_adam_resumes_at_its_step_count():
    """The epsilon follows the step count a checkpoint restores, not the optimiser object's age."""
    rng = np.random.default_rng(1)
    gradients = [rng.normal(scale=1e-4, size=8) for _ in range(6)]
    straight = torch.nn.Parameter(torch.zeros(8, dtype=torch.float64))
    optimizer = omniglot.make_optimizer([straight], "tensorflow", lr=1e-2, eps=1e-4)
    for g in gradients:
        straight.grad = torch.tensor(g)
        optimizer.step()
    resumed = torch.nn.Parameter(torch.zeros(8, dtype=torch.float64))
    first = omniglot.make_optimizer([resumed], "tensorflow", lr=1e-2, eps=1e-4)
    for g in gradients[:3]:
        resumed.grad = torch.tensor(g)
        first.step()
    second = omniglot.make_optimizer([resumed], "tensorflow", lr=1e-2, eps=1e-4)
    second.load_state_dict(first.state_dict())
    for g in gradients[3:]:
        resumed.grad = torch.tensor(g)
        second.step()
    torch.testing.assert_close(resumed, straight, rtol=0, atol=1e-15)


def test_episodes_follow_the_reference_protocol():
    classes = np.arange(40 * 20, dtype=np.float32).reshape(40, 20, 1, 1)  # each image names its class and drawer
    rng = np.random.default_rng(0)
    images, labels = omniglot_data.sample_episodes(classes, batch=16, width=5, length=32, rng=rng)
    assert images.shape == (32, 16, 1, 1) and labels.shape == (32, 16)
    for b in range(16):
        episode = labels[:, b]
        assert set(episode) == set(range(5 * b, 5 * b + 5)), "labels are local and disjoint across the batch"
        shots = omniglot.shot_counts(labels[:, b : b + 1])[:, 0]
        assert (np.diff(shots) >= 0).all(), "every class is shown once before any is shown twice"
        assert sorted(np.bincount(episode - 5 * b)) == [6, 6, 6, 7, 7]
        drawn = images[:, b, 0, 0].astype(int)
        classes_of = drawn // 20
        for label in range(5 * b, 5 * b + 5):
            assert len(set(classes_of[episode == label])) == 1, "one class per label"
            assert len(set(drawn[episode == label])) == (episode == label).sum(), "distinct drawings"


def tiny_setup(url: str, seed: int = 0):
    torch.manual_seed(seed)
    store = connect(url)
    encoder = omniglot.Encoder(rep_dim=64, dropout_keep=1.0)
    module = MemoryModule(store, 64, name=f"tiny-{seed}", memory_size=256, choose_k=32, seed=seed)
    eval_memory = store.create_memory(f"tiny-eval-{seed}", key_dim=64, memory_size=256, choose_k=32, seed=seed)
    optimizer = torch.optim.Adam([*encoder.parameters(), *module.parameters()], lr=1e-4, eps=1e-4)
    return store, encoder, module, eval_memory, optimizer


def test_a_tiny_run_learns_above_chance(characters):
    """Ten characters, 20 small episode batches: 1-shot accuracy climbs well above 5-way chance (0.2)."""
    background, _, _ = characters
    classes = omniglot_data.as_model_input(background.images[:10])
    store, encoder, module, eval_memory, optimizer = tiny_setup("local")
    rng = np.random.default_rng(0)

    def one_shot() -> float:
        episodes = omniglot.evaluate_episodes(
            encoder, module, eval_memory, classes, 5, 10, 30, np.random.default_rng(9)
        )
        return float(np.nanmean(episodes[:, 1]))

    before = one_shot()
    losses = []
    for _ in range(20):
        images, labels = omniglot_data.sample_episodes(classes, 4, 5, 10, rng)
        losses.append(omniglot.train_episode_batch(encoder, module, optimizer, images, labels, clip=5.0))
    after = one_shot()
    store.close()
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
    assert after >= 0.2 + 0.4, f"1-shot accuracy {after:.3f} is not clearly above 5-way chance"
    assert after >= before + 0.15, (before, after)


def test_local_and_remote_memory_give_the_same_training(characters, server_url):
    background, _, _ = characters
    classes = omniglot_data.as_model_input(background.images[:30])
    results = []
    for url in ("local", server_url):
        store, encoder, module, _, optimizer = tiny_setup(url, seed=3)
        rng = np.random.default_rng(1)
        losses = [
            omniglot.train_episode_batch(
                encoder, module, optimizer, *omniglot_data.sample_episodes(classes, 2, 5, 6, rng), 5.0
            )
            for _ in range(2)
        ]
        results.append((losses, [p.detach().clone() for p in encoder.parameters()]))
        store.delete_memory("tiny-3")
        store.delete_memory("tiny-eval-3")
        store.close()
    (local_losses, local_params), (remote_losses, remote_params) = results
    np.testing.assert_allclose(local_losses, remote_losses, rtol=0, atol=1e-6)
    for a, b in zip(local_params, remote_params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def run_trainer(out: pathlib.Path, cache: pathlib.Path, *flags: str) -> list[dict]:
    tiny = ["--data", str(DATA), "--out-dir", str(out), "--rep-dim", "32", "--batch-episodes", "2",
            "--episode-length", "10", "--memory-size", "128", "--choose-k", "16", "--validate-every", "1",
            "--validation-episodes", "2", "--evaluation-episodes", "2", "--checkpoint-every", "1"]  # fmt: skip
    env = {**os.environ, "LMEM_CACHE_DIR": str(cache)}
    subprocess.run([sys.executable, "-m", "lifelong_memory.trainers.omniglot", *tiny, *flags], check=True, env=env,
                   capture_output=True, timeout=300)  # fmt: skip
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "setting",
    [
        (),
        ("--init", "authors", "--input", "raw"),
        ("--backend", "lsh"),
        ("--backend", "faiss-ivf", "--ivf-lists", "2", "--ivf-probes", "1", "--retrain-index-every", "1"),
        ("--encoder", "resnet"),
    ],
    ids=["ours", "authors", "lsh", "faiss-ivf-retrained", "resnet"],
)
def test_resume_continues_exactly_where_the_run_stopped(tmp_path, setting):
    straight = run_trainer(tmp_path / "straight", tmp_path / "cache", *setting, "--episode-batches", "3")
    run_trainer(tmp_path / "resumed", tmp_path / "cache", *setting, "--episode-batches", "2")
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:  # a validation logged after the last checkpoint
        f.write(json.dumps({"episode_batch": 3, "train_loss": 9.0, "shots": []}) + "\n")
    resumed = run_trainer(tmp_path / "resumed", tmp_path / "cache", *setting, "--episode-batches", "3", "--resume")
    assert [m["episode_batch"] for m in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["shots"] == pytest.approx(b["shots"], abs=1e-9, nan_ok=True)
    assert (tmp_path / "resumed" / "accuracy.png").stat().st_size > 0
    evaluation = json.loads((tmp_path / "resumed" / "evaluation.json").read_text())
    assert set(evaluation) >= {"5-way", "20-way", "lake_20way_within_alphabet"}


def test_the_agreement_benchmark_finds_an_exhaustive_ivf_exact_and_one_probe_not(tmp_path):
    run_trainer(tmp_path / "run", tmp_path / "cache", "--episode-batches", "1")
    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "omniglot_agreement.py"
    shares = {}
    for probes in (2, 1):
        out = tmp_path / f"agreement-{probes}.json"
        command = [sys.executable, str(script), "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"),
                   "--data", str(DATA), "--ivf-lists", "2", "--ivf-probes", str(probes), "--batches", "3",
                   "--out", str(out)]  # fmt: skip
        env = {**os.environ, "LMEM_CACHE_DIR": str(tmp_path / "cache")}
        subprocess.run(command, check=True, env=env, capture_output=True, timeout=300)
        report = json.loads(out.read_text())
        assert report["rows"] == 3 * 10 * 2 and report["config"]["ivf_probes"] == probes
        shares[probes] = report["same_as_exact"]
    assert set(shares[2].values()) == {1.0}  # every list probed: the exact answers
    assert shares[1]["positive_and_negative"] < 1.0
