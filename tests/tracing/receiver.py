"""An OTLP/HTTP trace receiver for tests, on the project's own HTTP server.

It takes what an OTLP/HTTP exporter POSTs to `/v1/traces` as OTLP/JSON, checks it against the OTLP schema by
parsing it into opentelemetry-proto's `ExportTraceServiceRequest` (strictly: an unknown or misspelt field is
a 400, as a collector would answer), and keeps the spans, flattened, for assertions. `answers` scripts the
next statuses (a collector that is overloaded, or refuses), each with an optional `Retry-After`.
"""

from __future__ import annotations

import base64
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import trio
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecard.httpserver import HttpRequest, Responder, serve_tcp_http

PATH = "/v1/traces"


@dataclass
class ReceivedSpan:
    name: str
    trace_id: str  # hex, as OTLP/JSON writes it
    span_id: str
    parent_span_id: str | None
    kind: int  # OTLP's: 1 internal, 2 server, 3 client
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: int  # 0 unset, 1 ok, 2 error
    status_message: str
    flags: int
    resource: dict[str, Any]
    scope: str


@dataclass
class Receiver:
    spans: list[ReceivedSpan] = field(default_factory=list)
    posts: int = 0
    answers: deque[tuple[int, str | None]] = field(default_factory=deque)  # scripted (status, retry-after)
    headers: list[dict[str, str]] = field(default_factory=list)  # of each POST
    url: str = ""

    async def handle(self, request: HttpRequest, responder: Responder) -> None:
        if request.method != "POST" or request.path != PATH:
            await responder.send(404, [("content-type", "text/plain")], b"not found\n")
            return
        self.posts += 1
        self.headers.append({k.decode(): v.decode() for k, v in request.headers})
        if self.answers:
            status, retry_after = self.answers.popleft()
            extra = [("retry-after", retry_after)] if retry_after is not None else []
            await responder.send(status, [("content-type", "application/json"), *extra], b"{}")
            return
        if request.header("content-type") != "application/json":
            await responder.send(415, [("content-type", "text/plain")], b"OTLP/JSON only\n")
            return
        try:
            self.spans += decode(request.body)
        except (ValueError, json_format.ParseError) as exc:
            await responder.send(400, [("content-type", "text/plain")], f"{exc}\n".encode())
            return
        await responder.send(200, [("content-type", "application/json")], b"{}")

    def by_name(self, name: str) -> list[ReceivedSpan]:
        return [span for span in self.spans if span.name == name]

    def one(self, name: str) -> ReceivedSpan:
        [span] = self.by_name(name)
        return span


async def serve_receiver(nursery: trio.Nursery) -> Receiver:
    receiver = Receiver()
    host, port = await nursery.start(serve_tcp_http, receiver.handle, "127.0.0.1", 0)
    receiver.url = f"http://{host}:{port}{PATH}"
    return receiver


def decode(body: bytes) -> list[ReceivedSpan]:
    """OTLP/JSON to spans; raises ValueError or ParseError for anything the OTLP schema does not allow."""
    data = json.loads(body)
    _check_schema(data)
    out = []
    for resource_spans in data.get("resourceSpans", []):
        resource = _attributes(resource_spans.get("resource", {}).get("attributes", []))
        for scope_spans in resource_spans.get("scopeSpans", []):
            scope = scope_spans.get("scope", {}).get("name", "")
            for span in scope_spans.get("spans", []):
                status = span.get("status", {})
                out.append(ReceivedSpan(
                    name=span["name"], trace_id=span["traceId"], span_id=span["spanId"],
                    parent_span_id=span.get("parentSpanId") or None, kind=span.get("kind", 0),
                    start_ns=int(span["startTimeUnixNano"]), end_ns=int(span["endTimeUnixNano"]),
                    attributes=_attributes(span.get("attributes", [])), status_code=status.get("code", 0),
                    status_message=status.get("message", ""), flags=span.get("flags", 0), resource=resource, scope=scope,
                ))
    return out


def _check_schema(data: Any) -> None:
    """Parse into the protobuf message, strictly. OTLP/JSON writes ids as hex where protobuf JSON expects base64."""
    converted = json.loads(json.dumps(data))
    for resource_spans in converted.get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        raw = bytes.fromhex(span[key])
                        if len(raw) != (16 if key == "traceId" else 8):
                            raise ValueError(f"{key} {span[key]!r} has the wrong length")
                        span[key] = base64.b64encode(raw).decode()
                for link in span.get("links", []):
                    link["traceId"] = base64.b64encode(bytes.fromhex(link["traceId"])).decode()
                    link["spanId"] = base64.b64encode(bytes.fromhex(link["spanId"])).decode()
    json_format.ParseDict(converted, ExportTraceServiceRequest(), ignore_unknown_fields=False)


def _value(value: dict[str, Any]) -> Any:
    [(kind, inner)] = value.items()
    if kind == "intValue":
        return int(inner)
    if kind == "arrayValue":
        return [_value(v) for v in inner.get("values", [])]
    return inner


def _attributes(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    return {pair["key"]: _value(pair["value"]) for pair in pairs}
