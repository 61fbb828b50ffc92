"""The OTLP receiver against real clients: the official SDK exporters (gRPC,
HTTP protobuf, gzip) and raw httpx / grpc calls for OTLP/JSON and bad input,
all over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import json
import logging
import tracemalloc
from dataclasses import dataclass

import grpc
import httpx
import pytest
from aiohttp import web
from google.protobuf import json_format
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from otel_bridge.model.otlp import request_to_json
from otel_bridge.model.spans import Span, SpanEvent, SpanLink
from otel_bridge.service.otlp_receiver import (
    Received,
    ReceiverBusy,
    otlp_http_routes,
    start_grpc_receiver,
)

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
PROTOBUF, JSON = "application/x-protobuf", "application/json"


def async_test(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 60))
    return run


class Recorder:
    """A handler that keeps what it is given and answers from a script:
    a `Received`, or an exception to raise; `Received()` once the script is out."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls: list[tuple[list[Span], str]] = []

    async def __call__(self, spans: list[Span], transport: str) -> Received:
        self.calls.append((spans, transport))
        answer = self.answers.pop(0) if self.answers else Received()
        if isinstance(answer, BaseException):
            raise answer
        return answer

    @property
    def spans(self) -> list[Span]:
        return [span for spans, _ in self.calls for span in spans]


@dataclass
class Endpoints:
    http: str   # the /v1/traces URL
    grpc: str   # host:port


@contextlib.asynccontextmanager
async def serving(handler, limit: int = 16 * 1024 * 1024, auto_decompress: bool = True):
    server, grpc_port = await start_grpc_receiver(handler, "127.0.0.1", 0, max_message_bytes=limit)
    app = web.Application()
    app.add_routes(otlp_http_routes(handler, max_body_bytes=limit))
    runner = web.AppRunner(app, auto_decompress=auto_decompress)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    http_port = runner.addresses[0][1]
    try:
        yield Endpoints(f"http://127.0.0.1:{http_port}/v1/traces", f"127.0.0.1:{grpc_port}")
    finally:
        await runner.cleanup()
        await server.stop(None)


# -- spans from a real TracerProvider, and what they must arrive as -------------

OTHER = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=True,
                    trace_flags=TraceFlags(TraceFlags.SAMPLED))


def sdk_spans() -> list[ReadableSpan]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource({"service.name": "receiver-test"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("receiver-test", "1.0")
    attributes = {"s": "text", "i": 7, "f": 1.5, "b": True, "strings": ["a", "b"], "ints": [1, 2]}
    with tracer.start_as_current_span("flow", kind=SpanKind.SERVER, attributes=attributes) as flow:
        flow.add_event("started", {"attempt": 1})
        flow.add_event("bare")
        with tracer.start_as_current_span("task", links=[Link(OTHER, {"why": "retry of"})]) as task:
            task.set_status(Status(StatusCode.ERROR, "task failed"))
        with tracer.start_as_current_span("ok", kind=SpanKind.CLIENT) as ok:
            ok.set_status(Status(StatusCode.OK))
    provider.shutdown()
    return list(memory.get_finished_spans())


def _plain(attributes) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in attributes.items()}


def expected(span: ReadableSpan) -> Span:
    return Span(
        trace_id=span.context.trace_id,
        span_id=span.context.span_id,
        parent_span_id=span.parent.span_id if span.parent else None,
        name=span.name,
        start_time_unix_nano=span.start_time,
        end_time_unix_nano=span.end_time,
        attributes=_plain(span.attributes),
        events=tuple(SpanEvent(e.name, e.timestamp, _plain(e.attributes)) for e in span.events),
        # The SDK's encoder leaves the W3C trace flags out of Link.flags, so
        # span_from_proto reads them as 0.
        links=tuple(SpanLink(link.context.trace_id, link.context.span_id,
                             _plain(link.attributes), trace_flags=0) for link in span.links),
        kind=span.kind,
        status_code=span.status.status_code,
        status_message=span.status.description or "",
    )


def assert_arrived(recorder: Recorder, spans: list[ReadableSpan], transport: str) -> None:
    assert {t for _, t in recorder.calls} == {transport}
    by_id = {s.span_id: s for s in recorder.spans}
    assert len(recorder.spans) == len(by_id) == len(spans)
    for span in spans:
        assert by_id[span.context.span_id] == expected(span)
    # The fixture spans exercise what they claim to.
    flow, task = by_id[spans[-1].context.span_id], next(s for s in by_id.values() if s.name == "task")
    assert flow.events and flow.kind is SpanKind.SERVER and flow.attributes["strings"] == ["a", "b"]
    assert task.parent_span_id == flow.span_id and task.status_message == "task failed"
    assert task.links[0].trace_id == OTHER.trace_id


def request_with_bad_span(spans: list[ReadableSpan]) -> ExportTraceServiceRequest:
    request = encode_spans(spans)
    request.resource_spans[0].scope_spans[0].spans[1].span_id = b"\x01\x02\x03"
    return request


async def grpc_export(target: str, body: bytes, compression=None) -> ExportTraceServiceResponse:
    async with grpc.aio.insecure_channel(target) as channel:
        answer = await channel.unary_unary(EXPORT)(body, compression=compression, timeout=10)
    return ExportTraceServiceResponse.FromString(answer)


async def grpc_error(target: str, body: bytes, compression=None) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await grpc_export(target, body, compression)
    return caught.value


def status_of(response: httpx.Response, content_type: str) -> status_pb2.Status:
    assert response.headers["content-type"] == content_type
    if content_type == JSON:
        return json_format.Parse(response.content, status_pb2.Status())
    return status_pb2.Status.FromString(response.content)


def response_of(response: httpx.Response, content_type: str) -> ExportTraceServiceResponse:
    assert response.status_code == 200, response.content
    assert response.headers["content-type"] == content_type
    if content_type == JSON:
        return json_format.Parse(response.content, ExportTraceServiceResponse())
    return ExportTraceServiceResponse.FromString(response.content)


def body_for(request: ExportTraceServiceRequest, content_type: str) -> bytes:
    if content_type == JSON:
        return json.dumps(request_to_json(request)).encode()
    return request.SerializeToString()


# -- spans arrive whole ---------------------------------------------------------

@pytest.mark.parametrize("compression", [grpc.Compression.NoCompression, grpc.Compression.Gzip])
@async_test
async def test_sdk_grpc_exporter(compression):
    spans, recorder = sdk_spans(), Recorder()
    async with serving(recorder) as at:
        exporter = GrpcExporter(endpoint=at.grpc, insecure=True, compression=compression, timeout=10)
        try:
            assert await asyncio.to_thread(exporter.export, spans) is SpanExportResult.SUCCESS
        finally:
            exporter.shutdown()
    assert_arrived(recorder, spans, "grpc")


@pytest.mark.parametrize("compression, auto_decompress", [
    (HttpCompression.NoCompression, True),
    (HttpCompression.Gzip, True),    # aiohttp gunzips the body itself...
    (HttpCompression.Gzip, False),   # ...or leaves it to the receiver
])
@async_test
async def test_sdk_http_exporter(compression, auto_decompress):
    spans, recorder = sdk_spans(), Recorder()
    async with serving(recorder, auto_decompress=auto_decompress) as at:
        exporter = HttpExporter(endpoint=at.http, compression=compression, timeout=10)
        try:
            assert await asyncio.to_thread(exporter.export, spans) is SpanExportResult.SUCCESS
        finally:
            exporter.shutdown()
    assert_arrived(recorder, spans, "http")


@pytest.mark.parametrize("gzipped", [False, True])
@async_test
async def test_http_json(gzipped):
    spans, recorder = sdk_spans(), Recorder()
    body = body_for(encode_spans(spans), JSON)
    assert '"traceId": "' in body.decode()  # hex, as OTLP/JSON has it
    headers = {"Content-Type": JSON}
    if gzipped:
        body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
    async with serving(recorder, auto_decompress=False) as at, httpx.AsyncClient() as client:
        answer = await client.post(at.http, content=body, headers=headers)
    assert not response_of(answer, JSON).HasField("partial_success")
    assert json.loads(answer.content) == {}
    assert_arrived(recorder, spans, "http")


@async_test
async def test_empty_request_succeeds_without_the_handler():
    recorder = Recorder()
    async with serving(recorder) as at, httpx.AsyncClient() as client:
        for content_type in (PROTOBUF, JSON):
            answer = await client.post(at.http, content=body_for(ExportTraceServiceRequest(), content_type),
                                       headers={"Content-Type": content_type})
            assert not response_of(answer, content_type).HasField("partial_success")
        assert not (await grpc_export(at.grpc, b"")).HasField("partial_success")
    assert recorder.calls == []


# -- partial success ------------------------------------------------------------

@async_test
async def test_a_span_with_a_bad_id_is_rejected_alone():
    spans = sdk_spans()
    good = [spans[0], spans[2]]
    body = request_with_bad_span(spans)
    recorder = Recorder()
    async with serving(recorder) as at, httpx.AsyncClient() as client:
        answers = [await grpc_export(at.grpc, body.SerializeToString())]
        for content_type in (PROTOBUF, JSON):
            answer = await client.post(at.http, content=body_for(body, content_type),
                                       headers={"Content-Type": content_type})
            answers.append(response_of(answer, content_type))
    for answer in answers:
        assert answer.partial_success.rejected_spans == 1
        assert "spans[1]" in answer.partial_success.error_message
        assert "8-byte span id" in answer.partial_success.error_message
    assert [t for _, t in recorder.calls] == ["grpc", "http", "http"]
    for spans_given, _ in recorder.calls:
        assert spans_given == [expected(s) for s in good]


@async_test
async def test_handler_rejections_add_to_partial_success():
    spans = sdk_spans()
    recorder = Recorder(Received(1, "queue dropped one"), Received(1, "queue dropped one"))
    body = request_with_bad_span(spans)
    async with serving(recorder) as at, httpx.AsyncClient() as client:
        over_grpc = await grpc_export(at.grpc, body.SerializeToString())
        answer = await client.post(at.http, content=body.SerializeToString(),
                                   headers={"Content-Type": PROTOBUF})
    for response in (over_grpc, response_of(answer, PROTOBUF)):
        assert response.partial_success.rejected_spans == 2
        assert "1 span(s) could not be decoded" in response.partial_success.error_message
        assert "queue dropped one" in response.partial_success.error_message


# -- bad input ------------------------------------------------------------------

@async_test
async def test_malformed_protobuf():
    recorder = Recorder()
    garbage = b"\x0a\xff\x01not protobuf"  # a field that claims 255 bytes it does not have
    async with serving(recorder) as at, httpx.AsyncClient() as client:
        answer = await client.post(at.http, content=garbage, headers={"Content-Type": PROTOBUF})
        error = await grpc_error(at.grpc, garbage)
    assert answer.status_code == 400
    status = status_of(answer, PROTOBUF)
    assert status.code == code_pb2.INVALID_ARGUMENT and "protobuf" in status.message
    assert status.details[0].Is(error_details_pb2.BadRequest.DESCRIPTOR)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert recorder.calls == []


@pytest.mark.parametrize("body", [
    b"{not json",
    b"[1, 2]",
    b'{"resourceSpans": ["not an object"]}',
    b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}',
    b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"startTimeUnixNano": "soon"}]}]}]}',
    b"\xff\xfe\xfa",
])
@async_test
async def test_malformed_json(body):
    recorder = Recorder()
    async with serving(recorder) as at, httpx.AsyncClient() as client:
        answer = await client.post(at.http, content=body, headers={"Content-Type": JSON})
    assert answer.status_code == 400
    status = status_of(answer, JSON)
    assert status.code == code_pb2.INVALID_ARGUMENT and status.message
    assert recorder.calls == []


@async_test
async def test_wrong_content_type_encoding_and_method():
    recorder = Recorder()
    body = encode_spans(sdk_spans()).SerializeToString()
    async with serving(recorder) as at, httpx.AsyncClient() as client:
        for headers in ({"Content-Type": "text/plain"}, {},
                        {"Content-Type": PROTOBUF, "Content-Encoding": "compress"}):
            answer = await client.post(at.http, content=body, headers=headers)
            assert answer.status_code == 415, headers
            assert status_pb2.Status.FromString(answer.content).message
        answer = await client.get(at.http)
        assert answer.status_code == 405 and answer.headers["Allow"] == "POST"
        assert status_of(answer, PROTOBUF).message
    assert recorder.calls == []


@async_test
async def test_oversized_body():
    recorder = Recorder()
    limit = 4096
    body = encode_spans(sdk_spans() * 20).SerializeToString()
    assert len(body) > limit

    async def streamed():  # no Content-Length: the limit must hold while reading
        for start in range(0, len(body), 1000):
            yield body[start:start + 1000]

    async with serving(recorder, limit=limit) as at, httpx.AsyncClient() as client:
        for content in (body, streamed()):
            answer = await client.post(at.http, content=content, headers={"Content-Type": PROTOBUF})
            assert answer.status_code == 413
            assert status_of(answer, PROTOBUF).code == code_pb2.RESOURCE_EXHAUSTED
        error = await grpc_error(at.grpc, body)
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        # A body under the limit still goes through.
        small = encode_spans(sdk_spans()[:1]).SerializeToString()
        answer = await client.post(at.http, content=small, headers={"Content-Type": PROTOBUF})
        assert answer.status_code == 200
    assert len(recorder.spans) == 1


@pytest.mark.parametrize("auto_decompress", [True, False])
@async_test
async def test_gzip_bomb(auto_decompress):
    recorder = Recorder()
    limit = 1 << 20
    bomb = gzip.compress(b"\0" * (64 << 20))  # 64 MiB in about 64 KiB
    assert len(bomb) < limit
    headers = {"Content-Type": PROTOBUF, "Content-Encoding": "gzip"}
    async with serving(recorder, limit=limit, auto_decompress=auto_decompress) as at, \
            httpx.AsyncClient() as client:
        tracemalloc.start()
        try:
            answer = await client.post(at.http, content=bomb, headers=headers)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert answer.status_code == 413
        assert peak < 8 * limit  # nowhere near the 64 MiB it holds
        assert status_of(answer, PROTOBUF).code == code_pb2.RESOURCE_EXHAUSTED
        error = await grpc_error(at.grpc, b"\0" * (16 << 20), compression=grpc.Compression.Gzip)
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert "larger than max" in error.details()
    assert recorder.calls == []


@async_test
async def test_broken_gzip():
    recorder = Recorder()
    whole = gzip.compress(encode_spans(sdk_spans()).SerializeToString())
    async with serving(recorder, auto_decompress=False) as at, httpx.AsyncClient() as client:
        for body in (whole[: len(whole) // 2], whole[:10] + b"\xff" * 50):
            answer = await client.post(at.http, content=body, headers={
                "Content-Type": PROTOBUF, "Content-Encoding": "gzip"})
            assert answer.status_code == 400
            assert "gzip" in status_of(answer, PROTOBUF).message
    assert recorder.calls == []


# -- a handler that cannot take the spans ---------------------------------------

@async_test
async def test_receiver_busy_asks_for_a_retry():
    recorder = Recorder(*[ReceiverBusy("queue full", retry_after=1.5)] * 3)
    request = encode_spans(sdk_spans())
    async with serving(recorder) as at, httpx.AsyncClient() as client:
        for content_type in (PROTOBUF, JSON):
            answer = await client.post(at.http, content=body_for(request, content_type),
                                       headers={"Content-Type": content_type})
            assert answer.status_code == 503
            assert answer.headers["Retry-After"] == "2"
            status = status_of(answer, content_type)
            assert status.code == code_pb2.UNAVAILABLE and status.message == "queue full"
            retry = error_details_pb2.RetryInfo()
            assert status.details[0].Unpack(retry) and retry.retry_delay.ToMilliseconds() == 1500
        error = await grpc_error(at.grpc, request.SerializeToString())
    assert error.code() is grpc.StatusCode.UNAVAILABLE and error.details() == "queue full"
    details = dict(error.trailing_metadata())["grpc-status-details-bin"]
    retry = error_details_pb2.RetryInfo()
    assert status_pb2.Status.FromString(details).details[0].Unpack(retry)
    assert retry.retry_delay.ToMilliseconds() == 1500


@async_test
async def test_a_failing_handler_is_logged_and_the_server_goes_on(caplog):
    recorder = Recorder(RuntimeError("disk on fire"), RuntimeError("disk on fire"))
    body = encode_spans(sdk_spans()).SerializeToString()
    with caplog.at_level(logging.ERROR, logger="otel_bridge.service.otlp_receiver"):
        async with serving(recorder) as at, httpx.AsyncClient() as client:
            answer = await client.post(at.http, content=body, headers={"Content-Type": PROTOBUF})
            assert answer.status_code == 500
            status = status_of(answer, PROTOBUF)
            assert status.code == code_pb2.INTERNAL and "RuntimeError" in status.message
            assert "disk on fire" not in status.message
            error = await grpc_error(at.grpc, body)
            assert error.code() is grpc.StatusCode.INTERNAL
            # The next requests go through.
            answer = await client.post(at.http, content=body, headers={"Content-Type": PROTOBUF})
            assert response_of(answer, PROTOBUF) == ExportTraceServiceResponse()
            assert await grpc_export(at.grpc, body) == ExportTraceServiceResponse()
    failures = [r for r in caplog.records if r.name == "otel_bridge.service.otlp_receiver"]
    assert len(failures) == 2 and all(r.exc_info[1].args == ("disk on fire",) for r in failures)
    assert len(recorder.calls) == 4
