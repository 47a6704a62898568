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

PROBE_CALLS = 64  # health and reflection calls in progress at once (at most --max-calls)
PROBE_CALLS_PER_PEER = 8  # from one client address (at most --max-calls-per-peer)


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
        self.idle_timeout = idle_timeout
        self.auth = auth
        self._guarded_prefix = f"/{guarded_service}/"
        self._memory_calls = _Pool(max_calls, max_calls_per_peer, "calls", " (--max-calls)", " (--max-calls-per-peer)")
        # The health service and reflection need no token: a pool of their own, so that clients without one
        # (a health Watch lasts as long as its client wants) cannot take the calls the token holders need.
        self._probe_calls = _Pool(
            min(PROBE_CALLS, max_calls), min(PROBE_CALLS_PER_PEER, max_calls_per_peer), "health or reflection calls"
        )

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
            return None
        guarded = handler_call_details.method.startswith(self._guarded_prefix)
        if self.auth is not None and guarded:
            try:
                self.auth.authenticate(handler_call_details.invocation_metadata)
            except Unauthenticated as exc:
                return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, str(exc))
        return self._admitted(handler, self._memory_calls if guarded else self._probe_calls)

    def _admitted(self, handler: grpc.RpcMethodHandler, pool: _Pool) -> grpc.RpcMethodHandler:
        behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream

        async def call(requests, context):
            peer = peer_address(context.peer())
            if pool.calls >= pool.limit:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this server serves at most {pool.limit} {pool.what} at once{pool.flag}; retry later",
                )
            if pool.calls_by_peer[peer] >= pool.limit_per_peer:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this server serves at most {pool.limit_per_peer} {pool.what} at once from {peer}"
                    f"{pool.peer_flag}; close idle streams or retry later",
                )
            pool.calls += 1
            pool.calls_by_peer[peer] += 1
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
                pool.calls -= 1
                pool.calls_by_peer[peer] -= 1
                if not pool.calls_by_peer[peer]:
                    del pool.calls_by_peer[peer]

        return _reading_requests(handler, call)


@dataclasses.dataclass
class _Pool:
    """Calls in progress of one kind, and how many there may be, in all and from one client address."""

    limit: int
    limit_per_peer: int
    what: str
    flag: str = ""  # the option that sets the limit, as " (--flag)"
    peer_flag: str = ""
    calls: int = 0
    calls_by_peer: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)


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
