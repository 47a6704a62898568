"""A trainer's configuration: the plain values at the top of its module, each with a --flag."""

from __future__ import annotations

import argparse


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
