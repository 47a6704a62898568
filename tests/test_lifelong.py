"""The lifelong trainer: a memory never cleared, resumed across runs, shared by two different models."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import shutil

import numpy as np
import pytest
import torch

from lifelong_memory.client import MemoryModule, connect
from lifelong_memory.trainers import lifelong, omniglot, omniglot_data

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["--data", str(DATA), "--classes", "20", "--batch", "8", "--rep-dim", "32", "--memory-size", "256",
        "--choose-k", "16", "--eval-every", "3", "--eval-classes", "20", "--checkpoint-every", "1"]  # fmt: skip


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    if not (DATA / omniglot_data.ARCHIVES[0]).exists():
        pytest.skip(f"no Omniglot archives in {DATA}")
    monkeypatch.setenv("LMEM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "omniglot-cache"))


def run(out: pathlib.Path, memory_dir: pathlib.Path, *flags: str) -> list[dict]:
    lifelong.main([*TINY, "--out-dir", str(out), "--data-dir", str(memory_dir), *flags])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def memory_state(memory_dir: pathlib.Path):
    with connect("local", data_dir=memory_dir) as store:
        return store.memory("lifelong").read_slots(range(256)), store.memory("lifelong").inspect()


def test_a_resumed_run_goes_on_exactly_and_the_memory_is_never_reset(tmp_path):
    straight = run(tmp_path / "straight", tmp_path / "straight-memory", "--steps", "6")
    run(tmp_path / "resumed", tmp_path / "resumed-memory", "--steps", "3")
    resumed = run(tmp_path / "resumed", tmp_path / "resumed-memory", "--steps", "6", "--resume")
    assert [m["step"] for m in straight] == [m["step"] for m in resumed] == [3, 6]
    for a, b in zip(straight, resumed, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["evaluation"] == b["evaluation"]
    (slots_a, report_a), (slots_b, report_b) = (
        memory_state(tmp_path / "straight-memory"),
        memory_state(tmp_path / "resumed-memory"),
    )
    assert report_a.commit_sequence == report_b.commit_sequence == 6  # one update per step, never a clear
    assert torch.equal(slots_a.keys, slots_b.keys) and torch.equal(slots_a.values, slots_b.values)
    assert straight[-1]["commit_sequence"] == 6 and straight[-1]["filled_slots"] == report_a.filled_slots


def test_two_models_share_one_memory_and_see_each_other_s_entries(tmp_path):
    memory_dir = tmp_path / "memory"
    run(tmp_path / "convnet", memory_dir, "--steps", "6", "--writer", "convnet")
    mlp = run(tmp_path / "mlp", memory_dir, "--steps", "3", "--encoder", "mlp", "--writer", "mlp", "--seed", "1")
    _, report = memory_state(memory_dir)
    assert report.commit_sequence == 9  # the second model went on with the first one's memory
    assert {w.name for w in report.writers} == {"convnet", "mlp"}
    evaluation = mlp[-1]["evaluation"]
    assert evaluation["by_writer"]["convnet"]["n"] > 0  # entries only the other model wrote answered
    assert evaluation["by_seen"][0]["n"] > 0  # classes this model never showed, held by the memory
    assert sum(cell["n"] for cell in evaluation["by_age"]["other"]) > 0
    assert (tmp_path / "mlp" / "accuracy-by-age.png").stat().st_size > 0


def test_class_frequencies_follow_zipf():
    rng = np.random.default_rng(0)
    p = lifelong.class_frequencies(1000, 1.0, rng)
    ranked = np.sort(p)[::-1]
    assert p.sum() == pytest.approx(1) and ranked[0] / ranked[9] == pytest.approx(10) and ranked[0] / ranked[-1] == 1000


def omniglot_checkpoint(path: pathlib.Path, rep_dim: int = 32, input: str = "raw", encoder: str = "") -> dict:
    """A checkpoint as trainers/omniglot.py saves one, with random weights that differ from any seed's. Without
    ``encoder`` its config has no such setting, as checkpoints from before the resnet: a convnet."""
    torch.manual_seed(1234)
    weights = omniglot.build_encoder(encoder or "convnet", rep_dim, 0.3).state_dict()
    projection = MemoryModule(connect("local"), rep_dim, name="source").state_dict()
    config = {"input": input, "rep_dim": rep_dim, "split": "reference", "init": "he", "seed": 5}
    state = {"encoder": weights, "memory_module": projection, "episode_batch": 7, "config": config}
    if encoder:
        config["encoder"] = encoder
    torch.save(state, path)
    return state


@pytest.mark.parametrize("encoder", ["", "resnet"])
def test_init_from_starts_the_encoder_and_its_query_projection_from_an_omniglot_checkpoint(tmp_path, encoder):
    source = omniglot_checkpoint(tmp_path / "omniglot.pt", encoder=encoder)
    flags = ["--steps", "1", "--learning-rate", "0", "--input", "raw", "--init-from", str(tmp_path / "omniglot.pt")]
    run(tmp_path / "out", tmp_path / "memory", *flags, "--encoder", encoder or "convnet")
    state = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)
    for name, weight in source["encoder"].items():
        assert torch.equal(state["encoder"][name], weight), name
    assert torch.equal(state["memory_module"]["query_proj"], source["memory_module"]["query_proj"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--input", "ink"], "--input raw (given ink)"),
        (["--input", "raw", "--rep-dim", "16"], "--rep-dim 32 (given 16)"),
        (["--input", "raw", "--encoder", "mlp"], "--encoder convnet (given mlp)"),
        (["--input", "raw", "--encoder", "resnet"], "--encoder convnet (given resnet)"),
    ],
)
def test_init_from_refuses_a_checkpoint_of_another_set_up_naming_the_setting(tmp_path, flags, message):
    omniglot_checkpoint(tmp_path / "omniglot.pt")
    with pytest.raises(SystemExit, match=re.escape(message)):
        run(tmp_path / "out", tmp_path / "memory", "--steps", "1", "--init-from", str(tmp_path / "omniglot.pt"), *flags)


PROBES = ["--probe-classes", "6", "--probe-start", "2", "--probe-every", "2", "--probe-wave", "3"]


def test_probe_classes_are_written_once_at_their_steps_and_asked_at_known_ages(tmp_path):
    metrics = run(tmp_path / "out", tmp_path / "memory", "--steps", "6", *PROBES)
    state = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)
    assert state["probes_written_at"] == {0: 2, 1: 2, 2: 2, 3: 4, 4: 4, 5: 4}  # two waves of three
    offset = len(omniglot_data.load_split(DATA).train)
    probes = metrics[-1]["evaluation"]["probes"]  # at step 6: 6 training commits and 2 probe waves, 8 in all
    assert probes["labels"] == [offset + i for i in range(6)] and probes["lost"] == 0
    assert probes["age_steps"] == [4, 4, 4, 2, 2, 2]
    assert probes["age_commits"] == [5, 5, 5, 2, 2, 2]  # the wave at step 4 is itself a commit after step 2's
    assert probes["writers"] == ["convnet"] * 6 and probes["drawings"] == 4
    assert all(0 <= c <= 4 for c in probes["correct"])
    assert metrics[0]["evaluation"]["probes"]["labels"] == [offset + i for i in range(3)]  # step 3: one wave


def test_another_model_asks_about_probes_only_the_first_one_wrote(tmp_path):
    memory_dir = tmp_path / "memory"
    run(tmp_path / "convnet", memory_dir, "--steps", "4", *PROBES)
    mlp = run(tmp_path / "mlp", memory_dir, "--steps", "3", "--encoder", "mlp", "--writer", "mlp", "--seed", "1",
              *PROBES[:2], "--probe-group", "1", "--probe-start", "100")  # fmt: skip
    probes = mlp[-1]["evaluation"]["probes"]
    assert probes["writers"] == ["convnet"] * 6 and probes["age_steps"] == [-1] * 6  # not this model's probes
    assert probes["age_commits"] == [6, 6, 6, 3, 3, 3]  # 4 + 2 commits of the convnet's, then 3 of the MLP's


def test_overwritten_probe_entries_count_as_lost_and_are_not_asked(tmp_path):
    metrics = run(tmp_path / "out", tmp_path / "memory", "--steps", "12", "--memory-size", "48", *PROBES)
    probes = metrics[-1]["evaluation"]["probes"]
    assert probes["lost"] > 0 and len(probes["labels"]) == 6 - probes["lost"]


def test_a_probe_group_beyond_the_evaluation_split_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--probe-group 3 with --probe-classes 200 needs evaluation-split classes"):
        run(tmp_path / "out", tmp_path / "memory", "--steps", "1", "--probe-classes", "200", "--probe-group", "3")


def test_probe_accuracy_counts_each_entry_once_per_age_bucket():
    asked = [
        {"labels": [10, 11], "writers": ["a", "b"], "age_commits": [5, 5], "correct": [4, 0], "drawings": 4},
        {"labels": [10, 11], "writers": ["a", "b"], "age_commits": [50, 500], "correct": [2, 4], "drawings": 4},
    ]
    young, old = lifelong.probe_accuracy(asked, lambda writer: True, [0, 100, 1000])
    assert young["n"] == 2 and young["accuracy"] == pytest.approx((0.75 + 0.0) / 2)  # probe 10 once: (1 + 0.5) / 2
    assert young["ci95"] == pytest.approx(1.96 * np.std([0.75, 0.0], ddof=1) / np.sqrt(2))
    assert young["mean_age"] == pytest.approx((5 + 5 + 50) / 3)
    assert old["n"] == 1 and old["accuracy"] == 1.0 and np.isnan(old["ci95"])
    only_a = lifelong.probe_accuracy(asked, lambda writer: writer == "a", [0, 100, 1000])
    assert only_a[0]["n"] == 1 and only_a[1]["n"] == 0


def test_the_report_summarizes_finished_runs_and_plots_them_side_by_side(tmp_path, capsys):
    memory_dir = tmp_path / "memory"
    run(tmp_path / "convnet", memory_dir, "--steps", "4", *PROBES)
    run(tmp_path / "mlp", memory_dir, "--steps", "3", "--encoder", "mlp", "--writer", "mlp", "--seed", "1",
        *PROBES[:2], "--probe-group", "1", "--probe-start", "1", "--probe-every", "1")  # fmt: skip
    capsys.readouterr()
    plot = tmp_path / "report.png"
    lifelong.main(["--report", f"{tmp_path / 'convnet'},{tmp_path / 'mlp'}", "--report-plot", str(plot),
                   "--report-targets", "0,1.01"])  # fmt: skip
    printed = capsys.readouterr().out
    mlp = printed[printed.index("mlp: mlp from scratch") :]
    assert "writer 'mlp', 3 steps, memory commit 10" in mlp  # 4 + 2 waves of the convnet's, 3 + 1 wave of the MLP's
    assert "probe classes, entries written by convnet, last evaluation" in mlp
    assert "probe classes, own entries, last evaluation" in mlp and "by entry age in own steps: [0, 100)" in mlp
    assert "first step at stream accuracy 0.0: 3, 1.01: not reached" in mlp
    assert plot.stat().st_size > 0


def test_first_step_at_a_target():
    metrics = [{"step": 5, "a": 0.2}, {"step": 10, "a": 0.6}, {"step": 15, "a": 0.5}]
    assert lifelong.first_step_at(metrics, lambda m: m["a"], 0.5) == 10
    assert lifelong.first_step_at(metrics, lambda m: m["a"], 0.7) is None


def test_a_read_only_trainer_learns_from_the_others_entries_and_writes_nothing(tmp_path):
    memory_dir = tmp_path / "memory"
    run(tmp_path / "convnet", memory_dir, "--steps", "6")
    mlp = run(tmp_path / "mlp", memory_dir, "--steps", "3", "--encoder", "mlp", "--writer", "mlp", "--seed", "1",
              "--read-only-steps", "3")  # fmt: skip
    _, report = memory_state(memory_dir)
    assert report.commit_sequence == 6 and {w.name for w in report.writers} == {"convnet"}
    evaluation = mlp[-1]["evaluation"]
    answered = evaluation["by_answering_writer"]  # every answer came from an entry the convnet wrote
    assert list(answered) == ["convnet"] and answered["convnet"]["n"] == evaluation["held"] > 0
    state = torch.load(tmp_path / "mlp" / "checkpoint.pt", weights_only=False)
    assert all(int(s["step"]) == 3 for s in state["optimizer"]["state"].values())  # it learned at every step
    assert np.isfinite(mlp[-1]["train_loss"])


def test_writer_entries_are_every_slot_the_named_writers_last_wrote_or_merged():
    store = connect("local")
    a = store.create_memory("aligned", key_dim=4, memory_size=16, choose_k=4, age_noise=0.0, writer="a")
    b = store.memory("aligned", writer="b")
    e = torch.eye(4)
    a.query(e[:2], torch.tensor([1, 2]), update=True)  # a: label 1 at e0, label 2 at e1
    b.query(-e[2:3], torch.tensor([3]), update=True)  # b: label 3 at -e2
    a.query(e[3:4], torch.tensor([4]), update=True)  # a: label 4 at e3
    b.query(e[3:4], torch.tensor([4]), update=True)  # b's query merges into a's entry: now b's
    keys, values = lifelong.writer_entries(b, {"a"}, chunk=3)  # chunks of 3 slots: 6 reads, one partial
    assert sorted(values.tolist()) == [1, 2]
    assert torch.equal(keys[values.argsort()], e[:2])
    keys, values = lifelong.writer_entries(a, {"b"}, chunk=16)
    assert sorted(values.tolist()) == [3, 4]
    keys, values = lifelong.writer_entries(a, {"a", "b"})
    assert sorted(values.tolist()) == [1, 2, 3, 4] and keys.shape == (4, 4)
    assert lifelong.writer_entries(a, {"c"})[0].shape == (0, 4)


def test_cross_model_loss_takes_its_positive_from_the_given_entries_alone():
    e = torch.eye(3)
    keys, values = torch.stack([e[0], e[1], -e[0]]), torch.tensor([7, 8, 7])  # the other model's entries
    query = torch.nn.functional.normalize(torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]), dim=1)
    query.requires_grad_(True)
    negative_keys = torch.stack([e[2], e[2], -e[0]])  # the memory's own negatives (any writer's)
    # Row 0 (class 7): positive e0 (0.6); negatives: their e1 (0.8), the memory's e2 (0): 0.8 - 0.6 = 0.2. Row 1
    # (class 9): they hold no entry of its class, it adds nothing. Row 2 (class 8): positive e1 (0), negatives
    # their e0 (1) and the memory's -e0 (-1): 1.
    loss = lifelong.cross_model_loss(query, torch.tensor([7, 9, 8]), keys, values, negative_keys, alpha=0.1)
    assert loss.item() == pytest.approx((0.2 + 1.0) / 2)
    loss.backward()
    assert torch.equal(query.grad[1], torch.zeros(3))  # the row without a positive gets no gradient
    assert torch.allclose(query.grad[0], (e[1] - e[0]) / 2)
    # The memory's negative counts when it is the nearer: an entry of the asking model's own, say.
    own = torch.nn.functional.normalize(torch.tensor([[0.9, 0.1, 0.0]]), dim=1)
    loss = lifelong.cross_model_loss(e[:1], torch.tensor([7]), keys, values, own, alpha=0.1)
    assert loss.item() == pytest.approx(own[0, 0].item() - 1.0)
    # A row answered by the other model's entry of its class with the margin costs -alpha: the loss's floor.
    assert lifelong.cross_model_loss(e[:1], torch.tensor([7]), keys, values, e[2:3], 0.1).item() == pytest.approx(-0.1)
    assert lifelong.cross_model_loss(e[:1], torch.tensor([9]), keys, values, e[2:3], 0.1).item() == 0.0


def test_align_to_adds_the_loss_against_the_other_writer_s_entries_and_resumes_exactly(tmp_path):
    memory_dir = tmp_path / "memory"
    run(tmp_path / "convnet", memory_dir, "--steps", "6")
    for copy in ("plain", "straight", "resumed"):
        shutil.copytree(memory_dir, tmp_path / f"memory-{copy}")
    mlp = ["--encoder", "mlp", "--writer", "mlp", "--seed", "1", "--eval-every", "1"]
    plain = run(tmp_path / "plain", tmp_path / "memory-plain", "--steps", "1", *mlp)
    aligned = ["--align-to", "convnet", "--align-refresh", "2", *mlp]
    straight = run(tmp_path / "straight", tmp_path / "memory-straight", "--steps", "4", *aligned)
    # The same first step (same weights, same batch, same memory) plus the loss against the convnet's entries.
    assert straight[0]["train_loss"] != pytest.approx(plain[0]["train_loss"], abs=1e-3)
    run(tmp_path / "resumed", tmp_path / "memory-resumed", "--steps", "3", *aligned)  # stops between two reads
    resumed = run(tmp_path / "resumed", tmp_path / "memory-resumed", "--steps", "4", "--resume", *aligned)
    assert straight[-1]["train_loss"] == pytest.approx(resumed[-1]["train_loss"], abs=1e-6)
    assert straight[-1]["evaluation"] == resumed[-1]["evaluation"]


def test_cross_model_one_shot_asks_every_model_s_entries_with_every_model(tmp_path):
    spec = importlib.util.spec_from_file_location("cross_model_one_shot", BENCHMARKS / "cross_model_one_shot.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    memory_dir = tmp_path / "memory"
    probes = ["--probe-classes", "4", "--probe-start", "1", "--probe-every", "1", "--probe-wave", "4"]
    run(tmp_path / "a", memory_dir, "--steps", "3", "--writer", "a", *probes)
    run(tmp_path / "b", memory_dir, "--steps", "3", "--writer", "b", "--seed", "1", "--probe-group", "1", *probes)
    before = memory_state(memory_dir)
    out = tmp_path / "cross.json"
    runs = [str(tmp_path / "a"), str(tmp_path / "b")]
    bench.main(["--data-dir", str(memory_dir), "--memory", "lifelong", "--classes", "30", "--episodes", "40",
                "--out", str(out), "--plot", str(tmp_path / "cross.png"), *runs])  # fmt: skip
    results = json.loads(out.read_text())
    assert (tmp_path / "cross.png").stat().st_size > 0
    assert results["classes"] == [8, 37]  # past both probe blocks (0-3 and 4-7)
    for setting, n in (("shared", 30), ("fresh", 30), ("five_way", 40)):
        assert {pair: cell["n"] for pair, cell in results[setting].items()} == dict.fromkeys(
            ["a->a", "a->b", "b->a", "b->b"], n
        )
    after = memory_state(memory_dir)  # the runs' memory is untouched: the writes went into a copy
    assert torch.equal(before[0].keys, after[0].keys) and before[1].commit_sequence == after[1].commit_sequence
    # Through a fresh memory, each answer is the class of the nearest written key: here computed without one.
    classes = np.arange(8, 38)
    a, b = (bench.Model(tmp_path / name) for name in "ab")
    a.encode(classes)
    b.encode(classes)
    nearest = (b.queries[:, 1:] @ a.queries[:, 0].T).argmax(dim=-1)  # [class, drawer]: the nearest written class
    expected = (nearest == torch.arange(30)[:, None]).float().mean()
    assert results["fresh"]["a->b"]["accuracy"] == pytest.approx(expected.item())


def test_a_resume_with_other_settings_is_refused_naming_them(tmp_path):
    run(tmp_path / "run", tmp_path / "memory", "--steps", "3")
    with pytest.raises(SystemExit, match=r"was trained with --encoder convnet \(given mlp\), --writer convnet"):
        run(tmp_path / "run", tmp_path / "memory", "--steps", "6", "--resume", "--encoder", "mlp", "--writer", "mlp")
