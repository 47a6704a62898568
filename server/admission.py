"""Who gets in, and for how long: the server's guard against callers that hold its resources.

Every call passes through ``Admission`` before any of its messages is read: a MemoryService call
without a known token is refused (UNAUTHENTICATED), a call past the limits on calls in progress,
for the whole server or for one client address, is refused (RESOURCE_EXHAUSTED), and a client that
sends nothing for ``idle_timeout`` seconds while the server waits for its next message, the one
message of a unary call included, has its call closed (UNAVAILABLE). Calls cost the asyncio server
a coroutine while they wait, never a worker thread; these limits bound how many such coroutines and
buffered messages a client can hold.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import inspect

import grpc

from lifelong_memory.server.auth import TokenAuth
from lifelong_memory.server.errors import Unauthenticated


def peer_address(peer: str) -> str:
    """The client's address without its port: ``ipv4:10.0.0.7:53122`` -> ``ipv4:10.0.0.7``, so the
    limit per peer holds however many connections the client opens."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return f"{kind}:{rest.rsplit(':', 1)[0]}"
    return peer


class Admission(grpc.aio.ServerInterceptor):
    """Authenticates MemoryService calls (``guarded_service``) before reading their request, caps the
    calls in progress, and closes calls whose client went idle.

    Every handler it returns reads its requests itself (a unary call's one message too), so the idle
    timeout covers a message sent too slowly, and a refused call is answered without reading it.
    Handlers it wraps are coroutines, or async generators for response streams; what it returns is a
    coroutine in every case (responses of a stream are written with ``context.write``)."""

    def __init__(
        self,
        *,
        max_calls: int,
        max_calls_per_peer: int,
        idle_timeout: float,
        auth: TokenAuth | None,
        guarded_service: str,
    ):
        self.max_calls = max_calls
        self.max_calls_per_peer = max_calls_per_peer
        self.idle_timeout = idle_timeout
        self.auth = auth
        self._guarded_prefix = f"/{guarded_service}/"
        self._calls = 0
        self._calls_by_peer: collections.Counter[str] = collections.Counter()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
            return None
        if self.auth is not None and handler_call_details.method.startswith(self._guarded_prefix):
            try:
                self.auth.authenticate(handler_call_details.invocation_metadata)
            except Unauthenticated as exc:
                return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, str(exc))
        return self._admitted(handler)

    def _admitted(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream

        async def call(requests, context):
            peer = peer_address(context.peer())
            if self._calls >= self.max_calls:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this server serves at most {self.max_calls} calls at once (--max-calls); retry later",
                )
            if self._calls_by_peer[peer] >= self.max_calls_per_peer:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this server serves at most {self.max_calls_per_peer} calls at once from {peer} "
                    "(--max-calls-per-peer); close idle streams or retry later",
                )
            self._calls += 1
            self._calls_by_peer[peer] += 1
            try:
                messages = _arriving_within(requests, context, self.idle_timeout)
                if handler.request_streaming:
                    request = messages
                else:
                    request = await anext(messages, None)
                    if request is None:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request: the call sent no message")
                result = behavior(request, context)
                if not handler.response_streaming:
                    return await result
                if inspect.isasyncgen(result):
                    async for response in result:
                        await context.write(response)
                else:  # the handler writes its responses itself (the health service's Watch)
                    await result
            finally:
                self._calls -= 1
                self._calls_by_peer[peer] -= 1
                if not self._calls_by_peer[peer]:
                    del self._calls_by_peer[peer]

        return _reading_requests(handler, call)


def _reading_requests(handler: grpc.RpcMethodHandler, call) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s method that gets the requests as a stream, whatever the method's kind
    (the bytes on the wire are the same): gRPC then reads nothing before ``call`` asks for it."""
    factory = (
        grpc.stream_stream_rpc_method_handler if handler.response_streaming else grpc.stream_unary_rpc_method_handler
    )
    deserialize = handler.request_deserializer
    return factory(
        call,
        request_deserializer=None if deserialize is None else _decoded_or_malformed(deserialize),
        response_serializer=handler.response_serializer,
    )


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def refuse(requests, context):
        await context.abort(code, message)

    return _reading_requests(handler, refuse)


@dataclasses.dataclass
class Malformed:
    """A message that does not decode (invalid UTF-8 in a string field, truncated bytes)."""

    error: str


def _decoded_or_malformed(deserialize):
    """gRPC answers a deserializer's exception with UNKNOWN: the message is handed on as Malformed instead,
    and refused as INVALID_ARGUMENT where it is read (_arriving_within)."""

    def decode(data: bytes):
        try:
            return deserialize(data)
        except Exception as exc:  # protobuf's DecodeError
            return Malformed(f"{type(exc).__name__}: {exc}")

    return decode


async def _arriving_within(requests, context, timeout: float):
    """The client's messages; the call is closed (UNAVAILABLE) when none comes for ``timeout`` seconds.

    One timer per call, not per message: it fires at most once a ``timeout`` and re-arms itself for what is
    left of the current wait (a stream's messages then cost no timer each)."""
    loop = asyncio.get_running_loop()
    call = asyncio.current_task()
    waiting_since = loop.time()  # None while the server holds a message and waits for nothing
    expired = []  # the timer's mark: its cancellation, not the call's own (the call ends either way)

    def check():
        nonlocal timer
        if waiting_since is not None and loop.time() - waiting_since >= timeout:
            expired.append(call.cancel())
        else:
            left = timeout if waiting_since is None else waiting_since + timeout - loop.time()
            timer = loop.call_later(left, check)

    timer = loop.call_later(timeout, check)
    iterator = aiter(requests)
    try:
        while True:
            try:
                message = await anext(iterator)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if not expired:  # the call itself was cancelled
                    raise
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"no message from the client for {timeout:g} s: the server closed this idle call; open a new one",
                )
            waiting_since = None
            if isinstance(message, Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid message ({message.error})")
            yield message
            waiting_since = loop.time()
    finally:
        timer.cancel()
