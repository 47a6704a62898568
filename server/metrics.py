"""Prometheus metrics of a memory server, and the per-RPC observer that records them.

Per RPC (labels method, code): a request counter and a latency histogram. Per query batch: its rows.
Per memory, read at scrape time from the registry: filled slots, fill ratio, and the write, merge and
query-row counters. The write-ahead log's own metrics live with it, in server/persistence.py.
"""

from __future__ import annotations

import contextvars
import logging
import time

import grpc
from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from lifelong_memory.server.logs import REQUEST_ID, REQUEST_ID_HEADER, request_id_from
from lifelong_memory.server.registry import MemoryRegistry
from lifelong_memory.v1 import memory_pb2 as pb

log = logging.getLogger("lifelong_memory.server.rpc")

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = tuple(float(2**i) for i in range(13))  # 1 .. 4096, the default --max-batch

REQUESTS = Counter("lmem_rpc_requests", "RPCs handled, by method and status code", ["method", "code"])
LATENCY = Histogram(
    "lmem_rpc_duration_seconds",
    "Time from a call's start to its status (a whole stream for QueryStream)",
    ["method", "code"],
    buckets=LATENCY_BUCKETS,
)
BATCH_ROWS = Histogram(
    "lmem_query_batch_rows",
    "Query rows per request: per Query or Update call, per QueryStream message",
    ["method"],
    buckets=BATCH_BUCKETS,
)

_BATCHED = (pb.QueryRequest, pb.UpdateRequest)


class MemoryCollector(Collector):
    """Per-memory gauges and counters, read from the registry whenever /metrics is scraped."""

    def __init__(self, memories: MemoryRegistry):
        self.memories = memories

    def collect(self):
        filled = GaugeMetricFamily("lmem_memory_filled_slots", "Slots written since create or clear", labels=["memory"])
        ratio = GaugeMetricFamily("lmem_memory_fill_ratio", "Filled slots / memory_size", labels=["memory"])
        writes = CounterMetricFamily("lmem_memory_writes", "Rows written into an old slot", labels=["memory"])
        merges = CounterMetricFamily("lmem_memory_merges", "Rows merged into their positive slot", labels=["memory"])
        queries = CounterMetricFamily("lmem_memory_query_rows", "Query rows served", labels=["memory"])
        for name, memory in self.memories.list():
            stats = memory.stats()
            filled.add_metric([name], stats["filled_slots"])
            ratio.add_metric([name], stats["filled_slots"] / memory.config.memory_size)
            writes.add_metric([name], stats["writes"])
            merges.add_metric([name], stats["merges"])
            queries.add_metric([name], stats["queries"])
        yield from (filled, ratio, writes, merges, queries)


def serve_metrics(host: str, port: int, memories: MemoryRegistry) -> None:
    """Serve /metrics over HTTP on ``host``:``port`` from a daemon thread, per-memory metrics included."""
    REGISTRY.register(MemoryCollector(memories))
    start_http_server(port, addr=host.strip("[]"))  # "[::]" is how gRPC spells the IPv6 any-address


class RpcObserver(grpc.ServerInterceptor):
    """Gives each call a request id (the client's x-request-id, else a fresh one) that every log line
    about it carries and the client gets back in the initial metadata; counts and times the call by
    method and status code; records the rows of each query batch."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        request_id = request_id_from(handler_call_details.invocation_metadata)
        streaming = handler.request_streaming, handler.response_streaming
        kind = "_".join("stream" if part else "unary" for part in streaming)  # the handler's behaviour field
        return handler._replace(**{kind: _observed(getattr(handler, kind), method, request_id, *streaming)})


def _observed(behavior, method: str, request_id: str, request_streaming: bool, response_streaming: bool):
    def call(request, context):
        scope = contextvars.copy_context()
        scope.run(REQUEST_ID.set, request_id)
        context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
        if request_streaming:
            request = _batch_rows_of_each(request, method)
        else:
            _record_batch(request, method)
        start = time.perf_counter()
        try:
            response = scope.run(behavior, request, context)
        except BaseException:
            scope.run(_record_call, method, context, start, True)
            raise
        if response_streaming:
            return _responses(response, scope, method, context, start)
        scope.run(_record_call, method, context, start, False)
        return response

    return call


def _responses(responses, scope: contextvars.Context, method: str, context, start: float):
    """The response stream, each step run with the call's request id; recorded when it ends."""
    failed = True
    try:
        while True:
            try:
                response = scope.run(next, responses)
            except StopIteration:
                break
            yield response
        failed = False
    finally:
        scope.run(_record_call, method, context, start, failed)


def _batch_rows_of_each(requests, method: str):
    for request in requests:
        _record_batch(request, method)
        yield request


def _record_batch(request, method: str) -> None:
    if isinstance(request, _BATCHED) and request.queries.shape:
        BATCH_ROWS.labels(method).observe(request.queries.shape[0])


def _record_call(method: str, context, start: float, failed: bool) -> None:
    code = context.code()  # set by abort() or set_code()
    if code is None:
        if not failed:
            code = grpc.StatusCode.OK
        else:  # an exception the servicer did not turn into a status, or the client went away
            code = grpc.StatusCode.UNKNOWN if context.is_active() else grpc.StatusCode.CANCELLED
    seconds = time.perf_counter() - start
    LATENCY.labels(method, code.name).observe(seconds)
    REQUESTS.labels(method, code.name).inc()
    log.debug("%s %s in %.2f ms", method, code.name, seconds * 1000)
