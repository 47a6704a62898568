"""lmem: run and administer lifelong memory servers.

lmem serve [--host 127.0.0.1] [--port 50051] [--shards S] [--device cpu] [--backend torch]
lmem ls | create NAME [--key-dim ...] | describe NAME | rm NAME      (--url grpc://host:port)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from lifelong_memory.client.store import MemoryInfo, Store, connect
from lifelong_memory.server.errors import InvalidArgument, MemoryServiceError
from lifelong_memory.server.memory import BACKENDS, SEARCH_DTYPES, MemoryConfig

DEFAULT_URL = "grpc://127.0.0.1:50051"
EXIT_CODES = {"NOT_FOUND": 3, "ALREADY_EXISTS": 4, "INVALID_ARGUMENT": 2, "UNAVAILABLE": 5}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmem", description="Lifelong memory: server and administration.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run a memory server")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument("--shards", type=int, help="default shards per memory")
    serve.add_argument("--device", help="default device per memory: cpu or cuda:N")
    serve.add_argument("--backend", choices=BACKENDS, help="default search backend")
    serve.add_argument("--search-dtype", choices=sorted(SEARCH_DTYPES), help="default search dtype")
    serve.add_argument("--max-batch", type=int, default=4096, help="most query rows per request")
    serve.add_argument("--max-message-mb", type=int, default=64, help="largest gRPC message, MiB")
    serve.add_argument("--max-memories", type=int, default=64)
    serve.add_argument("--workers", type=int, default=16, help="gRPC worker threads")
    serve.add_argument("--log-level", default="INFO")

    for name, help_text in (
        ("ls", "list memories"),
        ("describe", "configuration and stats of a memory"),
        ("rm", "delete a memory"),
        ("create", "create a memory"),
    ):
        sub = commands.add_parser(name, help=help_text)
        add_client_options(sub)
        if name != "ls":
            sub.add_argument("name")
        if name == "create":
            for field in dataclasses.fields(MemoryConfig):
                sub.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=None)

    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args, argv)
    try:
        with connect_from_args(args) as store:
            return _admin(store, args)
    except MemoryServiceError as exc:
        print(f"lmem: {exc.code}: {exc}", file=sys.stderr)
        return EXIT_CODES.get(exc.code, 1)


def add_client_options(parser: argparse.ArgumentParser) -> None:
    """Where the server is and how to reach it: the options every client command shares."""
    url = os.environ.get("LMEM_URL", DEFAULT_URL)
    parser.add_argument("--url", default=url, help=f"grpc://host:port, grpcs://host:port or local (default {url})")
    parser.add_argument(
        "--token", default=os.environ.get("LMEM_TOKEN"), help="bearer token (default: $LMEM_TOKEN; never printed)"
    )
    parser.add_argument("--ca-cert", help="PEM file of the CA that signed the server's certificate (grpcs://)")
    parser.add_argument("--client-cert", help="this client's PEM certificate, for mutual TLS")
    parser.add_argument("--client-key", help="this client's PEM private key, for mutual TLS")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def connect_from_args(args: argparse.Namespace) -> Store:
    try:
        return connect(
            args.url,
            token=args.token,
            ca_cert=args.ca_cert,
            client_cert=args.client_cert,
            client_key=args.client_key,
        )
    except (ValueError, OSError) as exc:
        raise InvalidArgument("--url", str(exc)) from None


def _serve(args, argv: list[str] | None) -> int:
    from lifelong_memory.server.service import ServerLimits, serve

    if "OMP_WAIT_POLICY" not in os.environ:
        # Idle OpenMP threads would otherwise spin on the few cores the trainers and gRPC's threads need
        # (docs/benchmarks.md). libgomp reads the policy only when torch loads it, hence the re-exec.
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        argv = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, "-m", "lifelong_memory.client.cli", *argv], env)

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    defaults = {
        name: value
        for name, value in (
            ("shards", args.shards),
            ("device", args.device),
            ("backend", args.backend),
            ("search_dtype", args.search_dtype),
        )
        if value is not None
    }
    limits = ServerLimits(max_batch=args.max_batch, max_message_bytes=args.max_message_mb * 1024 * 1024)
    serve(f"{args.host}:{args.port}", defaults, limits, args.max_memories, args.workers)
    return 0


def _admin(store, args) -> int:
    if args.command == "ls":
        _print([_as_dict(info) for info in store.list_memories()], args.json, table=True)
    elif args.command == "describe":
        _print(_as_dict(store.memory(args.name).info()), args.json)
    elif args.command == "rm":
        store.delete_memory(args.name)
        _print({"deleted": args.name}, args.json)
    elif args.command == "create":
        config = {
            f.name: getattr(args, f.name) for f in dataclasses.fields(MemoryConfig) if getattr(args, f.name) is not None
        }
        _print(_as_dict(store.create_memory(args.name, **config).info()), args.json)
    return 0


def _as_dict(info: MemoryInfo) -> dict:
    return {"name": info.name, "config": dataclasses.asdict(info.config), "stats": info.stats}


def _print(data, as_json: bool, table: bool = False) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
    elif table:
        columns = ("name", "key_dim", "memory_size", "filled_slots", "commit_sequence", "backend", "shards", "device")
        rows = [columns] + [
            tuple(str({**m["config"], **m["stats"], "name": m["name"]}[c]) for c in columns) for m in data
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    elif "config" in data:
        print(f"memory {data['name']}")
        for section in ("config", "stats"):
            print(f"  {section}:")
            for key, value in data[section].items():
                print(f"    {key:<16} {value}")
    else:
        for key, value in data.items():
            print(f"{key}: {value}")


if __name__ == "__main__":
    sys.exit(main())
