"""lmem: run and administer lifelong memory servers.

lmem serve [--host 127.0.0.1] [--port 50051] [--shards S] [--device cpu] [--devices cuda:0,cuda:1] [--backend torch]
lmem ls | create NAME [--key-dim ...] | describe NAME | rm NAME      (--url grpc://host:port)
lmem snapshot NAME | export NAME FILE | import NAME FILE [--backend ...]   (durability, portability)
lmem retrain NAME                                                    (a faiss-ivf memory's quantizer, anew)
lmem stats | watch | slots | neighbors | labels LABEL | plot  NAME   (inspection; --json on every command)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np
import torch

from lifelong_memory.client.store import DEFAULT_TIMEOUT, MemoryClient, MemoryInfo, Store, connect
from lifelong_memory.server.errors import FailedPrecondition, InvalidArgument, MemoryServiceError
from lifelong_memory.server.index import check_one_faiss
from lifelong_memory.server.logs import LOG_FORMATS, LOG_LEVELS, configure_logging
from lifelong_memory.server.memory import (
    BACKENDS,
    EMPTY,
    NO_SLOT,
    PLACEMENTS,
    SEARCH_DTYPES,
    UNIT_NORM_TOLERANCE,
    MemoryConfig,
    MemoryReport,
)
from lifelong_memory.server.persistence import SYNC_POLICIES, Durability

DEFAULT_URL = "grpc://127.0.0.1:50051"
EXIT_CODES = {
    "NOT_FOUND": 3,
    "ALREADY_EXISTS": 4,
    "INVALID_ARGUMENT": 2,
    "UNAVAILABLE": 5,
    "PERMISSION_DENIED": 6,
    "UNAUTHENTICATED": 7,
    "DEADLINE_EXCEEDED": 8,
    "FAILED_PRECONDITION": 9,
    "RESOURCE_EXHAUSTED": 10,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmem", description="Lifelong memory: server and administration.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run a memory server")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=tcp_port, default=50051, help="0: any free port (printed)")
    serve.add_argument(
        "--listen",
        type=unix_address,
        metavar="unix:///PATH",
        help="serve on this Unix domain socket instead of --host/--port: for clients on this host "
        "(connect('unix:///PATH'), lmem --url unix:///PATH), the shortest way there",
    )
    serve.add_argument("--shards", type=int, help="default shards per memory")
    serve.add_argument(
        "--device",
        help="default device per memory: cpu or cuda:N; checked at start (exit 2 if this host lacks it); also "
        "where a recovered memory goes whose device this host lacks",
    )
    serve.add_argument("--devices", type=device_list, help="default devices of the shards, e.g. cuda:0,cuda:1")
    serve.add_argument("--backend", choices=BACKENDS, help="default search backend")
    serve.add_argument("--search-dtype", choices=sorted(SEARCH_DTYPES), help="default search dtype")
    serve.add_argument("--max-batch", type=positive_int, default=4096, help="most query rows per request")
    serve.add_argument(
        "--max-message-mb", type=message_mb, default=64, help="largest gRPC message, MiB (1 to 2047, default 64)"
    )
    serve.add_argument("--max-memories", type=positive_int, default=64)
    serve.add_argument(
        "--max-query-mb",
        type=positive_int,
        help="working memory one query may use, MiB (default: an eighth of the memory budget, at most 1024)",
    )
    serve.add_argument(
        "--workers", type=positive_int, default=16, help="threads that run the memories' work (default 16)"
    )
    serve.add_argument(
        "--max-calls", type=positive_int, default=1024, help="most calls in progress at once (default 1024)"
    )
    serve.add_argument(
        "--max-calls-per-peer",
        type=positive_int,
        default=256,
        help="most calls in progress at once from one client address (default 256)",
    )
    serve.add_argument(
        "--idle-timeout",
        type=positive_seconds,
        default=300.0,
        help="close a call whose client sends no message for this many seconds, e.g. an idle QueryStream (default 300)",
    )
    serve.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO")
    serve.add_argument("--log-format", choices=LOG_FORMATS, default="text", help="text, or json lines (default text)")
    serve.add_argument(
        "--metrics-port",
        type=tcp_port,
        default=os.environ.get("LMEM_METRICS_PORT", "0"),
        help="serve Prometheus metrics at http://METRICS_HOST:PORT/metrics (default: $LMEM_METRICS_PORT; 0: off)",
    )
    serve.add_argument(
        "--metrics-host",
        default=os.environ.get("LMEM_METRICS_HOST", "127.0.0.1"),
        help="address the metrics bind; they need no token and name every memory "
        "(default: $LMEM_METRICS_HOST, else 127.0.0.1)",
    )
    durable = serve.add_argument_group("durability")
    durable.add_argument(
        "--data-dir",
        default=os.environ.get("LMEM_DATA_DIR"),
        help="keep memories here across restarts (default: $LMEM_DATA_DIR; unset: in memory only)",
    )
    durable.add_argument(
        "--sync",
        choices=SYNC_POLICIES,
        default="always",
        help="when a write is acknowledged: always = after fsync (group commit); interval = after the OS has it, "
        "fsync every --sync-interval-ms; off = after the OS has it (default always)",
    )
    durable.add_argument("--sync-interval-ms", type=float, default=50.0, help="fsync period under --sync interval")
    durable.add_argument("--snapshot-interval", type=float, default=600.0, help="seconds between snapshots")
    durable.add_argument("--snapshot-wal-mb", type=int, default=256, help="snapshot once a log grew this much")
    serve.add_argument(
        "--memory-budget-gb",
        type=positive_gb,
        help="most memory all memories may take (default: 90%% of what is free)",
    )
    cluster = serve.add_argument_group("cluster (needs lifelong-memory[cluster]; docs/scale-out.md)")
    cluster.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="a Ray cluster (a head's host:port, or auto): memories created with placement node or gpu put each "
        "shard in an actor on its nodes",
    )
    cluster.add_argument(
        "--placement",
        choices=PLACEMENTS,
        help="default placement of the shards: local (this process), node (an actor per shard, spread over the "
        "nodes), gpu (an actor with a GPU per shard)",
    )
    cluster.add_argument(
        "--shard-data-dir",
        default="/tmp/lmem-shards",
        help="folder on every node where the shards keep their keys (snapshot and log; default /tmp/lmem-shards)",
    )
    cluster.add_argument(
        "--shard-timeout",
        type=positive_seconds,
        default=30.0,
        help="seconds to wait for a shard's answer before the memory answers UNAVAILABLE (default 30)",
    )
    security = serve.add_argument_group("security")
    security.add_argument(
        "--tokens",
        default=os.environ.get("LMEM_TOKENS_FILE"),
        help="file of 'ROLE TOKEN' lines (roles: read-only, read-write); every call then needs a token "
        "(default: $LMEM_TOKENS_FILE)",
    )
    security.add_argument("--tls-cert", help="this server's PEM certificate: serve over TLS")
    security.add_argument("--tls-key", help="the PEM private key of --tls-cert")
    security.add_argument("--tls-client-ca", help="PEM CA that must have signed client certificates (mutual TLS)")

    for name, help_text in (
        ("ls", "list memories"),
        ("describe", "configuration and stats of a memory"),
        ("rm", "delete a memory"),
        ("create", "create a memory"),
        ("snapshot", "snapshot a memory into the server's data directory now"),
        ("retrain", "train a faiss-ivf memory's quantizer anew on its current keys (queries go on)"),
        ("export", "write a memory to a portable file"),
        ("import", "create a memory from an exported or snapshot file"),
    ):
        sub = commands.add_parser(name, help=help_text)
        add_client_options(sub)
        if name != "ls":
            sub.add_argument("name")
        if name in ("export", "import"):
            sub.add_argument("file")
        if name == "create":
            for field in dataclasses.fields(MemoryConfig):
                kind = device_list if field.name == "devices" else type(field.default)
                sub.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=None)
        if name == "import":  # how the imported memory is searched; what it holds comes from the file
            sub.add_argument("--device")
            sub.add_argument("--devices", type=device_list)
            sub.add_argument("--backend", choices=BACKENDS)
            sub.add_argument("--search-dtype", choices=sorted(SEARCH_DTYPES))
            sub.add_argument("--shards", type=int)
            sub.add_argument("--placement", choices=PLACEMENTS)
            for field in ("lsh_tables", "lsh_bits", "lsh_probes", "ivf_lists", "ivf_probes"):
                sub.add_argument(f"--{field.replace('_', '-')}", type=int)
            sub.add_argument("--ivf-codes")
            sub.add_argument("--ivf-quantizer")
    _add_inspection_commands(commands)

    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args, argv)
    try:
        with connect_from_args(args) as store:
            inspection = INSPECTION_COMMANDS.get(args.command)
            return inspection(store, args) if inspection else _admin(store, args)
    except MemoryServiceError as exc:
        print(f"lmem: {exc.code}: {exc}", file=sys.stderr)
        return EXIT_CODES.get(exc.code, 1)


def add_client_options(parser: argparse.ArgumentParser) -> None:
    """Where the server is and how to reach it: the options every client command shares."""
    url = os.environ.get("LMEM_URL", DEFAULT_URL)
    parser.add_argument(
        "--url", default=url, help=f"grpc://host:port, grpcs://host:port, unix:///path or local (default {url})"
    )
    parser.add_argument(
        "--token", default=os.environ.get("LMEM_TOKEN"), help="bearer token (default: $LMEM_TOKEN; never printed)"
    )
    parser.add_argument("--ca-cert", help="PEM file of the CA that signed the server's certificate (grpcs://)")
    parser.add_argument("--client-cert", help="this client's PEM certificate, for mutual TLS")
    parser.add_argument("--client-key", help="this client's PEM private key, for mutual TLS")
    parser.add_argument(
        "--timeout",
        type=non_negative_seconds,
        default=DEFAULT_TIMEOUT,
        help=f"seconds to wait for each answer, an export or import as a whole (default {DEFAULT_TIMEOUT:g}; 0: none)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def connect_from_args(args: argparse.Namespace) -> Store:
    try:
        return connect(
            args.url,
            token=args.token,
            ca_cert=args.ca_cert,
            client_cert=args.client_cert,
            client_key=args.client_key,
            timeout=args.timeout or None,
        )
    except (ValueError, OSError) as exc:
        raise InvalidArgument("--url", str(exc)) from None


def device_list(text: str) -> tuple[str, ...]:
    """--devices cuda:0,cuda:1"""
    return tuple(part.strip() for part in text.split(","))


def non_negative_seconds(text: str) -> float:
    seconds = float(text)
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number of seconds >= 0")
    return seconds


def positive_seconds(text: str) -> float:
    seconds = non_negative_seconds(text)
    if seconds == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return seconds


def positive_int(text: str) -> int:
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{number} is not >= 1")
    return number


def unix_address(text: str) -> str:
    if not text.startswith("unix:"):
        raise argparse.ArgumentTypeError(f"{text!r} is not unix:///path (for TCP: --host and --port)")
    return text


def message_mb(text: str) -> int:
    size = int(text)
    if not 1 <= size <= 2047:  # gRPC's limits are int32 bytes
        raise argparse.ArgumentTypeError(f"{size} is not in [1, 2047]")
    return size


def positive_gb(text: str) -> float:
    size = float(text)
    if not (size > 0 and math.isfinite(size)):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number of GiB > 0")
    return size


def tcp_port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not in [0, 65535]")
    return port


def _serve(args, argv: list[str] | None) -> int:
    from lifelong_memory.server.auth import TokenAuth, server_credentials
    from lifelong_memory.server.registry import MemoryRegistry
    from lifelong_memory.server.service import ServerLimits, format_address, serve

    if "OMP_WAIT_POLICY" not in os.environ:
        # Idle OpenMP threads would otherwise spin on the few cores the trainers and gRPC's threads need
        # (docs/benchmarks.md). libgomp reads the policy only when torch loads it, hence the re-exec.
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        argv = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, "-m", "lifelong_memory.client.cli", *argv], env)

    configure_logging(args.log_level, args.log_format)
    defaults = {
        name: value
        for name, value in (
            ("shards", args.shards),
            ("device", args.device),
            ("devices", args.devices),
            ("backend", args.backend),
            ("search_dtype", args.search_dtype),
            ("placement", args.placement),
        )
        if value is not None
    }
    limits = ServerLimits(
        max_batch=args.max_batch,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        max_calls=args.max_calls,
        max_calls_per_peer=args.max_calls_per_peer,
        idle_timeout=args.idle_timeout,
    )
    try:
        check_serving_devices(defaults)
    except (InvalidArgument, FailedPrecondition) as exc:  # loudly, before anything is served
        print(f"lmem serve: cannot serve: {exc}", file=sys.stderr)
        return 2
    try:
        auth = TokenAuth.from_file(args.tokens) if args.tokens else None
        if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
            raise ValueError("--tls-cert and --tls-key go together; --tls-client-ca needs them")
        credentials = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
        durability = Durability(
            sync=args.sync,
            sync_interval=args.sync_interval_ms / 1000,
            snapshot_interval=args.snapshot_interval,
            snapshot_wal_bytes=args.snapshot_wal_mb << 20,
        )
        cluster = None
        if args.cluster:
            from lifelong_memory.server.cluster import RayCluster

            cluster = RayCluster(args.cluster, args.shard_data_dir, call_timeout=args.shard_timeout)
        registry = MemoryRegistry(
            defaults,
            cluster=cluster,
            max_memories=args.max_memories,
            data_dir=args.data_dir,
            durability=durability,
            memory_budget_bytes=None if args.memory_budget_gb is None else int(args.memory_budget_gb * (1 << 30)),
            max_batch=args.max_batch,
            max_query_bytes=args.max_query_mb << 20 if args.max_query_mb else None,
        )
    except (OSError, ValueError, FailedPrecondition) as exc:
        print(f"lmem serve: {exc}", file=sys.stderr)
        return 2
    try:
        serve(
            args.listen or format_address(args.host, args.port),
            registry,
            limits,
            args.workers,
            args.metrics_port,
            metrics_host=args.metrics_host,
            auth=auth,
            credentials=credentials,
        )
    except OSError as exc:  # a port in use (gRPC's or the metrics'); nothing was served
        print(f"lmem serve: {exc}", file=sys.stderr)
        return 2
    return 0


def check_serving_devices(defaults: dict) -> None:
    """The server's default device and devices exist on this host and faiss is installed once: a server
    that could not create the memories it was started for fails at start, not at every CreateMemory."""
    try:
        MemoryConfig(**defaults).validated().check_usable()
    except InvalidArgument as exc:  # named by the flag that set the field
        flag = "--" + exc.field.removeprefix("config.").split("[")[0].replace("_", "-")
        raise InvalidArgument(flag, str(exc).split(": ", 1)[1]) from None
    check_one_faiss()


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
    elif args.command == "snapshot":
        _print(dataclasses.asdict(store.memory(args.name).snapshot()), args.json)
    elif args.command == "retrain":
        _print(dataclasses.asdict(store.memory(args.name).retrain_index()), args.json)
    elif args.command == "export":
        try:
            size = store.export_memory(args.name, args.file)
        except OSError as exc:
            raise InvalidArgument("file", str(exc)) from None
        _print({"exported": args.name, "file": args.file, "bytes": size}, args.json)
    elif args.command == "import":
        overrides = {
            name: getattr(args, name)
            for name in ("device", "devices", "backend", "search_dtype", "shards", "placement")
            + ("lsh_tables", "lsh_bits", "lsh_probes", "ivf_lists", "ivf_probes", "ivf_codes", "ivf_quantizer")
            if getattr(args, name) is not None
        }
        try:
            memory = store.import_memory(args.name, args.file, **overrides)
        except OSError as exc:
            raise InvalidArgument("file", str(exc)) from None
        _print(_as_dict(memory.info()), args.json)
    return 0


def _as_dict(info: MemoryInfo) -> dict:
    found = {"recovery": info.recovery} if info.recovery else {}
    if info.shards:
        found["shards"] = [dataclasses.asdict(shard) for shard in info.shards]
    return {
        "name": info.name,
        "config": dataclasses.asdict(info.config),
        "stats": info.stats,
        "footprint_bytes": info.footprint,
        **found,
    }


def _shard_health_summary(shards: list[dict]) -> str:
    """ "3/3 serving", or which shards are not: the ls column of a memory placed on a cluster; "" otherwise."""
    if not shards:
        return ""
    serving = sum(s["state"] == "serving" for s in shards)
    others = ", ".join(f"{s['shard']} {s['state']}" for s in shards if s["state"] != "serving")
    return f"{serving}/{len(shards)} serving" + (f" ({others})" if others else "")


def _print_shards(shards: list[dict]) -> None:
    """Where each shard of a memory on a cluster lives and whether it answers."""
    _print_table(
        ["shard", "slots", "node", "pid", "state", "commit", "detail"],
        [
            [
                s["shard"],
                f"[{s['slot_start']}, {s['slot_stop']})",
                s["node"] or "-",
                s["pid"] or "-",
                s["state"],
                s["commit_sequence"],
                s["detail"],
            ]
            for s in shards
        ],
    )


def _print(data, as_json: bool, table: bool = False) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
    elif table:
        columns = ["name", "key_dim", "memory_size", "filled_slots", "commit_sequence", "backend", "shards", "device"]
        rows = [[{**m["config"], **m["stats"], "name": m["name"]}[c] for c in columns] for m in data]
        if any("shards" in m for m in data):  # some memory is placed on a cluster: where, and how its shards are
            columns += ["placement", "shard health"]
            for row, m in zip(rows, data, strict=True):
                row += [m["config"]["placement"], _shard_health_summary(m.get("shards", []))]
        _print_table(columns, rows)
    elif "config" in data:
        print(f"memory {data['name']}")
        for section in ("config", "stats"):
            print(f"  {section}:")
            for key, value in data[section].items():
                print(f"    {key:<16} {value}")
        print("  footprint (at most, as the memory budget counts it):")
        for device, size in data["footprint_bytes"].items():
            print(f"    {device:<16} {size:,} bytes ({size / (1 << 30):.2f} GiB)")
        if "recovery" in data:
            print(f"  recovery: {data['recovery']}")
        if "shards" in data:
            print("  shards:")
            _print_shards(data["shards"])
    else:
        for key, value in data.items():
            print(f"{key}: {value}")


# ------------------------------------------------------------------ inspection

# Slots per ReadSlots call: well under the default 64 MiB message for any key_dim.
PAGE_BYTES = 16 << 20
# Query rows per call when plot searches the sampled slots' nearest neighbours.
PLOT_QUERY_ROWS = 256
BAR_WIDTH = 40


def _add_inspection_commands(commands) -> None:
    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        add_client_options(sub)
        sub.add_argument("name")
        return sub

    stats = command("stats", "fill, age histogram, label counts, key-norm sanity, writes vs merges")
    watch = command("watch", "stats, refreshed until Ctrl-C")
    for sub in (stats, watch):
        sub.add_argument("--age-bins", type=int, default=10, help="bins of the age histogram (default 10)")
        sub.add_argument("--top-labels", type=int, default=10, help="most frequent labels to list (default 10)")
    watch.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    watch.add_argument("--count", type=int, default=0, help="stop after this many refreshes (default 0: never)")

    slots = command("slots", "slots by id or range: value, age, generation, key norm, first key components")
    selection = slots.add_mutually_exclusive_group(required=True)
    selection.add_argument("--slots", help="comma-separated slot ids, e.g. 1,5,9")
    selection.add_argument("--range", help="START:STOP, stop exclusive, e.g. 0:100")
    slots.add_argument("--components", type=int, default=4, help="key components to show (default 4)")

    neighbors = command("neighbors", "the k nearest slots of a slot's key or of a vector, with similarities")
    query = neighbors.add_mutually_exclusive_group(required=True)
    query.add_argument("--slot", type=int, help="search with this slot's key (the slot itself is left out)")
    query.add_argument("--vector", help=".npy file of one unit-length vector of key_dim numbers")
    neighbors.add_argument("-k", "--k", type=int, default=10, help="neighbours to show (default 10)")

    labels = command("labels", "the slots holding a label, with their ages")
    labels.add_argument("label", type=int)

    plot = command("plot", "PNG of the age histogram, label distribution and nearest-neighbour similarities")
    plot.add_argument("--out", required=True, help="the PNG file to write")
    plot.add_argument("--sample", type=int, default=2000, help="slots whose nearest neighbour is found (default 2000)")
    plot.add_argument("--seed", type=int, default=0, help="seeds the sample of slots")


def _stats(store: Store, args) -> int:
    memory = store.memory(args.name)
    report = _report(memory, args)
    shards = [dataclasses.asdict(shard) for shard in memory.info().shards]
    if args.json:
        print(json.dumps({**_report_dict(args.name, report), **({"shards": shards} if shards else {})}, indent=2))
    else:
        _print_report(args.name, report)
        if shards:
            print()
            _print_shards(shards)
    return 0


def _watch(store: Store, args) -> int:
    if not (args.interval >= 0 and math.isfinite(args.interval)):
        raise InvalidArgument("--interval", f"must be a finite number of seconds >= 0, got {args.interval}")
    if args.count < 0:
        raise InvalidArgument("--count", f"must be >= 0 (0: until Ctrl-C), got {args.count}")
    memory = store.memory(args.name)
    previous = None
    refreshes = 0
    try:
        while True:
            report = _report(memory, args)
            refreshes += 1
            now = time.strftime("%Y-%m-%d %H:%M:%S")
            if args.json:  # one object per line, so a script can follow the stream
                print(json.dumps({"time": now, **_report_dict(args.name, report)}), flush=True)
            else:
                if sys.stdout.isatty():
                    print("\033[H\033[J", end="")  # clear the screen: a live view, not a scroll
                print(f"lmem watch {args.name}: every {args.interval:g} s, {now} (Ctrl-C to stop)")
                if previous is not None:
                    print(
                        f"since the last refresh: +{report.writes - previous.writes} writes, "
                        f"+{report.merges - previous.merges} merges, +{report.queries - previous.queries} query rows"
                    )
                _print_report(args.name, report)
                sys.stdout.flush()
            previous = report
            if refreshes == args.count:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def _report(memory: MemoryClient, args) -> MemoryReport:
    try:
        return memory.inspect(age_bins=args.age_bins, top_labels=args.top_labels)
    except InvalidArgument as exc:
        if exc.field not in ("age_bins", "top_labels"):
            raise
        # Name the option the user typed, not the request field.
        raise InvalidArgument(f"--{exc.field.replace('_', '-')}", str(exc).partition(": ")[2]) from None


def _report_dict(name: str, report: MemoryReport) -> dict:
    return {"name": name, **dataclasses.asdict(report), "fill_ratio": report.fill_ratio}


def _print_report(name: str, report: MemoryReport) -> None:
    print(f"memory {name} at commit {report.commit_sequence}")
    print(f"  filled       {report.filled_slots} of {report.memory_size} slots ({report.fill_ratio:.2%})")
    print(f"  writes       {report.writes}")
    print(f"  merges       {report.merges}")
    print(f"  queries      {report.queries} rows")
    print(f"  labels       {report.distinct_labels} distinct")
    print(
        f"  key norms    min {report.key_norm_min:.6f}, max {report.key_norm_max:.6f}, "
        f"{report.keys_off_unit} off unit length, {report.keys_non_finite} not finite"
    )
    print()
    edges = report.age_bin_edges
    _print_bars("age", [f"[{low}, {high})" for low, high in zip(edges[:-1], edges[1:], strict=True)], report.age_counts)
    if report.top_labels:
        print()
        _print_bars("label", [str(label) for label in report.top_labels], report.top_label_counts)
    if any(w.name for w in report.writers):  # a memory only ever written untagged has nothing to tell here
        print()
        most = max(w.slots for w in report.writers) or 1
        _print_table(
            ["writer", "slots", "writes", "merges", ""],
            [
                [w.name or "(untagged)", w.slots, w.writes, w.merges, "#" * round(BAR_WIDTH * w.slots / most)]
                for w in report.writers
            ],
        )


def _print_bars(title: str, names: list[str], counts: list[int]) -> None:
    """A table of counts with a bar each, scaled to the largest."""
    most = max(counts, default=0) or 1
    bars = ["#" * round(BAR_WIDTH * count / most) for count in counts]
    _print_table([title, "slots", ""], [[n, c, b] for n, c, b in zip(names, counts, bars, strict=True)])


def _slots(store: Store, args) -> int:
    memory = store.memory(args.name)
    size, dim = memory.config.memory_size, memory.config.key_dim
    if args.components < 0:
        raise InvalidArgument("--components", f"must be >= 0, got {args.components}")
    ids = _slot_ids(args.slots, size) if args.slots is not None else _slot_range(args.range, size)
    shown = min(args.components, dim)
    rows = []
    for page in _pages(ids, dim):
        read = memory.read_slots(page)
        norms = read.keys.norm(dim=1)
        for i, slot in enumerate(page):
            rows.append(
                {
                    "slot": slot,
                    "value": int(read.values[i]),
                    "age": int(read.ages[i]),
                    "generation": int(read.generations[i]),
                    "writer": read.writers[i],
                    "key_norm": float(norms[i]),
                    "key": read.keys[i, :shown].tolist(),
                }
            )
    if args.json:
        print(json.dumps({"name": args.name, "key_dim": dim, "slots": rows}, indent=2))
        return 0
    columns = ["slot", "value", "age", "generation", "writer", "key_norm", f"key[:{shown}]"]
    _print_table(
        columns,
        [
            [
                r["slot"],
                "empty" if r["value"] == EMPTY else r["value"],
                r["age"],
                r["generation"],
                r["writer"] or "-",
                f"{r['key_norm']:.6f}",
                " ".join(f"{x:+.4f}" for x in r["key"]),
            ]
            for r in rows
        ],
    )
    return 0


def _slot_ids(text: str, size: int) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        raise InvalidArgument("--slots", f"must be comma-separated slot ids, e.g. 1,5,9; got {text!r}") from None
    outside = [slot for slot in ids if not 0 <= slot < size]
    if outside:
        raise InvalidArgument("--slots", f"slot {outside[0]} is outside the memory's slots [0, {size})")
    return ids


def _slot_range(text: str, size: int) -> list[int]:
    start, sep, stop = text.partition(":")
    try:
        start, stop = int(start), int(stop)
    except ValueError:
        start = stop = None
    if not sep or start is None or not 0 <= start <= stop <= size:
        raise InvalidArgument("--range", f"must be START:STOP with 0 <= START <= STOP <= {size}, got {text!r}")
    return list(range(start, stop))


def _pages(ids: list[int], key_dim: int):
    per_page = max(1, PAGE_BYTES // (key_dim * 4 + 28))
    for start in range(0, len(ids), per_page):
        yield ids[start : start + per_page]


def _neighbors(store: Store, args) -> int:
    memory = store.memory(args.name)
    config = memory.config
    if args.k < 1:
        raise InvalidArgument("--k", f"must be >= 1, got {args.k}")
    if args.slot is not None:
        if not 0 <= args.slot < config.memory_size:
            raise InvalidArgument("--slot", f"slot {args.slot} is outside the memory's slots [0, {config.memory_size})")
        read = memory.read_slots([args.slot])
        if int(read.values[0]) == EMPTY:
            raise InvalidArgument("--slot", f"slot {args.slot} is empty (never written): it has no key to search with")
        query, source = read.keys, {"slot": args.slot}
    else:
        query, source = _load_vector(args.vector, config.key_dim), {"vector": args.vector}
    k = min(config.memory_size, args.k + (args.slot is not None))  # one more, for the slot itself
    # A query's k is at least correct_in_top (the server's rule); the extra neighbours are not shown.
    result = memory.query(query, k=max(k, config.correct_in_top), fields={"neighbors"})
    found = [
        {"slot": int(slot), "value": int(value), "similarity": float(similarity)}
        for slot, value, similarity in zip(
            result.neighbor_slots[0], result.neighbor_values[0], result.neighbor_similarities[0], strict=True
        )
        if int(slot) != args.slot
    ][: args.k]
    if args.json:
        print(
            json.dumps(
                {"name": args.name, "query": source, "commit_sequence": result.commit_sequence, "neighbors": found},
                indent=2,
            )
        )
        return 0
    _print_table(
        ["rank", "slot", "value", "similarity"],
        [
            [rank, n["slot"], "empty" if n["value"] == EMPTY else n["value"], f"{n['similarity']:+.6f}"]
            for rank, n in enumerate(found, 1)
        ],
    )
    return 0


def _load_vector(path: str, key_dim: int) -> torch.Tensor:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InvalidArgument("--vector", f"cannot read {path} as a .npy array: {exc}") from None
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.shape != (key_dim,):
        raise InvalidArgument("--vector", f"{path} has shape {list(array.shape)}; this memory's keys are [{key_dim}]")
    if array.dtype.kind not in "fiu":
        raise InvalidArgument("--vector", f"{path} holds {array.dtype}, not real numbers")
    vector = array.astype(np.float32)
    if not np.isfinite(vector).all():
        raise InvalidArgument("--vector", f"{path} has a component that is not finite")
    norm = float(np.linalg.norm(vector))
    if abs(norm - 1) > UNIT_NORM_TOLERANCE:
        raise InvalidArgument(
            "--vector", f"{path} has norm {norm:.6g}; it must be unit length (within {UNIT_NORM_TOLERANCE})"
        )
    return torch.from_numpy(vector)[None]


def _labels(store: Store, args) -> int:
    found = store.memory(args.name).find_label(args.label)
    slots = [{"slot": int(s), "age": int(a)} for s, a in zip(found.slots, found.ages, strict=True)]
    if args.json:
        print(
            json.dumps(
                {
                    "name": args.name,
                    "label": args.label,
                    "commit_sequence": found.commit_sequence,
                    "recent_slot": found.recent_slot,
                    "slots": slots,
                },
                indent=2,
            )
        )
        return 0
    recent = "never written" if found.recent_slot == NO_SLOT else f"last written or merged in slot {found.recent_slot}"
    print(f"label {args.label} in memory {args.name}: {len(slots)} slots; {recent}")
    if slots:
        _print_table(["slot", "age"], [[s["slot"], s["age"]] for s in slots])
    return 0


def _plot(store: Store, args) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("lmem: plot needs matplotlib: pip install 'lifelong-memory[plot]'", file=sys.stderr)
        return 1
    if args.sample < 1:
        raise InvalidArgument("--sample", f"must be >= 1, got {args.sample}")
    memory = store.memory(args.name)
    config = memory.config
    report = memory.inspect(age_bins=20, top_labels=30)
    nearest, isolated, sampled = _nearest_similarities(memory, args.sample, args.seed)

    figure, (ages, labels, similarities, writers) = plt.subplots(1, 4, figsize=(21, 4.8))
    edges = report.age_bin_edges
    ages.bar(edges[:-1], report.age_counts, width=edges[1] - edges[0], align="edge")
    ages.set(title="age of the filled slots", xlabel="age (updates since written or merged)", ylabel="slots")
    labels.bar(range(len(report.top_labels)), report.top_label_counts)
    labels.set_xticks(range(len(report.top_labels)), [str(label) for label in report.top_labels], rotation=90)
    labels.set(title=f"the {len(report.top_labels)} most frequent of {report.distinct_labels} labels", ylabel="slots")
    similarities.hist(nearest, bins=50, range=(-1, 1))
    title = "similarity to the nearest other filled slot"
    if sampled < config.memory_size:
        title += f"\n(a sample of {sampled} of {config.memory_size} slots)"
    if isolated:
        title += f"\n{isolated} slots have none of similarity > 0 (not shown)"
    similarities.set(title=title, xlabel="cosine similarity", ylabel="slots")
    names = [w.name or "(untagged)" for w in report.writers]
    writers.bar(range(len(names)), [w.slots for w in report.writers])
    writers.set_xticks(range(len(names)), names, rotation=90)
    writers.set(title="filled slots by writer (the tag of their last write or merge)", ylabel="slots")
    figure.suptitle(
        f"memory {args.name}: {report.filled_slots} of {report.memory_size} slots filled "
        f"({report.fill_ratio:.1%}), commit {report.commit_sequence}"
    )
    figure.tight_layout()
    try:
        figure.savefig(args.out, dpi=100)
    except OSError as exc:
        raise InvalidArgument("--out", f"cannot write {args.out}: {exc}") from None
    finally:
        plt.close(figure)
    summary = {
        "name": args.name,
        "out": args.out,
        "filled_slots": report.filled_slots,
        "sampled_slots": sampled,
        "nearest_similarity": {
            "slots": len(nearest),
            "isolated": isolated,
            "min": min(nearest, default=None),
            "median": float(np.median(nearest)) if nearest else None,
            "max": max(nearest, default=None),
        },
    }
    print(json.dumps(summary, indent=2) if args.json else f"wrote {args.out}")
    return 0


def _nearest_similarities(memory: MemoryClient, sample: int, seed: int) -> tuple[list[float], int, int]:
    """Similarity of each sampled filled slot to its nearest other filled slot: (similarities, isolated, sampled).

    The memory's own search finds it: among a slot's two nearest, the one that is not the slot. When that
    one is empty, every other filled slot has similarity <= 0 (empty slots score exactly 0 and rank above
    them): the slot is counted as isolated rather than given a similarity the search cannot see.
    """
    config = memory.config
    size = config.memory_size
    if size <= sample:
        ids = list(range(size))
    else:
        ids = sorted(np.random.default_rng(seed).choice(size, sample, replace=False).tolist())
    filled_ids, filled_keys = [], []
    for page in _pages(ids, config.key_dim):
        read = memory.read_slots(page)
        filled = read.values != EMPTY
        filled_ids += [slot for slot, is_filled in zip(page, filled.tolist(), strict=True) if is_filled]
        filled_keys.append(read.keys[filled])
    keys = torch.cat(filled_keys) if filled_keys else torch.empty(0, config.key_dim)
    nearest, isolated = [], 0
    k = min(size, max(2, config.correct_in_top))
    for start in range(0, len(filled_ids), PLOT_QUERY_ROWS):
        result = memory.query(keys[start : start + PLOT_QUERY_ROWS], k=k, fields={"neighbors"})
        for row, slot in enumerate(filled_ids[start : start + PLOT_QUERY_ROWS]):
            others = [i for i in range(k) if int(result.neighbor_slots[row, i]) != slot]
            if not others or int(result.neighbor_values[row, others[0]]) == EMPTY:
                isolated += 1
            else:
                nearest.append(float(result.neighbor_similarities[row, others[0]]))
    return nearest, isolated, len(ids)


def _print_table(columns: list[str], rows: list[list]) -> None:
    """Plain aligned columns: a header line, then one line per row."""
    cells = [[str(c) for c in columns]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


INSPECTION_COMMANDS = {
    "stats": _stats,
    "watch": _watch,
    "slots": _slots,
    "neighbors": _neighbors,
    "labels": _labels,
    "plot": _plot,
}


if __name__ == "__main__":
    sys.exit(main())
