"""Where a fused query + update spends its time, on any device: torch.profiler's op table and cProfile's
Python functions, for a full memory aged as training leaves it, with the raw search beside it.

    python benchmarks/profile_step.py --device cuda --size 10485760 --batch 16 [--steps 50] [--rows 25]

Prints: the median ms of a synchronised fused call and of torch.topk(q @ K.T, k) on the same device (the
anchor), host synchronisations per call, aten ops launched per call, then the op table (sorted by device time
on CUDA, by CPU time on the CPU) and the Python functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
import warnings

import torch

from lifelong_memory.client.memory_file import entries_state
from lifelong_memory.server.memory import Memory, MemoryConfig

KEY_DIM, CHOOSE_K, BATCH_WRITTEN = 128, 256, 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=1048576)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rows", type=int, default=25, help="rows of each table")
    parser.add_argument("--search-dtype", default="float32")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)

    generator = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(args.size, KEY_DIM, generator=generator), dim=1)
    config = MemoryConfig(
        key_dim=KEY_DIM, memory_size=args.size, choose_k=CHOOSE_K, device=args.device, search_dtype=args.search_dtype
    ).validated()
    state = entries_state(config, keys, torch.arange(args.size), rows_per_commit=BATCH_WRITTEN)
    memory = Memory(config, state=state, max_batch=args.batch)
    fields = frozenset({"positive_negative_keys"})
    batches = []
    for _ in range(args.steps):
        picked = torch.randint(0, args.size, (args.batch,), generator=generator)
        noisy = keys[picked] + 0.05 * torch.randn(args.batch, KEY_DIM, generator=generator)
        batches.append((torch.nn.functional.normalize(noisy, dim=1), picked))

    def steps() -> None:
        for queries, labels in batches:
            memory.query(queries, labels, update=True, fields=fields)
        synchronize()

    def timed(call) -> float:
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            call()
            synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    steps()  # warm-up
    device_keys, device_queries = keys.to(args.device), batches[0][0].to(args.device)
    raw_ms = timed(lambda: torch.topk(device_queries @ device_keys.T, CHOOSE_K))
    calls = iter(batches * 2)
    fused_ms = timed(lambda: memory.query(*next(calls), update=True, fields=fields))
    print(
        f"N={args.size:,} B={args.batch} {args.device} {args.search_dtype}: fused {fused_ms:.3f} ms, raw top-k "
        f"{raw_ms:.3f} ms ({fused_ms / raw_ms:.2f}x)"
    )
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            memory.query(*batches[0], update=True, fields=fields)
        torch.cuda.set_sync_debug_mode("default")
        for warning in caught:
            where = f"{warning.filename}:{warning.lineno}"
            print(f"  synchronisation: {str(warning.message).splitlines()[0][:120]} ({where})")

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as profile:
        steps()
    events = profile.key_averages()
    launched = sum(e.count for e in events if e.key.startswith("aten::") and not e.cpu_parent)
    print(f"aten ops per call (top level): {launched / args.steps:.1f}")
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))

    profiler = cProfile.Profile()
    profiler.enable()
    steps()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(args.rows)


if __name__ == "__main__":
    main()
