"""The like-for-like comparison of translation runs: its arithmetic on made-up evaluations, and its refusals."""

from __future__ import annotations

import gzip
import json
import pathlib

import pytest

from lifelong_memory.trainers import translation_compare
from lifelong_memory.trainers.statistics import mean_interval, wilson_interval


def rare(correct: int, n: int) -> dict:
    return {"correct": correct, "n": n}


def evaluated_set(bleu: float, chrf: float, gain: float, rare_all: tuple, in_context: tuple) -> dict:
    """One test set's entry of an evaluation.json, as far as the comparison reads it."""
    return {
        "lines": 2,
        "bleu": bleu,
        "chrf": chrf,
        "rare_words": {"at most once": rare(*rare_all)},
        "context": {
            "gain_bleu": gain,
            "without": {"rare_words": {"in context": rare(in_context[0], in_context[2])}},
            "with": {"rare_words": {"in context": rare(in_context[1], in_context[2])}},
        },
    }


def write_run(directory, model: str, sets: dict, vocabulary="v1", translations: dict | None = None, **recorded):
    directory.mkdir()
    evaluation = {"model": model, "vocabulary": vocabulary, "tests": sets, **recorded}
    (directory / "evaluation.json").write_text(json.dumps(evaluation))
    for name, lines in (translations or {}).items():
        (directory / f"translations-{name}.txt").write_text("".join(line + "\n" for line in lines))
    return str(directory)


@pytest.fixture
def runs(tmp_path):
    """Two seeds of each model on two sets, the first seed's translations beside its evaluation."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a", "b"):
        with gzip.open(data / f"{name}.de.gz", "wt", encoding="utf-8") as f:
            f.write("ein Hund läuft\nzwei Katzen schlafen hier\n")  # 7 words
    long = {"a": ["ein Hund läuft schnell", "zwei Katzen schlafen hier jetzt"], "b": ["ein Hund", "zwei Katzen"]}
    baselines = [
        write_run(tmp_path / "b0", "baseline", {"a": evaluated_set(30, 50, 0, (2, 10), (0, 0, 4)),
                                                 "b": evaluated_set(20, 40, 0, (1, 10), (0, 0, 4))}, translations=long),
        write_run(tmp_path / "b1", "baseline", {"a": evaluated_set(31, 51, 0, (3, 10), (1, 1, 4)),
                                                 "b": evaluated_set(22, 42, 0, (0, 10), (0, 0, 4))}),
    ]  # fmt: skip
    memories = [
        write_run(tmp_path / "m0", "memory", {"a": evaluated_set(29, 49, 0.5, (1, 10), (0, 1, 4)),
                                               "b": evaluated_set(20.5, 40, 1.0, (2, 10), (0, 2, 4))},
                  translations={"b": ["ein Hund läuft", "zwei Katzen"]}),
        write_run(tmp_path / "m1", "memory", {"a": evaluated_set(31.2, 52, -0.2, (3, 10), (0, 0, 4)),
                                               "b": evaluated_set(21, 41, 0.3, (1, 10), (1, 1, 4))}),
    ]  # fmt: skip
    return baselines, memories, data


def test_the_comparison_pairs_runs_in_order_and_sums_what_the_targets_need(runs):
    baselines, memories, data = runs
    results = translation_compare.compare(baselines, memories, data)
    differences = [-1.0, 0.5, 0.2, -1.0]
    assert [row["bleu_difference"] for row in results["rows"]] == pytest.approx(differences)
    assert results["bleu_difference"]["over_sets"]["ci95"] == pytest.approx(mean_interval(differences)[2])
    assert results["bleu_difference"]["over_pairs"]["mean"] == pytest.approx(-0.325)
    assert results["bleu_difference"]["over_pairs"]["ci95"] == pytest.approx(mean_interval([-0.25, -0.4])[2])
    assert results["bleu_difference"]["rows_within"] == 2, "-1.0 twice is outside -0.3"
    assert results["memory_context_gain"]["rows_positive"] == 3
    assert results["memory_context_gain"]["over_sets"]["mean"] == pytest.approx(0.4)
    assert results["chrf_difference"] == pytest.approx(-0.25)
    memory_rare = results["rare_words"]["memory"]
    assert (memory_rare["all_lines"]["correct"], memory_rare["all_lines"]["n"]) == (7, 40)
    assert memory_rare["all_lines"]["ci95"] == pytest.approx(wilson_interval(7, 40))
    assert (memory_rare["in_context_with"]["correct"], memory_rare["in_context_without"]["correct"]) == (4, 1)
    # b0's translations are 9 and 4 words against 7 reference words; m0 translated set b as b0 did, set a not at all
    first, second = results["rows"][0], results["rows"][1]
    assert (first["baseline_length_ratio"], second["baseline_length_ratio"]) == pytest.approx((9 / 7, 4 / 7))
    assert (first["memory_length_ratio"], second["memory_length_ratio"]) == (None, pytest.approx(5 / 7))
    assert first["paired_bootstrap_p"] is None, "no test without both models' translations"
    assert 0 < second["paired_bootstrap_p"] <= 1
    assert results["rows"][2]["paired_bootstrap_p"] is None


def test_translations_are_found_beside_an_evaluation_kept_as_docs_results_keeps_them(runs, tmp_path):
    baselines, memories, data = runs
    kept = tmp_path / "results"
    kept.mkdir()
    for run, name in ((baselines[0], "translation-baseline-seed0"), (memories[0], "translation-memory-seed0")):
        for file in pathlib.Path(run).iterdir():
            (kept / f"{name}-{file.name}").write_bytes(file.read_bytes())
    as_kept = [str(kept / f"translation-{model}-seed0-evaluation.json") for model in ("baseline", "memory")]

    def figures(rows):
        return [{k: v for k, v in row.items() if not k.endswith("_run")} for row in rows]

    rows = translation_compare.compare([as_kept[0], baselines[1]], [as_kept[1], memories[1]], data)["rows"]
    assert figures(rows) == figures(translation_compare.compare(baselines, memories, data)["rows"])
    assert rows[0]["baseline_length_ratio"] is not None and rows[1]["paired_bootstrap_p"] is not None


def test_the_paired_bootstrap_tells_a_real_difference_from_the_draw_of_lines():
    references = [f"ein Hund Nummer {i} läuft über die grüne Wiese" for i in range(40)]
    unrelated = [f"eine Katze {i} schläft" for i in range(40)]
    one_line_off = ["ein Hund läuft", *references[1:]]
    assert translation_compare.paired_figures(unrelated, references, references)["paired_bootstrap_p"] < 0.01
    assert translation_compare.paired_figures(one_line_off, references, references)["paired_bootstrap_p"] > 0.05


def test_the_printed_comparison_names_the_targets_figures(runs, capsys, tmp_path):
    baselines, memories, data = runs
    out = tmp_path / "comparison.json"
    translation_compare.main(["--baseline", *baselines, "--memory", *memories, "--data-dir", str(data),
                              "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "| m0 | a | 30.00 | 29.00 | -1.00 | n/a | -1.00 | +0.50, +0.00 | 1.286, n/a |" in printed
    assert "within -0.3 in 2 of 4" in printed
    assert json.loads(out.read_text())["pairs"] == 2


def test_runs_of_other_vocabularies_seeds_or_lengths_or_swapped_models_are_refused(runs, tmp_path):
    baselines, memories, data = runs
    sets = json.loads((tmp_path / "m0" / "evaluation.json").read_text())["tests"]
    other = write_run(tmp_path / "m-other", "memory", sets, vocabulary="v2")
    with pytest.raises(SystemExit, match="other vocabularies"):
        translation_compare.compare(baselines, [other, memories[1]], data)
    seeded = [write_run(tmp_path / f"{model}-seed", model, sets, seed=seed, trained_steps=7200)
              for model, seed in (("baseline", 0), ("memory", 1))]  # fmt: skip
    with pytest.raises(SystemExit, match=r"other seeds \(0 and 1\)"):
        translation_compare.compare([seeded[0], baselines[1]], [seeded[1], memories[1]], data)
    longer = write_run(tmp_path / "memory-longer", "memory", sets, seed=0, trained_steps=3600)
    with pytest.raises(SystemExit, match="other training lengths"):
        translation_compare.compare([seeded[0], baselines[1]], [longer, memories[1]], data)
    cooled = write_run(tmp_path / "memory-cooled", "memory", sets, seed=0, trained_steps=7200, decay_steps=1200)
    with pytest.raises(SystemExit, match=r"other learning-rate schedules .*\(0.002, 0\) and \(0.002, 1200\)"):
        translation_compare.compare([seeded[0], baselines[1]], [cooled, memories[1]], data)
    assert translation_compare.compare([seeded[0], baselines[1]], [memories[0], memories[1]], data)["pairs"] == 2, (
        "an evaluation that records no seed pairs with one that does"
    )
    with pytest.raises(SystemExit, match="--baseline takes baseline runs"):
        translation_compare.compare(memories, baselines, data)
    with pytest.raises(SystemExit, match="as many --baseline as --memory"):
        translation_compare.compare(baselines, memories[:1], data)
    with pytest.raises(SystemExit, match="no evaluation.json"):
        translation_compare.compare([str(tmp_path / "missing"), baselines[1]], memories, data)
