"""Server-sent events: a streaming worker's answer relayed chunk by chunk as it is written.

Not a protocol of its own but the wire format of streamed answers, which the protocols call:
``/predict`` (``app.protocols.predict``) answers a streaming worker's request with events when
the client asks for a stream (``Accept: text/event-stream``, or a true ``stream`` field in the
request), and Triton's ``generate_stream`` always does (``app.protocols.generate``)::

    HTTP/1.1 200 OK
    content-type: text/event-stream; charset=utf-8

    data: {"text": "Once", ...}              one event per chunk, as the model writes it

    data: {"text": " upon", ...}

    event: error                             an error after the first chunk (a crash, a
    data: {"detail": "..."}                  time limit): the status has gone out already

The status is sent with the first chunk: a request refused before it (503, 504, 400...) is
answered in the protocol's usual error shape. The stream ends when the model's does; when the
client leaves, the worker stops the stream at its next yield (``app.serving.streams``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import TypeAdapter
from starlette.types import Receive, Scope, Send

from ..ops.middleware import STREAM
from ..serving.errors import ServingError
from ..serving.streams import OpenStream

EVENT_STREAM = "text/event-stream"
STREAM_FIELD = "stream"
HEADERS = {
    "Cache-Control": "no-cache",
    # nginx buffers answers by default: an event would wait there for the ones after it.
    "X-Accel-Buffering": "no",
}

# An item of an open stream (a chunk, or the ServingError that ended it) as event bytes.
Encode = Callable[[Any], bytes]


def wants_events(request: Request, value: Any) -> bool:
    """The client asked for a stream: ``Accept: text/event-stream``, or ``stream: true`` in
    its request."""
    accept = request.headers.get("accept", "")
    if EVENT_STREAM in (part.split(";", 1)[0].strip() for part in accept.split(",")):
        return True
    return getattr(value, STREAM_FIELD, None) is True


def event(data: bytes, name: str | None = None) -> bytes:
    """One event; ``data`` is one line of JSON (compact JSON never holds a raw newline)."""
    head = b"" if name is None else b"event: " + name.encode() + b"\n"
    return head + b"data: " + data + b"\n\n"


def detail_encoder(chunk_adapter: TypeAdapter[Any]) -> Encode:
    """``/predict``'s events: the chunk's JSON; an error as ``event: error`` with
    ``{"detail": message}``, the shape of its error answers."""
    error_adapter: TypeAdapter[dict[str, str]] = TypeAdapter(dict[str, str])

    def encode(item: Any) -> bytes:
        if isinstance(item, ServingError):
            return event(error_adapter.dump_json({"detail": item.message}), "error")
        return event(chunk_adapter.dump_json(item))

    return encode


class EventStreamResponse(Response):
    """Relays an open stream as events, then closes it; notes the stream on the request's
    scope for the access log (its length, whether the client left)."""

    media_type = EVENT_STREAM

    def __init__(self, stream: OpenStream, encode: Encode) -> None:
        super().__init__(None, 200, HEADERS, EVENT_STREAM)
        # Its length is unknown: chunked transfer, not the Content-Length: 0 of an empty body.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.stream = stream
        self.encode = encode

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[STREAM] = self.stream
        async with self.stream as items:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async for item in items:
                await send({"type": "http.response.body", "body": self.encode(item),
                            "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def event_stream_docs(chunk_adapter: TypeAdapter[Any], description: str
                      ) -> dict[str, Any]:
    """The OpenAPI content of a streamed answer: one chunk per ``data:`` line."""
    return {"content": {EVENT_STREAM: {"schema": {
        **chunk_adapter.json_schema(), "description": description}}}}
