"""The anchor for what gRPC costs: a bare grpc-python server and client that move opaque bytes, nothing else.

    .venv/bin/python benchmarks/bare_grpc.py --listen 127.0.0.1:0 [--aio]    # serves until SIGTERM
    .venv/bin/python benchmarks/bare_grpc.py --aio --memory-step 8192,16      # the same, doing a memory step

The server answers each request with a response of the length the request's first 8 bytes ask for
(little-endian), so one server stands in for every request and response size a benchmark measures. It has
no protobuf, no memory, no interceptors: a generic handler with identity (de)serialisers, on a synchronous
grpc.server (a thread pool, grpc-python's default) or a grpc.aio server (``--aio``). ``BareClient`` calls it
the way lifelong_memory's client calls its server: unary calls on one channel, and a bidirectional stream fed
from a queue, one request and one response at a time.

``--memory-step N,B`` (with ``--aio``): before answering, the handler runs one fused query + update of B rows
on an embedded memory of N full slots (d = 128, k = 256), inline, as lifelong_memory's server does on its
worker thread. It is the anchor for what gRPC costs a call whose handler does the memory's own work in a
server process, with none of lifelong_memory's protocol, servicer, interceptors or thread hand-off.
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import signal
import struct
import sys
import threading
from concurrent import futures

import grpc

SERVICE = "bare.Echo"
LENGTH = struct.Struct("<Q")


def request_bytes(size: int, response_size: int) -> bytes:
    """A request of ``size`` bytes (at least 8) asking for ``response_size`` bytes back."""
    return LENGTH.pack(response_size) + bytes(max(0, size - LENGTH.size))


class _Responses:
    """Zero-filled responses by length, made once; after ``step()`` when one is given."""

    def __init__(self, step=None):
        self._by_length: dict[int, bytes] = {}
        self._step = step

    def __call__(self, request: bytes) -> bytes:
        if self._step is not None:
            self._step()
        length = LENGTH.unpack_from(request)[0]
        response = self._by_length.get(length)
        if response is None:
            response = self._by_length[length] = bytes(length)
        return response


def _sync_server(address: str) -> tuple[grpc.Server, int]:
    respond = _Responses()

    def unary(request, context):
        return respond(request)

    def stream(requests, context):
        for request in requests:
            yield respond(request)

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), handlers=[handler])
    return server, server.add_insecure_port(address)


def memory_step(n: int, b: int):
    """One fused query + update of ``b`` rows on an embedded memory of ``n`` slots, filled as bench_memory.py
    fills its memories; the function that runs it, cycling through 8 query batches."""
    import torch  # only this anchor needs torch and the memory
    from bench_memory import CHOOSE_K, KEY_DIM, N_BATCHES, OPS, fill, unit_rows

    from lifelong_memory.client import connect

    memory = connect("local").create_memory("step", key_dim=KEY_DIM, memory_size=n, choose_k=CHOOSE_K)
    fill(memory, n, seed=n)
    generator = torch.Generator().manual_seed(1)
    batches = [(unit_rows(b, generator), torch.randint(0, n, (b,), generator=generator)) for _ in range(N_BATCHES)]
    _, update, fields = OPS["fused"]
    calls = iter(range(1 << 62))

    def step():
        queries, labels = batches[next(calls) % N_BATCHES]
        memory.query(queries, labels, update=update, fields=fields)

    return step


async def _serve_aio(address: str, step=None) -> None:
    respond = _Responses(step)

    async def unary(request, context):
        return respond(request)

    async def stream(requests, context):
        async for request in requests:
            yield respond(request)

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
        },
    )
    server = grpc.aio.server(handlers=[handler])
    port = server.add_insecure_port(address)
    await server.start()
    print(f"bare: serving on {_shown(address, port)}", flush=True)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    await stopped.wait()
    await server.stop(grace=None)


def _shown(address: str, port: int) -> str:
    return address if address.startswith("unix:") else f"{address.rsplit(':', 1)[0]}:{port}"


class BareClient:
    """Unary calls and one bidirectional stream to a bare server, on one channel."""

    _CLOSE = object()

    def __init__(self, target: str):
        self.channel = grpc.insecure_channel(target)
        self._unary = self.channel.unary_unary(f"/{SERVICE}/Unary")
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._responses = self.channel.stream_stream(f"/{SERVICE}/Stream")(iter(self._requests.get, self._CLOSE))

    def unary(self, request: bytes) -> bytes:
        return self._unary(request)

    def stream(self, request: bytes) -> bytes:
        self._requests.put(request)
        return next(self._responses)

    def close(self) -> None:
        self._requests.put(self._CLOSE)
        self._responses.cancel()
        self.channel.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0: a free one) or unix:///path")
    parser.add_argument("--aio", action="store_true", help="a grpc.aio server instead of the thread-pool one")
    parser.add_argument("--memory-step", metavar="N,B", help="with --aio: run a fused memory step before each answer")
    args = parser.parse_args(argv)
    if args.memory_step and not args.aio:
        parser.error("--memory-step needs --aio")
    if args.aio:
        step = memory_step(*(int(x) for x in args.memory_step.split(","))) if args.memory_step else None
        asyncio.run(_serve_aio(args.listen, step))
        return 0
    server, port = _sync_server(args.listen)
    server.start()
    print(f"bare: serving on {_shown(args.listen, port)}", flush=True)
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    stopped.wait()
    server.stop(grace=None).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
