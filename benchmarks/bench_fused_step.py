"""The embedded fused step (query + update) against a baseline revision's and raw torch, side by side in one process.

    .venv/bin/python benchmarks/bench_fused_step.py --baseline ac97d93 [--shapes 8192x16,65536x16,8192x256]

server/memory.py and server/index.py are loaded as they were at ``--baseline`` (``git show``), next to the
installed ones, and both memories get the same fill and the same calls: after each measured call their
answers and states must be equal bit for bit ("same" in the table), so a speed-up that changed a result
would show. Per shape (N slots, B rows; d = 128, k = 256, age noise 8) the cases run interleaved, a few calls
each in turn, so load from elsewhere hits them alike:

  raw       torch.topk(q @ K.T, k), K float32 [N, 128]: the anchor of issue 10's target (<= 1.5x at N = 8,192,
            B = 16)
  raw-out   the same into a kept [B, N] buffer
  baseline  Memory.query(q, labels, update=True, fields={"positive_negative_keys"}) at --baseline
  current   the same with the installed code, untagged
  tagged    with --writer: the installed code again, a third memory with the same fill, whose calls carry that
            writer tag; tagged/current is the tag's cost, measured in the same run, interleaved

``--backend lsh`` or ``faiss-ivf`` gives both memories that approximate index (the raw anchors stay exact):
with a sublinear search, what the step does outside the search shows. The memories are filled N / 256 slots
per commit, so a full memory's oldest slots come in groups of N / 256 of one age. ``--fresh`` starts both from
empty memories instead: every slot of one age, so each write scores every slot (a new memory's first writes).
``--episode L`` starts them empty too and clears them (untimed) before every L-th call: Omniglot's training, whose
memory is cleared each episode of L = 30 steps, so that at most L x B of its slots are ever filled.

Reported: median ms per call, ratios, and whether the answers were the same. Table and JSON (--out).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import lifelong_memory.server.memory as current

KEY_DIM, CHOOSE_K, AGE_NOISE = 128, 256, 8.0
FIELDS = frozenset({"positive_negative_keys"})
BATCHES = 8  # distinct query batches, cycled
STATE = ("keys", "values", "ages", "generations")
ANSWERS = ("predictions", "written_slots", "incorrect", "positive_keys", "negative_keys")


def load_baseline(revision: str, folder: pathlib.Path):
    """The memory module as it was at ``revision``, importing that revision's index module."""
    repo = pathlib.Path(__file__).resolve().parent.parent

    def source(path: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), "show", f"{revision}:{path}"], capture_output=True, text=True, check=True
        ).stdout

    modules = {}
    index_source = source("server/index.py")
    memory_source = source("server/memory.py").replace(
        "from lifelong_memory.server.index import", "from baseline_index import"
    )
    for name, text in (("baseline_index", index_source), ("baseline_memory", memory_source)):
        file = folder / f"{name}.py"
        file.write_text(text)
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        modules[name] = module
    return modules["baseline_memory"]


def unit_rows(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, KEY_DIM, generator=generator), dim=1)


def filled(module, n: int, max_batch: int, backend: str, fresh: bool = False):
    """A memory of ``module`` with every slot written (the same keys for every module), or none (``fresh``).
    Small batches: the empty slots soon are older than the age noise can hide, so writes land in them."""
    memory = module.Memory(
        module.MemoryConfig(key_dim=KEY_DIM, memory_size=n, choose_k=CHOOSE_K, age_noise=AGE_NOISE, backend=backend),
        max_batch=max(max_batch, n // 256),
    )
    if fresh:
        return memory
    generator = torch.Generator().manual_seed(n)
    label = 0
    while memory.empty_slots:
        batch = min(n // 256, memory.empty_slots)
        labels = torch.arange(label, label + batch)
        label += batch
        none = torch.full((batch, 2), -1, dtype=torch.int64)  # relied on no slot: every row writes
        memory.update(unit_rows(batch, generator), labels, module.QueryTicket(none, none.clone(), CHOOSE_K, True))
    return memory


def same(a, b) -> bool:
    """Equal bit for bit: float tensors compared as their bits."""
    if a.dtype == torch.float32:
        return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))
    return torch.equal(a, b)


def bench_shape(
    baseline, n: int, b: int, seconds: float, writer: str, backend: str, fresh: bool, episode: int = 0
) -> dict:
    fresh = fresh or bool(episode)
    memories = {"baseline": filled(baseline, n, b, backend, fresh), "current": filled(current, n, b, backend, fresh)}
    if writer:
        memories["tagged"] = filled(current, n, b, backend, fresh)
    generator = torch.Generator().manual_seed(n + b)
    keys = unit_rows(n, generator)
    buffer = torch.empty(b, n)
    queries = [unit_rows(b, generator) for _ in range(BATCHES)]
    labels = [torch.randint(0, n, (b,), generator=generator) for _ in range(BATCHES)]
    answers = {}

    def fused(name, **tag):
        def call(i):
            answers[name] = memories[name].query(
                queries[i % BATCHES], labels[i % BATCHES], update=True, fields=FIELDS, **tag
            )

        return call

    cases = {
        "raw": lambda i: torch.topk(queries[i % BATCHES] @ keys.T, CHOOSE_K),
        "raw-out": lambda i: torch.topk(torch.mm(queries[i % BATCHES], keys.T, out=buffer), CHOOSE_K),
        "baseline": fused("baseline"),
        "current": fused("current"),
    }
    if writer:
        cases["tagged"] = fused("tagged", writer=writer)
    times = {name: [] for name in cases}
    agree = True
    step = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or step < 10:
        if episode and step % episode == 0:
            for memory in memories.values():
                memory.clear()
        for name, call in cases.items():
            started = time.perf_counter()
            call(step)
            if step >= 2:  # the first calls warm up allocators
                times[name].append(time.perf_counter() - started)
        # Every memory took the same call: their answers and states must be equal (a tag changes neither).
        for other in memories.keys() - {"baseline"}:
            agree &= all(same(getattr(answers["baseline"], f), getattr(answers[other], f)) for f in ANSWERS)
            agree &= all(same(getattr(memories["baseline"], s), getattr(memories[other], s)) for s in STATE)
        step += 1
    median = {name: 1e3 * statistics.median(values) for name, values in times.items()}
    tag_cost = {"tagged/current": median["tagged"] / median["current"]} if writer else {}
    return {
        "N": n,
        "B": b,
        "backend": backend,
        "fresh": fresh,
        "episode": episode,
        "calls": step,
        "median_ms": median,
        "baseline/raw": median["baseline"] / median["raw"],
        "current/raw": median["current"] / median["raw"],
        "current/baseline": median["current"] / median["baseline"],
        **tag_cost,
        "same": bool(agree),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="git revision whose memory is compared")
    parser.add_argument("--shapes", default="8192x16,65536x16,8192x256", help="NxB, comma-separated")
    parser.add_argument("--seconds", type=float, default=8.0, help="per shape")
    parser.add_argument("--writer", default="", help="the current memory's calls carry this writer tag")
    parser.add_argument(
        "--backend", default="torch", help="the memories' search backend (torch, faiss, lsh, faiss-ivf)"
    )
    parser.add_argument(
        "--fresh", action="store_true", help="start from empty memories: every slot of one age, the first writes"
    )
    parser.add_argument(
        "--episode", type=int, default=0, help="clear the memories before every EPISODE-th call (Omniglot: 30)"
    )
    parser.add_argument("--out", default="benchmarks/results/fused-step.json")
    args = parser.parse_args(argv)
    shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        baseline = load_baseline(args.baseline, pathlib.Path(folder))
        rows = [
            bench_shape(baseline, n, b, args.seconds, args.writer, args.backend, args.fresh, args.episode)
            for n, b in shapes
        ]
    print(
        f"embedded fused query + update, d={KEY_DIM} k={CHOOSE_K}, backend {args.backend}"
        f"{', fresh memories' if args.fresh else ''}{f', cleared every {args.episode} calls' if args.episode else ''}; "
        f"torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}; median ms per call"
    )
    header = f"{'N':>9} {'B':>4} {'raw':>8} {'raw-out':>8} {'baseline':>9} {'current':>8} "
    header += f"{'base/raw':>9} {'cur/raw':>8} {'cur/base':>9} "
    header += f"{'tagged':>8} {'tag/cur':>8} same" if args.writer else "same"
    print(header)
    for r in rows:
        m = r["median_ms"]
        tagged = f"{m['tagged']:>8.3f} {r['tagged/current']:>7.4f}x " if args.writer else ""
        print(
            f"{r['N']:>9,} {r['B']:>4} {m['raw']:>8.3f} {m['raw-out']:>8.3f} {m['baseline']:>9.3f} "
            f"{m['current']:>8.3f} {r['baseline/raw']:>8.2f}x {r['current/raw']:>7.2f}x "
            f"{r['current/baseline']:>8.2f}x {tagged}{r['same']}"
        )
    report = {
        "benchmark": "bench_fused_step",
        "baseline": args.baseline,
        "writer": args.writer,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "results": rows,
    }
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
