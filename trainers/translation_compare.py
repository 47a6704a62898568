"""The memory model against the baseline, like for like: paired translation runs' evaluations side by side.

Each --memory run is paired with the --baseline run in the same position (the same seed, trained as long, on the
same vocabulary and learning-rate schedule: a pair whose evaluations record other seeds, training lengths,
schedules, vocabulary fingerprints or test sets is refused; evaluations before 2026-12-05 record no seed or
length, older ones no vocabulary, and those before 2026-12-06 no schedule: theirs was 2e-3, constant).
A run is its out_dir (evaluation.json; translations-SET.txt beside it give the output length against the
references) or an evaluation file (NAME-evaluation.json, with NAME-translations-SET.txt beside it). Printed as
markdown, and with --json as one JSON file:

  per pair and test set: BLEU, chrF, their differences, the context test's gain for each model; where the
  translations lie beside both evaluations, each model's output length against the references and the paired
  bootstrap's p-value for the BLEU difference (the test lines' draw only: it says nothing of other seeds);
  over every (pair, set): the mean BLEU difference with a 95% t interval, taken over the (pair, set) differences
  and over the pairs' mean differences (pairs are seeds: the sets of one seed share its model, so the second is
  the honest one when seeds differ), how many are within -0.3; the memory model's context gain likewise;
  rare words (reference words seen at most once in training, all lines) and the rare words the context shows,
  summed over the runs, with Wilson intervals.

    python -m lifelong_memory.trainers.translation_compare \\
        --baseline runs/translation-baseline7200-s{0,1,2,3} --memory runs/translation-context7200-s{0,1,2,3}
"""

from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import statistics

from lifelong_memory.trainers.statistics import mean_interval, wilson_interval

WITHIN = -0.3  # issue 16's target: the memory model's BLEU at least the baseline's minus this much


def evaluation_file(run: str) -> pathlib.Path:
    path = pathlib.Path(run)
    path = path / "evaluation.json" if path.is_dir() else path
    if not path.is_file():
        raise SystemExit(f"{run}: no evaluation.json (a run's out_dir or its evaluation.json)")
    return path


def translations(path: pathlib.Path, test_set: str, lines: int) -> list[str] | None:
    """The run's translations of ``test_set`` beside its evaluation, when they are there and cover every line: named
    as the evaluation, translations-SET.txt for evaluation.json (a run's out_dir), and as docs/results keeps a run's
    files, NAME-translations-SET.txt for NAME-evaluation.json."""
    file = path.with_name(path.name.removesuffix("evaluation.json") + f"translations-{test_set}.txt")
    if not file.is_file():
        return None
    outputs = file.read_text(encoding="utf-8").splitlines()
    return outputs if len(outputs) == lines else None


def paired_figures(baseline: list[str] | None, memory: list[str] | None, references: list[str] | None) -> dict:
    """Each model's output length against the references' as BLEU counts them (sacrebleu's 13a tokens), and the
    paired bootstrap's p-value (Koehn 2004: sacrebleu's, 1,000 resamples of the test lines, its fixed seed) that
    the memory model's BLEU differs from the baseline's only by the draw of test lines."""
    import sacrebleu
    from sacrebleu.significance import PairedTest

    figures = {"baseline_length_ratio": None, "memory_length_ratio": None, "paired_bootstrap_p": None}
    if references is None:
        return figures
    for model, outputs in (("baseline", baseline), ("memory", memory)):
        if outputs is not None:
            bleu = sacrebleu.corpus_bleu(outputs, [references])
            figures[f"{model}_length_ratio"] = bleu.sys_len / bleu.ref_len
    if baseline is not None and memory is not None:
        test = PairedTest([("baseline", baseline), ("memory", memory)], {"BLEU": sacrebleu.BLEU()}, [references],
                          test_type="bs", n_samples=1000)  # fmt: skip
        figures["paired_bootstrap_p"] = float(test()[1]["BLEU"][1].p_value)
    return figures


def reference_lines(data_dir: pathlib.Path, test_set: str, target_language: str, lines: int) -> list[str] | None:
    path = data_dir / f"{test_set}.{target_language}.gz"
    if not path.is_file():
        return None
    with gzip.open(path, "rt", encoding="utf-8") as f:
        references = [line.rstrip("\n") for line in f]
    return references if len(references) == lines else None  # a run on the first N lines only


def check_pair(baseline: dict, memory: dict, names: tuple[str, str]) -> None:
    if baseline.get("model") != "baseline" or memory.get("model") != "memory":
        raise SystemExit(f"{names}: --baseline takes baseline runs, --memory memory runs "
                         f"(got {baseline.get('model')!r}, {memory.get('model')!r})")  # fmt: skip
    for field, what in (("seed", "seeds"), ("trained_steps", "training lengths")):
        if field in baseline and field in memory and baseline[field] != memory[field]:
            raise SystemExit(f"{names}: other {what} ({baseline[field]} and {memory[field]}); pair runs in order")
    schedules = [(run.get("learning_rate", 2e-3), run.get("decay_steps", 0)) for run in (baseline, memory)]
    if schedules[0] != schedules[1]:  # evaluations before 2026-12-06 record none: 2e-3, constant
        raise SystemExit(f"{names}: other learning-rate schedules (learning rate, decay steps: {schedules[0]} and "
                         f"{schedules[1]})")  # fmt: skip
    prints = baseline.get("vocabulary"), memory.get("vocabulary")
    if None not in prints and prints[0] != prints[1]:
        raise SystemExit(f"{names}: trained on other vocabularies ({prints[0]} and {prints[1]}); their BLEU is "
                         "not like for like (train one with --vocabulary-dir of the other)")  # fmt: skip
    sets = {name: test["lines"] for name, test in baseline["tests"].items()}
    if sets != {name: test["lines"] for name, test in memory["tests"].items()}:
        raise SystemExit(f"{names}: other test sets or line counts")


def summed_rare_words(evaluations: list[dict], group: str, context: str | None = None) -> dict:
    """One rare-word group over every run and test set: all lines (context None), or the odd lines ``without`` or
    ``with`` the context."""
    correct = n = 0
    for evaluation in evaluations:
        for test in evaluation["tests"].values():
            words = test["rare_words"] if context is None else test["context"][context]["rare_words"]
            correct, n = correct + words[group]["correct"], n + words[group]["n"]
    return {"correct": correct, "n": n, "accuracy": correct / n if n else None, "ci95": wilson_interval(correct, n)}


def summary(values: list[float]) -> dict:
    mean, sd, interval = mean_interval(values)
    return {"mean": mean, "sd": sd, "ci95": interval, "n": len(values)}


def compare(baseline_runs: list[str], memory_runs: list[str], data_dir: pathlib.Path, target_language="de") -> dict:
    if len(baseline_runs) != len(memory_runs) or len(baseline_runs) < 2:
        raise SystemExit(f"give as many --baseline as --memory runs, at least two pairs "
                         f"(got {len(baseline_runs)} and {len(memory_runs)})")  # fmt: skip
    paths = [(evaluation_file(b), evaluation_file(m)) for b, m in zip(baseline_runs, memory_runs, strict=True)]
    loaded = [(json.loads(b.read_text()), json.loads(m.read_text())) for b, m in paths]
    rows, pair_means, pair_gains = [], [], []
    for (baseline_path, memory_path), (baseline, memory) in zip(paths, loaded, strict=True):
        check_pair(baseline, memory, (str(baseline_path), str(memory_path)))
        differences, gains = [], []
        for test_set, base in baseline["tests"].items():
            mem = memory["tests"][test_set]
            rows.append({
                "baseline_run": str(baseline_path.parent if baseline_path.name == "evaluation.json" else baseline_path),
                "memory_run": str(memory_path.parent if memory_path.name == "evaluation.json" else memory_path),
                "test_set": test_set,
                "baseline_bleu": base["bleu"],
                "memory_bleu": mem["bleu"],
                "bleu_difference": mem["bleu"] - base["bleu"],
                "chrf_difference": mem["chrf"] - base["chrf"],
                "memory_context_gain": mem["context"]["gain_bleu"],
                "baseline_context_gain": base["context"]["gain_bleu"],
                **paired_figures(translations(baseline_path, test_set, base["lines"]),
                                 translations(memory_path, test_set, mem["lines"]),
                                 reference_lines(data_dir, test_set, target_language, base["lines"])),
            })  # fmt: skip
            differences.append(rows[-1]["bleu_difference"])
            gains.append(rows[-1]["memory_context_gain"])
        pair_means.append(statistics.mean(differences))
        pair_gains.append(statistics.mean(gains))
    differences = [row["bleu_difference"] for row in rows]
    gains = [row["memory_context_gain"] for row in rows]
    baselines, memories = [b for b, _ in loaded], [m for _, m in loaded]
    return {
        "pairs": len(paths),
        "rows": rows,
        "bleu_difference": {
            "over_sets": summary(differences),
            "over_pairs": summary(pair_means),
            "within": WITHIN,
            "rows_within": sum(d >= WITHIN for d in differences),
        },
        "chrf_difference": statistics.mean(row["chrf_difference"] for row in rows),
        "memory_context_gain": {
            "over_sets": summary(gains),
            "over_pairs": summary(pair_gains),
            "rows_positive": sum(g > 0 for g in gains),
        },
        "baseline_context_gain": statistics.mean(row["baseline_context_gain"] for row in rows),
        "rare_words": {
            model: {
                "all_lines": summed_rare_words(evaluations, "at most once"),
                "in_context_without": summed_rare_words(evaluations, "in context", "without"),
                "in_context_with": summed_rare_words(evaluations, "in context", "with"),
            }
            for model, evaluations in (("baseline", baselines), ("memory", memories))
        },
    }


def markdown(results: dict) -> str:
    def ratio(x):
        return "n/a" if x is None else f"{x:.3f}"

    def probability(p):
        return "n/a" if p is None else f"{p:.3f}"

    def interval(s):
        return f"{s['mean']:+.2f} (sd {s['sd']:.2f}, 95% [{s['ci95'][0]:+.2f}, {s['ci95'][1]:+.2f}], n = {s['n']})"

    def share(r):
        low, high = r["ci95"]
        accuracy = "n/a" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%"
        return f"{r['correct']} of {r['n']} = {accuracy} [{100 * low:.2f}, {100 * high:.2f}]"

    lines = [
        "| memory run | test set | baseline BLEU | memory BLEU | difference | paired bootstrap p | chrF difference | "
        "context gain: memory, baseline | length / reference: baseline, memory |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {pathlib.Path(row['memory_run']).name} | {row['test_set']} | {row['baseline_bleu']:.2f} | "
            f"{row['memory_bleu']:.2f} | {row['bleu_difference']:+.2f} | {probability(row['paired_bootstrap_p'])} | "
            f"{row['chrf_difference']:+.2f} | "
            f"{row['memory_context_gain']:+.2f}, {row['baseline_context_gain']:+.2f} | "
            f"{ratio(row['baseline_length_ratio'])}, {ratio(row['memory_length_ratio'])} |"
        )
    bleu, gain = results["bleu_difference"], results["memory_context_gain"]
    lines += [
        "",
        f"- BLEU, memory - baseline, over the (pair, set) rows: {interval(bleu['over_sets'])}; within "
        f"{bleu['within']} in {bleu['rows_within']} of {bleu['over_sets']['n']}",
        f"- the same over the {results['pairs']} pairs' means: {interval(bleu['over_pairs'])}",
        f"- chrF, memory - baseline: {results['chrf_difference']:+.2f} on average",
        f"- context gain, memory model, over the rows: {interval(gain['over_sets'])}; positive in "
        f"{gain['rows_positive']} of {gain['over_sets']['n']}",
        f"- the same over the pairs' means: {interval(gain['over_pairs'])}; baseline: "
        f"{results['baseline_context_gain']:+.2f} on average",
    ]
    for model in ("baseline", "memory"):
        rare = results["rare_words"][model]
        lines.append(
            f"- rare words, {model}: all lines {share(rare['all_lines'])}; the context's, on the odd lines, "
            f"without the context {share(rare['in_context_without'])}, with it {share(rare['in_context_with'])}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", nargs="+", required=True, help="baseline runs (out_dir or evaluation.json)")
    parser.add_argument("--memory", nargs="+", required=True, help="memory runs, in the baselines' order")
    parser.add_argument("--data-dir", default="../shared/data/multi30k", help="the references, for output lengths")
    parser.add_argument("--json", default="", help="also write the comparison here")
    args = parser.parse_args(argv)
    results = compare(args.baseline, args.memory, pathlib.Path(args.data_dir))
    print(markdown(results))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
