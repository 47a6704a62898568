"""Devices a memory can live on: their canonical names, whether this host has them, and their memory.

A device string is checked in two steps. ``canonical_device`` is about the text alone ("cuda" is
"cuda:0", "cpu:0" is "cpu"), so a config read from a file written on another host parses here.
``check_usable`` asks this host (is CUDA there, has it that many GPUs?); it runs where a memory is
placed, after any override of the device, never while a file is parsed.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

from lifelong_memory.server.errors import InvalidArgument

# Largest score matrix one search holds per shard on the CPU: 256 rows of a million float32 slots.
# Bigger batches are searched in row chunks; measured on the CPU (docs/benchmarks.md), where a bigger
# buffer only adds page faults and cache misses.
CPU_SCORE_BUFFER_BYTES = 1 << 30
# On a GPU the chunk is a share of the device's memory instead: an H200's 1/32 (4.4 GiB) holds 112 rows
# of a 10M-slot shard, where the CPU's 1 GiB would split a batch into 25-row matrix products; a 10M x 112
# x 128 product per chunk keeps a GPU busy, and the buffer is allocated up front for every memory.
CUDA_SCORE_BUFFER_SHARE = 32
# Share of the memory free at start that memories may take: the rest is for the process itself (the CUDA
# context, gRPC buffers, a query's temporaries).
BUDGET_SHARE = 0.9


def canonical_device(text, field: str = "config.device") -> str:
    """``text`` as this project names devices: "cpu" or "cuda:N" (InvalidArgument names ``field``)."""
    if not isinstance(text, str):
        raise InvalidArgument(field, f"must be a device string, got {text!r}")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise InvalidArgument(field, f"not a device: {text!r}; use cpu or cuda:N") from None
    if device.type == "cpu":
        if device.index not in (None, 0):
            raise InvalidArgument(field, f"{text!r}: the CPU is one device, without an index; use cpu")
        return "cpu"
    if device.type == "cuda":
        return f"cuda:{device.index or 0}"
    raise InvalidArgument(field, f"must be cpu or cuda:N, got {text!r}")


def check_usable(device: str, field: str = "config.device") -> None:
    """InvalidArgument naming ``field`` unless this host can place memory on ``device`` (a canonical name)."""
    if device == "cpu":
        return
    if not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU build)"
        raise InvalidArgument(
            field, f"{device} requested but CUDA is not available here (torch {torch.__version__}, {built})"
        )
    count = torch.cuda.device_count()
    index = int(device.split(":")[1])
    if index >= count:
        raise InvalidArgument(
            field, f"{device} requested but this host has {count} CUDA device(s): cuda:0..cuda:{count - 1}"
        )


# /proc/cpuinfo flags of CPUs that multiply bfloat16 matrices in hardware: x86's AVX-512 BF16 and AMX, Arm's BF16.
NATIVE_BFLOAT16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def native_bfloat16(cpuinfo: str) -> bool | None:
    """Whether the CPU that ``cpuinfo`` (the text of /proc/cpuinfo) describes has bfloat16 matrix instructions;
    None if the text lists no flags. Without them torch widens bf16 to float32 element by element, and a bf16
    search is several times slower than a float32 one (3-5x on an AVX2-only EPYC, docs/benchmarks.md)."""
    flags = re.search(r"^(?:flags|Features)\s*:(.*)$", cpuinfo, re.MULTILINE)
    return None if flags is None else bool(NATIVE_BFLOAT16_FLAGS & set(flags.group(1).split()))


@functools.cache
def cpu_has_native_bfloat16() -> bool | None:
    """``native_bfloat16`` of this host's CPU; None where /proc/cpuinfo cannot be read (not Linux)."""
    try:
        return native_bfloat16(Path("/proc/cpuinfo").read_text())
    except OSError:
        return None


def memory_available(device: str) -> int:
    """Bytes still free on a CUDA device (canonical name), as the driver reports them."""
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def score_buffer_bytes(device: str) -> int:
    """Largest score matrix one shard's search holds at once on ``device``."""
    if device == "cpu":
        return CPU_SCORE_BUFFER_BYTES
    _free, total = torch.cuda.mem_get_info(torch.device(device))
    return int(total) // CUDA_SCORE_BUFFER_SHARE


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: CUDA's OutOfMemoryError, the CPU allocator's RuntimeError, or a CUDA call's
    cudaErrorMemoryAllocation, which torch raises as AcceleratorError ("CUDA error: out of memory"): a context
    or library handle that cannot be created because another process holds the device's memory (seen on an
    H200 whose memory another process's caching allocator held)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = str(exc)
    if isinstance(exc, getattr(torch, "AcceleratorError", ())):
        return "CUDA error: out of memory" in message
    return isinstance(exc, RuntimeError) and "can't allocate memory" in message
