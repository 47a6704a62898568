"""Prometheus metrics of a memory server, and the per-RPC observer that records them.

Per RPC (labels method, code): a request counter and a latency histogram. Per query batch: its rows.
Per memory, read at scrape time from the registry: filled slots, fill ratio, and the write, merge and
query-row counters. The write-ahead log's own metrics live with it, in server/persistence.py.
"""

from __future__ import annotations

import asyncio
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


class RpcObserver(grpc.aio.ServerInterceptor):
    """Gives each call a request id (the client's x-request-id, else a fresh one) that every log line
    about it carries and the client gets back in the initial metadata; counts and times the call by
    method and status code; records the rows of each query batch.

    It wraps the handlers server/admission.py returns: coroutines that take their requests as a stream."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        request_id = request_id_from(handler_call_details.invocation_metadata)
        kind = "stream_stream" if handler.response_streaming else "stream_unary"
        return handler._replace(**{kind: _observed(getattr(handler, kind), method, request_id)})


def _observed(behavior, method: str, request_id: str):
    async def call(requests, context):
        REQUEST_ID.set(request_id)  # in this call's own task: its log lines, and its worker jobs (copied)
        await context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
        start = time.perf_counter()
        try:
            response = await behavior(_batch_rows_of_each(requests, method), context)
        except asyncio.CancelledError:  # the client went away, or its deadline passed
            _record_call(method, context.code() or grpc.StatusCode.CANCELLED, start)
            raise
        except BaseException:  # an abort (its status is set), or an error the servicer did not turn into one
            _record_call(method, context.code() or grpc.StatusCode.UNKNOWN, start)
            raise
        _record_call(method, context.code() or grpc.StatusCode.OK, start)
        return response

    return call


async def _batch_rows_of_each(requests, method: str):
    async for request in requests:
        _record_batch(request, method)
        yield request


def _record_batch(request, method: str) -> None:
    if isinstance(request, _BATCHED) and request.queries.shape:
        BATCH_ROWS.labels(method).observe(request.queries.shape[0])


def _record_call(method: str, code: grpc.StatusCode, start: float) -> None:
    seconds = time.perf_counter() - start
    LATENCY.labels(method, code.name).observe(seconds)
    REQUESTS.labels(method, code.name).inc()
    log.debug("%s %s in %.2f ms", method, code.name, seconds * 1000)
