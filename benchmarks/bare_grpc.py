"""The anchor for what gRPC costs: a bare grpc-python server and client that move opaque bytes, nothing else.

    .venv/bin/python benchmarks/bare_grpc.py --listen 127.0.0.1:0 [--aio]    # serves until SIGTERM

The server answers each request with a response of the length the request's first 8 bytes ask for
(little-endian), so one server stands in for every request and response size a benchmark measures. It has
no protobuf, no memory, no interceptors: a generic handler with identity (de)serialisers, on a synchronous
grpc.server (a thread pool, grpc-python's default) or a grpc.aio server (``--aio``). ``BareClient`` calls it
the way lifelong_memory's client calls its server: unary calls on one channel, and a bidirectional stream fed
from a queue, one request and one response at a time.
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
    """Zero-filled responses by length, made once."""

    def __init__(self):
        self._by_length: dict[int, bytes] = {}

    def __call__(self, request: bytes) -> bytes:
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


async def _serve_aio(address: str) -> None:
    respond = _Responses()

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
    args = parser.parse_args(argv)
    if args.aio:
        asyncio.run(_serve_aio(args.listen))
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
