"""The translation trainer on a tiny slice of Multi30k: the pipeline end to end, exact resume, the context test,
the rare-word measure and beam search."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from lifelong_memory.client import MemoryModule, connect
from lifelong_memory.server.errors import InvalidArgument
from lifelong_memory.trainers import translation
from lifelong_memory.trainers.statistics import wilson_interval

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"Multi30k not at {DATA}")

# A few hundred pairs, a tiny model, a few steps: seconds on one thread.
TINY = ["--data-dir", str(DATA), "--train-pairs", "300", "--test-pairs", "40", "--validation-pairs", "20",
        "--vocab-size", "300", "--embedding-dim", "16", "--hidden", "32", "--key-dim", "16", "--memory-size", "2048",
        "--choose-k", "8", "--batch-size", "20", "--validate-every", "10", "--checkpoint-every", "10", "--beam", "2",
        "--threads", "1"]  # fmt: skip


# Two sentence pairs for the tests of the memory's wiring: once memorised, every decoder step recalls a written slot.
PAIRS = translation.Pairs([[4, 5, 6], [7, 8]], [[5, 6, 9], [7]], [""] * 2, [""] * 2)


def tiny_memory(name: str) -> MemoryModule:
    """An embedded memory for a Translator of hidden size 16: keys of 8, 256 slots, k = 4."""
    return MemoryModule(connect("local"), 8, 16, name=name, return_neighbors=True, memory_size=256, choose_k=4)


def run_trainer(out: pathlib.Path, *flags: str) -> tuple[list[dict], dict]:
    subprocess.run([sys.executable, "-m", "lifelong_memory.trainers.translation", *TINY, "--out-dir", str(out), *flags],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    metrics_file = out / "metrics.jsonl"  # an evaluation writes none
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    return metrics, json.loads((out / "evaluation.json").read_text())


def without_timing(results: dict) -> dict:
    """Metrics or an evaluation without the CPU times, which no two runs share."""
    if "tests" in results:
        return {**results, "tests": {name: without_timing(test) for name, test in results["tests"].items()}}
    return {k: v for k, v in results.items() if k not in ("cpu_s", "step_cpu_ms")}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """A tiny memory model trained for 20 steps, then evaluated: (out_dir, metrics, evaluation)."""
    out = tmp_path_factory.mktemp("straight")
    return (out, *run_trainer(out, "--steps", "20"))


@needs_data
def test_the_pipeline_runs_end_to_end(straight_run):
    out, metrics, evaluation = straight_run
    assert [m["step"] for m in metrics] == [10, 20]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert (out / "bleu.png").stat().st_size > 0
    assert evaluation["recall_mix"] == 0.0, "an evaluation says whether the memory's distribution was mixed in"
    vocabularies = torch.load(out / "checkpoint.pt", weights_only=False)["vocabularies"]
    assert [(out / f"vocabulary.{language}.model").read_bytes() for language in ("en", "de")] == list(vocabularies)
    assert evaluation["vocabulary"] == translation.vocabulary_fingerprint(map(translation.processor, vocabularies))
    assert set(evaluation["versions"]) == {"torch", "sentencepiece", "sacrebleu"}
    assert (evaluation["seed"], evaluation["trained_steps"]) == (0, 20), "what a comparison pairs runs by"
    assert evaluation["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    for name in ("test_2016_flickr", "test_2017_flickr"):
        test = evaluation["tests"][name]
        assert test["lines"] == 40 and 0 <= test["bleu"] <= 100 and 0 <= test["chrf"] <= 100
        lines = (out / f"translations-{name}.txt").read_text().splitlines()
        assert len(lines) == 40 and any(lines), "one detokenized translation per test line"
        context = test["context"]
        assert (context["context_lines"], context["test_lines"]) == (20, 20)
        assert context["gain_bleu"] == context["with"]["bleu"] - context["without"]["bleu"]
        ceiling = context["rare_word_ceiling"]
        assert 0 <= ceiling["lines"] <= 20 and ceiling["gain_bleu"] == ceiling["bleu"] - context["without"]["bleu"]
        for when in ("without", "with"):
            recall = context[when]["teacher_forced"]
            assert recall["subwords"] > 0 and 0 <= recall["only_memory"] <= recall["memory"] <= 1
        rare = test["rare_words"]
        assert rare["at most once"]["n"] == rare["never"]["n"] + rare["once"]["n"] > 0


@needs_data
def test_resume_continues_exactly_where_the_run_stopped(straight_run, tmp_path):
    out, straight, evaluation = straight_run
    # Stopped after step 10 (a validation logged after that checkpoint is dropped), then resumed to 20.
    run_trainer(tmp_path, "--steps", "10")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 15, "train_loss": 9.0}) + "\n")
    resumed, resumed_evaluation = run_trainer(tmp_path, "--steps", "20", "--resume")
    assert [without_timing(m) for m in resumed] == [without_timing(m) for m in straight]
    assert without_timing(resumed_evaluation) == without_timing(evaluation)
    weights = [torch.load(run / "checkpoint.pt", weights_only=False)["model"] for run in (out, tmp_path)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert [p.name for p in tmp_path.glob("memory-*.lmem")] == ["memory-20.lmem"]


@needs_data
def test_an_evaluation_over_grpc_gives_the_local_numbers(straight_run, tmp_path, server_url):
    out, _, local = straight_run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the in-process server searches with the trainer's one thread, as the embedded memory
    try:
        _, remote = run_trainer(
            tmp_path, "--steps", "20", "--evaluate", str(out / "checkpoint.pt"), "--memory", server_url
        )
    finally:
        torch.set_num_threads(threads)
    assert remote["memory"] == server_url
    assert without_timing({**remote, "memory": "local"}) == without_timing(local)


@needs_data
def test_the_vocabulary_is_trained_on_the_training_split_only(tmp_path):
    """A word only the test sets hold gets no piece of its own, whatever the test files say."""
    config = translation.configure([*TINY, "--out-dir", str(tmp_path)])
    task, models = translation.make_task(config, None)
    target_vocab = task.vocabularies[1]
    pieces = {target_vocab.id_to_piece(i) for i in range(target_vocab.get_piece_size())}
    train_words = {w for line in task.train.target_text for w in line.split()}
    test_only = {w for p in task.tests.values() for line in p.target_text for w in line.split()} - train_words
    assert test_only and not {"▁" + w for w in test_only} & pieces
    again, models_again = translation.make_task(config, models)
    assert models_again == models and again.train.target == task.train.target


def test_rare_word_accuracy_counts_clipped_occurrences_by_training_frequency():
    counts = Counter({"Hund": 5, "Dackel": 1, "läuft": 2})
    references = ["Ein Dackel und ein Dackel", "Zwei Zebras und ein Dackel"]
    hypotheses = ["Ein Dackel und ein Hund", "Zwei Zebras"]
    result = translation.rare_word_accuracy(hypotheses, references, counts, context_words={"Dackel"})
    # "Dackel" (seen once) three times in the references, produced once where two were needed and not at all.
    assert (result["once"]["correct"], result["once"]["n"]) == (1, 3)
    # Never seen: "Ein", "und", "ein" in line 0, all made; "Zwei", "Zebras", "und", "ein" in line 1, two made.
    assert (result["never"]["correct"], result["never"]["n"]) == (5, 7)
    assert (result["at most once"]["correct"], result["at most once"]["n"]) == (6, 10)
    assert (result["in context"]["correct"], result["in context"]["n"]) == (1, 3)
    assert result["once"]["ci95"] == pytest.approx(wilson_interval(1, 3))
    assert result["once"]["translated"][0]["word"] == "Dackel" and result["once"]["missed"][0]["line"] == 1


class TableModel:
    """A stand-in for the decoder: the next token's probabilities depend only on the last token.

    After BOS: A 0.6, B 0.4; after A: EOS 0.45, C 0.55; after B or C: EOS. Greedy decoding takes A C (0.33);
    the most probable sequence is B (0.4); per token, A C (log 0.33 / 3) beats B (log 0.4 / 2)."""

    A, B, C = 4, 5, 6
    NEXT = {translation.BOS: {A: 0.6, B: 0.4}, A: {translation.EOS: 0.45, C: 0.55}, B: {translation.EOS: 1.0},
            C: {translation.EOS: 1.0}}  # fmt: skip

    def eval(self):
        return self

    def encode(self, source):
        rows = source.shape[0]
        return (torch.zeros(rows, 1), torch.zeros(rows, 1), torch.zeros(rows, 1)), (torch.zeros(1, rows, 1),)

    def decode(self, encoded, inputs, state):
        probabilities = torch.full((inputs.shape[0], 1, 7), 1e-9)
        for row, token in enumerate(inputs[:, 0].tolist()):
            for following, p in self.NEXT.get(token, {translation.EOS: 1.0}).items():
                probabilities[row, 0, following] = p
        return probabilities.log(), state, None


@pytest.mark.parametrize(
    ("beam", "length_penalty", "expected"),
    [(1, 0.0, [TableModel.A, TableModel.C]), (2, 0.0, [TableModel.B]), (2, 1.0, [TableModel.A, TableModel.C])],
)
def test_beam_search_keeps_ended_hypotheses_and_ranks_by_normalised_score(beam, length_penalty, expected):
    sources = torch.tensor([[7, translation.EOS], [8, translation.EOS]])
    assert translation.beam_search(TableModel(), sources, beam, length_penalty) == [expected, expected]


def test_the_context_test_leaves_the_memory_as_it_was_and_changes_nothing_without_one(tmp_path):
    store = connect("local")
    module = MemoryModule(store, 8, 16, name="context", return_neighbors=True, memory_size=256, choose_k=4)
    model = translation.Translator(20, 20, 8, 16, 0.0, module)
    pairs = translation.Pairs([[4, 5, 6], [7, 8], [4, 9], [10, 11, 12]], [[5, 6], [7], [8, 9], [10]], [""] * 4,
                              ["a b", "c", "d e", "f"])  # fmt: skip

    class Vocabulary:
        def decode(self, ids):
            return " ".join("abcdefghijklmnopqrst"[i] for i in ids)

    config = {"memory_name": "context", "context_passes": 3, "beam": 2, "length_penalty": 1.0}
    translation.memorise(model, pairs.subset([1, 3]))  # the memory as training left it: some slots written
    before = store.memory("context").slots(range(256))
    result = translation.context_test(model, store, pairs, Counter(), config, Vocabulary())
    after = store.memory("context").slots(range(256))
    assert (result["context_lines"], result["test_lines"]) == (2, 2)
    assert (before[1] >= 0).any(), "slots were written before the test"
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), "the context's writes are undone"
    baseline = translation.Translator(20, 20, 8, 16, 0.0)
    result = translation.context_test(baseline, None, pairs, Counter(), config, Vocabulary())
    assert result["gain_bleu"] == 0.0


def test_teacher_forced_recall_counts_what_the_memory_holds():
    torch.manual_seed(0)
    module = tiny_memory("recall")
    model = translation.Translator(20, 20, 8, 16, 0.0, module)
    empty = translation.teacher_forced_recall(model, PAIRS)
    assert empty["subwords"] == 6 and empty["memory"] == empty["only_memory"] == 0.0, "an empty slot is no answer"
    translation.memorise(model, PAIRS)
    remembered = translation.teacher_forced_recall(model, PAIRS)
    # Each written key is its own query: the memory now answers every reference subword it was shown. (The
    # model's own answer may change too: its output layer reads the recalled value.)
    assert remembered["memory"] == 1.0
    assert remembered["only_memory"] == 1.0 - remembered["model"]
    baseline = translation.teacher_forced_recall(translation.Translator(20, 20, 8, 16, 0.0), PAIRS)
    assert baseline["memory"] is None and baseline["subwords"] == 6


def test_the_recall_gate_decides_how_much_of_the_recall_reaches_the_output():
    module = tiny_memory("gate")
    torch.manual_seed(0)
    gated = translation.Translator(20, 20, 8, 16, 0.0, module, recall_gate=True)
    ungated = translation.Translator(20, 20, 8, 16, 0.0, module)
    missing, unexpected = ungated.load_state_dict(gated.state_dict(), strict=False)
    assert not missing and unexpected == ["recall_gate.weight", "recall_gate.bias"]
    translation.memorise(gated, PAIRS)  # every step now recalls a written slot
    source, decoder_inputs, _ = translation.as_batch(PAIRS, range(2))

    def logits(model):
        model.eval()
        encoded, state = model.encode(source)
        return model.decode(encoded, decoder_inputs, state)[0]

    with torch.no_grad():
        gated.recall_gate.weight.zero_()
        gated.recall_gate.bias.fill_(30.0)  # open: the ungated model's output
        assert torch.allclose(logits(gated), logits(ungated), atol=1e-5)
        gated.recall_gate.bias.fill_(-30.0)  # closed: as if nothing were recalled
        closed = logits(gated)
        ungated.value_embedding.weight.zero_()
        assert torch.allclose(closed, logits(ungated), atol=1e-5)
        assert not torch.allclose(closed, logits(translation.Translator(20, 20, 8, 16, 0.0, module)), atol=1e-3)
    gated.recall_gate.bias.data.zero_()
    logits(gated).sum().backward()
    assert gated.recall_gate.weight.grad[0, -1] != 0, "the nearest neighbour's similarity is an input of the gate"


def test_a_tied_recall_raises_the_logit_of_the_recalled_subword_by_its_weight():
    module = tiny_memory("tied")
    torch.manual_seed(0)
    tied = translation.Translator(12, 12, 8, 16, 0.0, module, tied_recall=True)
    own = translation.Translator(12, 12, 8, 16, 0.0, module)
    assert tied.value_embedding is None
    assert sum(p.numel() for p in own.parameters()) - sum(p.numel() for p in tied.parameters()) == 12 * 16
    translation.memorise(tied, PAIRS)  # every step now recalls a written slot
    source, decoder_inputs, _ = translation.as_batch(PAIRS, range(2))
    steps = decoder_inputs != translation.PAD

    def decoded():
        encoded, state = tied.encode(source)
        logits, _, out = tied.decode(encoded, decoder_inputs, state)
        return logits[steps], out

    with torch.no_grad():
        tied.output.weight[:, 16:] = 0.0  # no recall reaches the output
        plain, _ = decoded()
        tied.output.weight[:, 16:] = 3 * torch.eye(12, 16)  # each subword's recall row on an axis of its own
        recalled, out = decoded()
    nearest, weight = out.neighbor_values[:, 0], out.neighbor_weights[:, 0]
    assert bool((nearest >= 0).all()) and bool((weight > 0).all())
    want = torch.zeros_like(plain)
    want[torch.arange(len(nearest)), nearest] = 9 * weight  # weight * |row v|^2 on v's logit, nothing elsewhere
    torch.testing.assert_close(recalled - plain, want, atol=1e-5, rtol=1e-5)


def test_recall_mix_mixes_the_memory_s_distribution_into_the_output_at_evaluation_only():
    module = tiny_memory("mix")
    torch.manual_seed(0)
    model = translation.Translator(20, 20, 8, 16, 0.0, module, recall_mix=0.25)
    assert model.recall_mix == 0.25
    translation.memorise(model, PAIRS)
    source, decoder_inputs, _ = translation.as_batch(PAIRS, range(2))
    steps = decoder_inputs != translation.PAD

    def decoded(mix: float, training: bool = False):
        model.recall_mix = mix
        model.train(training)
        with torch.no_grad():
            encoded, state = model.encode(source)
            logits, _, out = model.decode(encoded, decoder_inputs, state)
        return logits[steps], out

    plain, out = decoded(0.0)
    memory = torch.zeros(len(plain), 20)
    neighbours = zip(out.neighbor_values.tolist(), out.neighbor_weights.tolist(), strict=True)
    for row, (values, weights) in enumerate(neighbours):
        for value, weight in zip(values, weights, strict=True):
            memory[row, value] += weight if value >= 0 else 0.0
    assert torch.allclose(memory.sum(dim=1), torch.ones(len(plain)))  # every neighbour holds a value
    mixed, _ = decoded(0.25)
    torch.testing.assert_close(mixed.exp(), 0.75 * plain.softmax(dim=-1) + 0.25 * memory)
    torch.testing.assert_close(decoded(1.0)[0].exp(), memory)
    torch.testing.assert_close(decoded(0.25, training=True)[0], decoded(0.0, training=True)[0])
    with pytest.raises(SystemExit, match="--recall-mix"):
        translation.main(["--model", "baseline", "--recall-mix", "0.2"])


def test_the_learning_rate_is_constant_then_falls_linearly_over_the_decay_steps():
    constant = translation.configure(["--steps", "10", "--learning-rate", "0.01"])
    assert [translation.learning_rate_at(step, constant) for step in (1, 10)] == [0.01, 0.01]
    cooled = translation.configure(["--steps", "10", "--decay-steps", "4", "--learning-rate", "0.01"])
    rates = [translation.learning_rate_at(step, cooled) for step in range(1, 11)]
    assert rates == pytest.approx([0.01] * 6 + [0.01, 0.0075, 0.005, 0.0025])


@needs_data
def test_a_cooldown_branched_from_a_constant_run_is_the_run_trained_with_that_schedule(tmp_path):
    straight, straight_evaluation = run_trainer(tmp_path / "straight", "--steps", "20", "--decay-steps", "10")
    run_trainer(tmp_path / "branched", "--steps", "10")
    branched, branched_evaluation = run_trainer(tmp_path / "branched", "--steps", "20", "--decay-steps", "10",
                                                "--resume")  # fmt: skip
    assert [without_timing(m) for m in branched] == [without_timing(m) for m in straight]
    assert without_timing(branched_evaluation) == without_timing(straight_evaluation)
    assert [m["learning_rate"] for m in straight] == pytest.approx([2e-3, 2e-4])
    assert (straight_evaluation["decay_steps"], straight_evaluation["learning_rate"]) == (10, 2e-3)
    unscheduled, _ = run_trainer(tmp_path / "unscheduled", "--steps", "20")
    assert unscheduled[-1]["validation"] != straight[-1]["validation"], "the decay changed no weight"
    # A checkpoint inside its decay goes on only under the same schedule.
    with pytest.raises(SystemExit, match=r"trained step 12 at learning rate 0.0018, .* give it 0.002; resume with "
                                         r"--steps 20 --decay-steps 10"):  # fmt: skip
        translation.main([*TINY, "--out-dir", str(tmp_path / "straight"), "--resume", "--steps", "40", "--decay-steps",
                          "20"])  # fmt: skip


def test_a_checkpoint_from_before_a_setting_counts_as_trained_with_its_default():
    later = ("recall_gate", "tied_recall")
    saved = {key: translation.configure([])[key] for key in translation.EXPERIMENT_SETTINGS if key not in later}
    translation.check_same_experiment(translation.configure([]), saved, "old.pt")
    with pytest.raises(SystemExit, match="--recall-gate False"):
        translation.check_same_experiment(translation.configure(["--recall-gate"]), saved, "old.pt")
    with pytest.raises(SystemExit, match="--tied-recall False"):
        translation.check_same_experiment(translation.configure(["--tied-recall"]), saved, "old.pt")


def test_the_rare_word_ceiling_fixes_only_the_lines_holding_a_rare_word_of_the_context():
    counts = Counter({"Hund": 9, "Dackel": 1})  # every other word: never in training
    references = ["Ein kleiner Dackel läuft schnell", "Ein großer Hund läuft schnell", "Zwei Zebras laufen weg"]
    hypotheses = ["Ein kleiner Hund läuft schnell", "Ein großer Hund läuft langsam", "Zwei Pferde laufen weg"]
    # "Dackel" (once) is in the context, "Zebras" (never) is not, "Hund" is not rare: only line 0 is fixed.
    result = translation.rare_word_ceiling(hypotheses, references, counts, context_words={"Dackel", "Hund"})
    expected = translation.bleu_chrf([references[0], *hypotheses[1:]], references)
    assert result == {"lines": 1, **expected}
    assert result["bleu"] > translation.bleu_chrf(hypotheses, references)["bleu"] > 0


def test_context_pairs_are_other_pairs_holding_a_rare_word_of_the_batch():
    targets = ["ein Dackel rennt", "der Dackel schläft", "ein Dackel bellt", "eine Katze", "die Katze", "ein Hund"]
    pairs = translation.Pairs([[4]] * 6, [[4]] * 6, [""] * 6, targets)
    counts = Counter(word for line in targets for word in translation.WORD.findall(line))
    holders = translation.rare_word_pairs(pairs, counts, most=3)  # "ein" (3 times) counts; "Hund" (once) cannot
    assert {w: r.tolist() for w, r in holders.items()} == {"Dackel": [0, 1, 2], "ein": [0, 2, 5], "Katze": [3, 4]}

    batch = np.array([0, 3])  # rare words Dackel, ein (row 0) and Katze (row 3): three draws, the first 2 kept
    draws = {tuple(translation.context_pairs(pairs, batch, holders, np.random.default_rng(s))) for s in range(40)}
    for chosen in draws:  # never a pair of the batch, distinct, at most one per row of the batch
        assert len(chosen) == len(set(chosen)) == 2 and not {0, 3} & set(chosen)
    assert {c for chosen in draws for c in chosen} == {1, 2, 4, 5}, "every other holder of a word is drawn sometimes"
    rng = lambda: np.random.default_rng(7)  # noqa: E731
    assert translation.context_pairs(pairs, batch, holders, rng()) == translation.context_pairs(
        pairs, batch, holders, rng()
    )
    assert translation.context_pairs(pairs, np.array([3, 4]), {"Katze": holders["Katze"]}, rng()) == []
    with pytest.raises(SystemExit, match="--context-training"):
        translation.main(["--model", "baseline", "--context-training"])


@needs_data
def test_a_run_trains_on_the_vocabulary_of_another_run_given_by_vocabulary_dir(straight_run, tmp_path):
    out, _, evaluation = straight_run
    config = translation.configure([*TINY, "--train-pairs", "200", "--out-dir", str(tmp_path)])
    own, _ = translation.make_task(config, None)
    assert translation.vocabulary_fingerprint(own.vocabularies) != evaluation["vocabulary"], "200 pairs train another"
    given = translation.given_vocabularies({**config, "vocabulary_dir": str(out)}, None, None)
    task, models = translation.make_task(config, given)
    assert translation.vocabulary_fingerprint(task.vocabularies) == evaluation["vocabulary"] and len(task.train) < 200
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    assert translation.given_vocabularies({**config, "vocabulary_dir": str(out)}, saved, "ckpt") == models
    with pytest.raises(SystemExit, match="ckpt was trained on another vocabulary than --vocabulary-dir"):
        translation.given_vocabularies({**config, "vocabulary_dir": str(out)}, {"vocabularies": (b"", b"")}, "ckpt")
    missing = r"--vocabulary-dir: .*vocabulary\.en\.model, .*vocabulary\.de\.model not found"
    with pytest.raises(SystemExit, match=missing):
        translation.given_vocabularies({**config, "vocabulary_dir": str(tmp_path / "none")}, None, None)


@needs_data
def test_context_training_memorises_before_each_step_and_resumes_exactly(straight_run, tmp_path):
    _, plain, _ = straight_run
    straight, _ = run_trainer(tmp_path / "straight", "--steps", "20", "--context-training")
    assert [m["step"] for m in straight] == [10, 20]
    assert straight[0]["train_loss"] != plain[0]["train_loss"], "the context passes write the memory it reads"
    run_trainer(tmp_path / "resumed", "--steps", "10", "--context-training")
    resumed, _ = run_trainer(tmp_path / "resumed", "--steps", "20", "--context-training", "--resume")
    assert [without_timing(m) for m in resumed] == [without_timing(m) for m in straight]


@needs_data
def test_a_branch_goes_on_from_another_run_s_checkpoint_and_may_change_only_its_context_training(
    straight_run, tmp_path
):
    _, straight, evaluation = straight_run
    run_trainer(tmp_path / "parent", "--steps", "10")
    parent = str(tmp_path / "parent" / "checkpoint.pt")
    same, same_evaluation = run_trainer(tmp_path / "same", "--steps", "20", "--branch-from", parent)
    assert [without_timing(m) for m in same] == [without_timing(m) for m in straight], "unchanged: the straight run"
    branched_from = {"checkpoint": parent, "step": 10, "context_training": False, "context_word_max": 5}
    assert same_evaluation["branched_from"] == branched_from and evaluation["branched_from"] is None
    assert without_timing(same_evaluation) == without_timing(evaluation) | {"branched_from": branched_from}

    # Context training from the branch on: the parent's history, then other steps; and the branch resumes exactly.
    other = ["--branch-from", parent, "--context-training", "--context-word-max", "3"]
    other += ["--validate-every", "5", "--checkpoint-every", "5"]
    changed, changed_evaluation = run_trainer(tmp_path / "changed", "--steps", "20", *other)
    assert [m["step"] for m in changed] == [10, 15, 20] and without_timing(changed[0]) == without_timing(straight[0])
    assert changed[-1]["validation"] != straight[-1]["validation"]
    assert changed_evaluation["branched_from"] == branched_from, "the parent's own settings, not the branch's"
    run_trainer(tmp_path / "resumed", "--steps", "15", *other)
    resumed, resumed_evaluation = run_trainer(tmp_path / "resumed", "--steps", "20", "--resume", *other)
    assert [without_timing(m) for m in resumed] == [without_timing(m) for m in changed]
    assert without_timing(resumed_evaluation) == without_timing(changed_evaluation)

    def refused(out: pathlib.Path, *flags: str) -> None:
        translation.main([*TINY, "--out-dir", str(out), "--branch-from", parent, "--steps", "20", *flags])

    with pytest.raises(SystemExit, match=r"was trained with --hidden 32 \(given 48\)"):
        refused(tmp_path / "wider", "--hidden", "48")
    with pytest.raises(SystemExit, match="--branch-from starts a run of its own, but .* exists"):
        refused(tmp_path / "same")
    with pytest.raises(SystemExit, match="--branch-from trains from a checkpoint; --evaluate evaluates one"):
        refused(tmp_path / "both", "--evaluate", parent)
    assert not (tmp_path / "wider" / "checkpoint.pt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a host without CUDA")
def test_a_cuda_device_the_host_lacks_is_refused_before_training(tmp_path):
    with pytest.raises(SystemExit, match="--device cuda: this torch sees no CUDA device"):
        translation.main([*TINY, "--out-dir", str(tmp_path), "--device", "cuda"])
    with pytest.raises(InvalidArgument, match="config.device: cuda:0 requested but CUDA is not available"):
        translation.main([*TINY, "--out-dir", str(tmp_path), "--memory-device", "cuda", "--memory-name", "no-gpu"])
    assert not (tmp_path / "metrics.jsonl").exists()


@needs_data
def test_translation_gpu_sh_trains_the_listed_runs_after_a_smoke_run_that_resumes(straight_run, tmp_path):
    """The GPU sweep script, on the CPU (DEVICE=cpu): the smoke run, one listed run on a given vocabulary (its own
    slice of 200 pairs would train another), the archive."""
    runs = tmp_path / "runs.txt"
    flags = [*TINY, "--steps", "10", "--test-sets", "test_2016_flickr", "--train-pairs", "200"]
    runs.write_text("# a comment\n\ntiny " + " ".join(flags) + "\n")
    vocabulary_run, _, vocabulary_run_evaluation = straight_run
    env = {**os.environ, "DEVICE": "cpu", "PYTHON": sys.executable, "DATA": str(DATA), "OUT_DIR": str(tmp_path / "out"),
           "ARCHIVE": str(tmp_path / "runs.tar.gz"), "VOCABULARY": str(vocabulary_run)}  # fmt: skip
    script = pathlib.Path(__file__).resolve().parents[1] / "trainers" / "translation_gpu.sh"
    printed = subprocess.run([str(script), str(runs)], env=env, check=True, capture_output=True, text=True, timeout=600)
    assert "smoke: trained and evaluated; resumed run identical to the straight one" in printed.stdout
    assert "tiny: exit status 0" in printed.stdout and "tiny: done" in printed.stdout
    with tarfile.open(tmp_path / "runs.tar.gz") as archive:
        names = sorted(archive.getnames())
    assert names == ["./smoke.log", "./tiny.log", "./tiny/evaluation.json", "./tiny/metrics.jsonl"]
    evaluation = json.loads((tmp_path / "out" / "tiny" / "evaluation.json").read_text())
    assert evaluation["tests"]["test_2016_flickr"]["lines"] == 40
    assert evaluation["vocabulary"] == vocabulary_run_evaluation["vocabulary"]
