"""An OTLP trace receiver: OTLP/gRPC and OTLP/HTTP in, plain `Span`s out.

The sidecar service takes spans from any OpenTelemetry SDK or Collector the way
they already send them, so it speaks OTLP itself rather than a format of its
own. Both transports decode a request, turn each span into a `Span` with
`model.otlp.span_from_proto` and give the spans to one async handler; what they
answer follows the OTLP specification (https://opentelemetry.io/docs/specs/otlp/):

- a span that cannot be decoded (bad id lengths, unknown kind or status code)
  is rejected alone: the others still reach the handler, and the answer is a
  success with `partial_success` counting it and saying why;
- a body that cannot be decoded is a permanent error (HTTP 400 / gRPC
  INVALID_ARGUMENT), as is one over the size limit (HTTP 413 / gRPC
  RESOURCE_EXHAUSTED); the limit holds after gzip decompression too;
- a handler that raises `ReceiverBusy` makes the client retry later (HTTP 503
  with Retry-After / gRPC UNAVAILABLE with RetryInfo); any other exception from
  it is logged and answered HTTP 500 / gRPC INTERNAL, which clients do not
  retry, and the server goes on serving.

HTTP error bodies are `google.rpc.Status` messages, in the request's encoding.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional

import grpc
from aiohttp import web
from google.protobuf import any_pb2, json_format
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from otel_bridge.model.otlp import request_from_json, span_from_proto
from otel_bridge.model.spans import Span
from otel_bridge.service.auth import bearer_matches
from otel_bridge.service.time_slices import TimeSlices

logger = logging.getLogger(__name__)

TRACES_PATH = "/v1/traces"
_GRPC_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
_PROTOBUF, _JSON = "application/x-protobuf", "application/json"
_READ_CHUNK = 64 * 1024
_REASONS_SHOWN = 3  # rejected spans whose reason goes into error_message


@dataclass(frozen=True)
class Received:
    """What a handler answers: how many of the spans it was given it rejected,
    and why (sent to the client as `partial_success` when rejected_spans > 0)."""

    rejected_spans: int = 0
    error_message: str = ""


class ReceiverBusy(Exception):
    """Raised by a handler that cannot take spans now (e.g. its queue is full): the
    receiver answers gRPC UNAVAILABLE / HTTP 503 with Retry-After, so the client retries."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


SpansHandler = Callable[[list[Span], str], Awaitable[Received]]  # (spans, "grpc" | "http")
# Told of every input refused here, to count it: (transport, reason, how many).
# Reasons: malformed (a body that does not decode), too_large,
# unsupported_media_type, method_not_allowed, invalid_span (a span that does
# not decode, the others taken). A message over the gRPC limit is refused by
# grpc itself, before any of this code runs, and is not reported.
OnReject = Callable[[str, str, int], None]


def _ignore(transport: str, reason: str, count: int) -> None:
    pass


class _HandlerFailed(Exception):
    """The handler raised something other than `ReceiverBusy` (already logged)."""


async def _export(
    handler: SpansHandler, request: ExportTraceServiceRequest, transport: str,
    on_reject: OnReject = _ignore,
) -> ExportTraceServiceResponse:
    """Decode the spans, hand the good ones over, and say what was rejected."""
    spans, reasons = await _decode_spans(request)
    rejected = len(reasons)
    messages = []
    if reasons:
        on_reject(transport, "invalid_span", rejected)
        more = f"; and {rejected - _REASONS_SHOWN} more" if rejected > _REASONS_SHOWN else ""
        messages.append(f"{rejected} span(s) could not be decoded: "
                        + "; ".join(reasons[:_REASONS_SHOWN]) + more)
    if spans:
        try:
            received = await handler(spans, transport)
        except ReceiverBusy:
            raise
        except Exception as exc:
            logger.exception("OTLP/%s: the span handler failed on %d span(s)", transport, len(spans))
            raise _HandlerFailed(f"the span handler failed ({type(exc).__name__})") from exc
        if received.rejected_spans > 0:
            rejected += received.rejected_spans
            if received.error_message:
                messages.append(received.error_message)
    response = ExportTraceServiceResponse()
    if rejected:
        response.partial_success.rejected_spans = rejected
        response.partial_success.error_message = "; ".join(messages)
    return response


async def _decode_spans(request: ExportTraceServiceRequest) -> tuple[list[Span], list[str]]:
    """The request's spans, and why each of the others could not be read.
    A big request is decoded a slice of time at a time, letting the event
    loop serve the other requests between two (a thread would contend with
    it for the GIL at every system call it makes)."""
    spans: list[Span] = []
    reasons: list[str] = []
    slices = TimeSlices()
    for r, resource_spans in enumerate(request.resource_spans):
        for s, scope_spans in enumerate(resource_spans.scope_spans):
            for i, proto in enumerate(scope_spans.spans):
                try:
                    spans.append(span_from_proto(proto))
                except ValueError as exc:
                    reasons.append(f"resource_spans[{r}].scope_spans[{s}].spans[{i}]: {exc}")
                await slices.turn()
    return spans, reasons


def _status(code: int, message: str, detail: Optional[Message] = None) -> status_pb2.Status:
    status = status_pb2.Status(code=code, message=message)
    if detail is not None:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    return status


def _bad_request(message: str) -> error_details_pb2.BadRequest:
    return error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(description=message)])


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    info = error_details_pb2.RetryInfo()
    info.retry_delay.FromNanoseconds(int(max(seconds, 0.0) * 1e9))
    return info


# -- OTLP/gRPC ------------------------------------------------------------------

async def start_grpc_receiver(
    handler: SpansHandler, host: str, port: int, max_message_bytes: int = 16 * 1024 * 1024,
    on_reject: OnReject = _ignore, token: Optional[str] = None,
    tls: Optional[tuple[bytes, bytes]] = None,
) -> tuple[grpc.aio.Server, int]:
    """Starts a grpc.aio server implementing opentelemetry.proto.collector.trace.v1 TraceService/Export;
    returns (server, bound port) — port 0 means pick a free one. Caller stops it with await server.stop(grace).
    `token`: the bearer token a caller must send as `authorization` metadata (the Collector's
    bearertokenauth convention); `tls`: (certificate chain, private key), PEM."""

    # Raw bytes in and out: a request grpc failed to deserialize would be
    # answered INTERNAL, where OTLP wants INVALID_ARGUMENT.
    async def export(body: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if token is not None:
            given = dict(context.invocation_metadata() or ()).get("authorization")
            if not bearer_matches(given if isinstance(given, str) else None, token):
                on_reject("grpc", "unauthorized", 1)
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    "missing or wrong bearer token (authorization metadata)")
        try:
            request = ExportTraceServiceRequest.FromString(body)
        except DecodeError as exc:
            on_reject("grpc", "malformed", 1)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"not an ExportTraceServiceRequest: {exc}")
        try:
            response = await _export(handler, request, "grpc", on_reject)
        except ReceiverBusy as busy:
            status = _status(code_pb2.UNAVAILABLE, str(busy), _retry_info(busy.retry_after))
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(busy), trailing_metadata=(
                ("grpc-status-details-bin", status.SerializeToString()),))
        except _HandlerFailed as failed:
            await context.abort(grpc.StatusCode.INTERNAL, str(failed))
        return response.SerializeToString()

    # grpc itself answers RESOURCE_EXHAUSTED to a message over this size, also
    # when it is over it only once decompressed.
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        _GRPC_SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(export)}),))
    if tls is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        certificate_chain, private_key = tls
        try:
            bound = server.add_secure_port(
                f"{host}:{port}", grpc.ssl_server_credentials([(private_key, certificate_chain)]))
        except RuntimeError as exc:  # grpc's word for a certificate it cannot use
            raise OSError(f"the OTLP/gRPC receiver cannot serve TLS on {host}:{port} with "
                          f"this certificate and key: {exc}") from None
    await server.start()
    return server, bound


# -- OTLP/HTTP ------------------------------------------------------------------

class _TooLarge(Exception):
    pass


def otlp_http_routes(
    handler: SpansHandler, max_body_bytes: int = 16 * 1024 * 1024, on_reject: OnReject = _ignore,
    token: Optional[str] = None,
) -> list[web.RouteDef]:
    """POST /v1/traces accepting application/x-protobuf and application/json (OTLP/JSON: hex ids — use
    model.otlp.request_from_json), Content-Encoding gzip (decompressed size also capped by max_body_bytes,
    safe against gzip bombs) or identity. Answers in the request's content type (ExportTraceServiceResponse,
    with partial_success when spans were rejected)."""

    async def traces(request: web.Request) -> web.Response:
        if not bearer_matches(request.headers.get("Authorization"), token):
            on_reject("http", "unauthorized", 1)
            return _error(401, code_pb2.UNAUTHENTICATED, "missing or wrong bearer token", _PROTOBUF,
                          headers={"WWW-Authenticate": 'Bearer realm="otel-bridge"'})
        # Any method is routed here so that a wrong one, too, gets a Status body.
        if request.method != "POST":
            on_reject("http", "method_not_allowed", 1)
            return _error(405, code_pb2.UNIMPLEMENTED, "OTLP/HTTP takes POST only", _PROTOBUF,
                          headers={"Allow": "POST"})
        content_type = request.content_type
        if content_type not in (_PROTOBUF, _JSON):
            on_reject("http", "unsupported_media_type", 1)
            return _error(415, code_pb2.INVALID_ARGUMENT,
                          f"Content-Type must be {_PROTOBUF} or {_JSON}, not {content_type}", _PROTOBUF)
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("gzip", "identity"):
            on_reject("http", "unsupported_media_type", 1)
            return _error(415, code_pb2.INVALID_ARGUMENT,
                          f"Content-Encoding must be gzip or identity, not {encoding}", content_type)
        try:
            body = await _read_body(request, encoding == "gzip", max_body_bytes)
            export_request = _parse(body, content_type)
        except _TooLarge:
            on_reject("http", "too_large", 1)
            return _error(413, code_pb2.RESOURCE_EXHAUSTED,
                          f"request body is over {max_body_bytes} bytes", content_type)
        except ValueError as exc:
            on_reject("http", "malformed", 1)
            return _error(400, code_pb2.INVALID_ARGUMENT, str(exc), content_type,
                          detail=_bad_request(str(exc)))
        try:
            response = await _export(handler, export_request, "http", on_reject)
        except ReceiverBusy as busy:
            return _error(503, code_pb2.UNAVAILABLE, str(busy), content_type,
                          detail=_retry_info(busy.retry_after),
                          headers={"Retry-After": str(max(0, math.ceil(busy.retry_after)))})
        except _HandlerFailed as failed:
            return _error(500, code_pb2.INTERNAL, str(failed), content_type)
        return web.Response(body=_encode(response, content_type), content_type=content_type)

    return [web.route("*", TRACES_PATH, traces)]


async def _read_body(request: web.Request, gzipped: bool, limit: int) -> bytes:
    """The body, read in chunks and given up on past `limit` bytes, both as
    sent and once decompressed."""
    if request.content_length is not None and request.content_length > limit:
        raise _TooLarge
    body = bytearray()
    while chunk := await request.content.read(min(_READ_CHUNK, limit + 1 - len(body))):
        body += chunk
        if len(body) > limit:
            raise _TooLarge
    # By default aiohttp's server gunzips bodies itself, in bounded steps, so
    # the capped reads above already saw it decompressed; a server run with
    # auto_decompress=False leaves that to us. Only what still starts with
    # gzip's magic is gzip here.
    if gzipped and body[:2] == b"\x1f\x8b":
        return _gunzip(bytes(body), limit)
    return bytes(body)


def _gunzip(data: bytes, limit: int) -> bytes:
    out = bytearray()
    while data:  # one gzip member after another, as gzip itself reads them
        decompressor = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
        try:
            # Never more than one byte past the limit, however well it compresses.
            out += decompressor.decompress(data, limit + 1 - len(out))
        except zlib.error as exc:
            raise ValueError(f"body is not valid gzip: {exc}") from None
        if len(out) > limit:
            raise _TooLarge
        if not decompressor.eof:
            raise ValueError("gzip body is truncated")
        data = decompressor.unused_data
    return bytes(out)


def _parse(body: bytes, content_type: str) -> ExportTraceServiceRequest:
    """The request in `body`; ValueError saying why when it is not one."""
    if content_type == _PROTOBUF:
        try:
            return ExportTraceServiceRequest.FromString(body)
        except DecodeError as exc:
            raise ValueError(f"not a protobuf ExportTraceServiceRequest: {exc}") from None
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    try:
        return request_from_json(obj)
    # request_from_json walks the object before validating it, so a wrongly
    # shaped one (a string where a list of objects belongs) fails as these.
    except (ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise ValueError(f"not an OTLP/JSON ExportTraceServiceRequest: {exc}") from None


def _encode(message: Message, content_type: str) -> bytes:
    if content_type == _JSON:
        return json_format.MessageToJson(message, indent=None).encode()
    return message.SerializeToString()


def _error(http_status: int, code: int, message: str, content_type: str,
           detail: Optional[Message] = None, headers: Optional[dict[str, str]] = None) -> web.Response:
    return web.Response(status=http_status, body=_encode(_status(code, message, detail), content_type),
                        content_type=content_type, headers=headers)
