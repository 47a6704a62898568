"""A trainer's configuration: the plain values at the top of its module, each with a --flag."""

from __future__ import annotations

import argparse

import torch

from lifelong_memory.server.errors import MemoryServiceError


def configure(defaults: dict, doc: str, argv: list[str] | None = None) -> dict:
    """Every lower-case int, float, str or bool in ``defaults`` (a trainer's globals()) as a --flag of the same
    name with that default, parsed from ``argv`` (the command line when None). The module's own dunders
    (__name__ is a lower-case str too) are no options."""
    config = {
        k: v
        for k, v in defaults.items()
        if k.islower() and not k.startswith("_") and isinstance(v, (int, float, str, bool))
    }
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    return vars(parser.parse_args(argv))


def load_checkpoint(path, trainer: str, holds: tuple[str, ...], map_location="cpu") -> dict:
    """The checkpoint at ``path`` of ``trainer``; a missing file, or another trainer's checkpoint (without the
    entries ``holds``, in it or in its config), is one line naming the path, not a traceback from deep inside."""
    try:
        state = torch.load(path, weights_only=False, map_location=map_location)
    except FileNotFoundError:
        raise SystemExit(f"{path}: no such checkpoint") from None
    found = set(state) | set(state.get("config", {})) if isinstance(state, dict) else set()
    missing = [key for key in holds if key not in found]
    if missing:
        raise SystemExit(f"{path}: not a checkpoint of the {trainer} trainer (it holds no {', '.join(missing)})")
    return state


def run(main) -> None:
    """A trainer's command line: a memory server that is down or went away is one line, not a traceback."""
    try:
        main()
    except MemoryServiceError as exc:
        raise SystemExit(f"the memory answered {exc.code}: {exc}") from None
