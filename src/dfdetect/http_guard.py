"""An ASGI guard in front of the service: every request body is checked before BentoML parses it.

BentoML answers a body it cannot parse (a wrong field name, a text field where a file belongs, a missing or
mismatched multipart boundary, thousands of parts, a very long file name, a form-encoded body) with a 500
and a generic message. Here each such request gets a 4xx JSON error that says what was wrong, before any
temporary file is written: the body is read with a size limit and a read timeout, the multipart structure is
parsed with limits on parts, names and text sizes, and only then is the buffered body handed to BentoML.
A fault further in still answers JSON, never a traceback or a server path.

A route with a direct handler (`direct`) is answered here, from the checked body: the request never walks
the app's routers, mounts and FastAPI's dependency solving, which cost more CPU than the rest of a served
image (benchmarks/serving.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header

log = logging.getLogger(__name__)

MAX_PARTS = 8  # an endpoint takes at most a file and a few small fields (a batch: its files and fields)
MAX_FILENAME_BYTES = 200  # BentoML keeps the client's file name in a temporary file name (NAME_MAX is 255)
MAX_TEXT_FIELD_BYTES = 64  # frameNumber, explain
MAX_BOUNDARY = 70  # RFC 2046
SMALL_BODY = 64 * 1024  # any other POST (unknown routes, feedback-sized JSON)
DRAIN_BYTES = 8 * 1024 * 1024  # how much of a refused body is read and dropped so the client gets the answer
REFUSAL_DRAIN_S = 1.0  # how long a body refused for the upload limit is read away before its 503
PARTS_KEY = "dfdetect.parts"  # the ASGI scope key under which a route with keep_parts finds the parsed form


class Refused(Exception):
    """A request refused before it reaches the service: HTTP status and what was wrong."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass(frozen=True)
class Route:
    """What one POST endpoint accepts. kind: multipart (a file field and small text fields), json, or raw (any
    body up to max_body, e.g. an image as the request body)."""

    kind: str
    max_body: int
    file_field: str | None = None
    text_fields: frozenset[str] = field(default_factory=frozenset)
    content_types: tuple[str, ...] = ()  # for json/raw: the accepted media types ("" = any)
    max_files: int = 1  # multipart: how many times the file field may be given (a batch of images)
    # multipart: hand the parsed parts on in scope[PARTS_KEY], so the endpoint does not parse the body again
    keep_parts: bool = False

    @property
    def max_parts(self) -> int:
        return max(MAX_PARTS, self.max_files + len(self.text_fields))

    def describe(self) -> str:
        if self.kind == "multipart":
            files = "a file" if self.max_files == 1 else f"1 to {self.max_files} files, the field repeated"
            fields = [f"{self.file_field} ({files})", *sorted(self.text_fields)]
            return "multipart/form-data with the fields " + ", ".join(fields)
        return " or ".join(self.content_types) if self.content_types else "a request body"


@dataclass(frozen=True)
class Answer:
    """What a direct handler answers: a status and a JSON body."""

    status: int
    body: dict | list
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Part:
    """One part of a checked multipart body (data only when the route keeps its parts)."""

    name: str
    filename: str | None
    data: bytes


async def send_json(send: Callable, status: int, body: dict | list, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body, separators=(",", ":")).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": data})


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _receive_within(receive: Callable, timeout_s: float) -> dict | None:
    """The next ASGI message, or None after `timeout_s`. The pending receive is left to finish, not cancelled:
    cancelling it inside BentoML's middleware stack made the answer's body go missing."""
    task = asyncio.ensure_future(receive())
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    return task.result() if done else None


class _Deadline:
    """When reading a body must end (None: never); what is left of it bounds each wait for the next chunk."""

    def __init__(self, total_s: float | None):
        self.loop = asyncio.get_running_loop()
        self.at = None if total_s is None else self.loop.time() + total_s

    def wait_s(self, timeout_s: float) -> float:
        return timeout_s if self.at is None else min(timeout_s, self.at - self.loop.time())

    def passed(self) -> bool:
        return self.at is not None and self.loop.time() >= self.at

    def left_s(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - self.loop.time())


async def _receive_until(receive: Callable, timeout_s: float, deadline: _Deadline) -> dict | None:
    wait_s = deadline.wait_s(timeout_s)
    return await _receive_within(receive, wait_s) if wait_s > 0 else None


def worth_draining(scope: dict) -> bool:
    """Whether reading a refused body away lets its client read the answer: not when the client waits for
    `100 Continue` before sending it (reading would ask it to send the body for nothing: it reads the refusal
    at once), nor when its declared length is over DRAIN_BYTES (its connection is reset anyway)."""
    if (_header(scope, b"expect") or "").strip().lower() == "100-continue":
        return False
    length = _header(scope, b"content-length")
    return length is None or not length.isdigit() or int(length) <= DRAIN_BYTES


async def drain(receive: Callable, budget: int, timeout_s: float, total_s: float | None = None) -> None:
    """Read and drop up to `budget` more bytes of a refused body, so the client (still sending) reads our
    answer instead of a connection reset; for at most `total_s` in all (a slow client is not waited for)."""
    deadline = _Deadline(total_s)
    while budget > 0:
        message = await _receive_until(receive, timeout_s, deadline)
        if message is None or message["type"] == "http.disconnect" or not message.get("more_body", False):
            return
        budget -= len(message.get("body", b""))


async def read_body(receive: Callable, limit: int, timeout_s: float, total_s: float | None = None) -> bytes:
    """The whole body, refusing it (413) past `limit` bytes, (408) when it stalls for `timeout_s`, and (408)
    when all of it takes over `total_s` (a byte every few seconds never stalls, yet holds the connection)."""
    deadline = _Deadline(total_s)
    chunks, size = [], 0
    while True:
        message = await _receive_until(receive, timeout_s, deadline)
        if message is None and deadline.passed():
            raise Refused(408, f"the request body took over {total_s:g} s", {"Connection": "close"})
        if message is None:
            raise Refused(408, f"the request body stalled for {timeout_s:g} s", {"Connection": "close"})
        if message["type"] == "http.disconnect":
            raise Refused(400, "the client disconnected before the body was complete")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            await drain(receive, DRAIN_BYTES, timeout_s, deadline.left_s())
            raise Refused(413, f"request body over the limit of {limit} bytes", {"Connection": "close"})
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class _FormChecker:
    """Walks a multipart body with python-multipart's streaming parser and checks it against a Route."""

    def __init__(self, route: Route, keep: bool = False):
        self.route, self.keep = route, keep
        self.parts: list[tuple[str, str | None, int]] = []  # name, filename, size
        self.data: list[bytes] = []  # per part, when kept
        self._chunks: list[bytes] = []
        self._header_name, self._header_value = b"", b""
        self._headers: dict[bytes, bytes] = {}
        self._size = 0
        self.ended = False

    def callbacks(self) -> dict:
        def on_header_field(data, start, end):
            self._header_name += data[start:end]

        def on_header_value(data, start, end):
            self._header_value += data[start:end]

        def on_header_end():
            self._headers[self._header_name.strip().lower()] = self._header_value.strip()
            self._header_name, self._header_value = b"", b""

        def on_part_begin():
            if len(self.parts) >= self.route.max_parts:
                raise Refused(
                    400,
                    f"more than {self.route.max_parts} multipart parts; this endpoint takes {self.route.describe()}",
                )
            self._headers, self._size, self._chunks = {}, 0, []

        def on_headers_finished():
            self.parts.append(self._check_part_headers())

        def on_part_data(data, start, end):
            self._size += end - start
            name, filename, _ = self.parts[-1]
            if filename is None and self._size > MAX_TEXT_FIELD_BYTES:
                raise Refused(
                    400,
                    f"field {name!r}: over {MAX_TEXT_FIELD_BYTES} bytes "
                    f"(only {self.route.file_field!r} may be large, and it must be a file)",
                )
            if self.keep:
                self._chunks.append(data[start:end])

        def on_part_end():
            name, filename, _ = self.parts[-1]
            self.parts[-1] = (name, filename, self._size)
            if self.keep:
                self.data.append(b"".join(self._chunks))

        def on_end():
            self.ended = True

        return {
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_begin": on_part_begin,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_end": on_end,
        }

    def _check_part_headers(self) -> tuple[str, str | None, int]:
        disposition = self._headers.get(b"content-disposition")
        if disposition is None:
            raise Refused(400, "a multipart part has no Content-Disposition header")
        kind, options = parse_options_header(disposition)
        if kind != b"form-data" or b"name" not in options:
            raise Refused(400, "each multipart part needs 'Content-Disposition: form-data; name=...'")
        name = options[b"name"].decode("utf-8", "replace")
        filename = options.get(b"filename")
        if filename is not None and len(filename) > MAX_FILENAME_BYTES:
            raise Refused(400, f"field {name!r}: file name over {MAX_FILENAME_BYTES} bytes")
        allowed = {self.route.file_field, *self.route.text_fields}
        if name not in allowed:
            raise Refused(400, f"unexpected field {name[:40]!r}: this endpoint takes {self.route.describe()}")
        given = sum(p[0] == name for p in self.parts)
        if name == self.route.file_field and self.route.max_files > 1:
            if given >= self.route.max_files:
                raise Refused(
                    400,
                    f"field {name!r}: more than {self.route.max_files} files; this endpoint takes "
                    f"at most {self.route.max_files} per request",
                )
        elif given:
            raise Refused(400, f"field {name!r} given twice")
        if name == self.route.file_field and filename is None:
            raise Refused(400, f"field {name!r} must be a file upload (e.g. curl -F {name}=@photo.jpg), not text")
        if name != self.route.file_field and filename is not None:
            raise Refused(400, f"field {name!r} must be a text field, not a file")
        return name, filename and filename.decode("utf-8", "replace"), 0


def check_multipart(route: Route, content_type: str | None, body: bytes, keep: bool = False) -> list[Part]:
    """Refuse (4xx) a body that is not a well-formed form with the route's file field; its parts, in order
    (with their data when `keep`)."""
    media, options = parse_options_header(content_type or "")
    if media != b"multipart/form-data":
        raise Refused(415, f"expected {route.describe()}; got Content-Type {media.decode('latin-1')[:80] or 'none'!r}")
    boundary = options.get(b"boundary")
    if not boundary or len(boundary) > MAX_BOUNDARY:
        raise Refused(400, f"multipart/form-data needs a boundary of 1 to {MAX_BOUNDARY} characters")
    checker = _FormChecker(route, keep)
    try:
        parser = MultipartParser(boundary, checker.callbacks())
        parser.write(body)
        parser.finalize()
    except Refused:
        raise
    except Exception as exc:  # python-multipart's parse errors: the body does not follow the boundary
        raise Refused(
            400,
            f"malformed multipart body ({type(exc).__name__}: lines must end in CRLF and parts "
            "must be separated by the boundary of the Content-Type header)",
        ) from None
    if not checker.ended:
        raise Refused(400, "malformed multipart body: no closing boundary (does it match the Content-Type header?)")
    if not any(name == route.file_field for name, _, _ in checker.parts):
        raise Refused(400, f"missing field {route.file_field!r}: this endpoint takes {route.describe()}")
    data = checker.data if keep else [b""] * len(checker.parts)
    return [Part(name, filename, d) for (name, filename, _), d in zip(checker.parts, data)]


def check_content_type(route: Route, content_type: str | None) -> None:
    media = (content_type or "").split(";")[0].strip().lower()
    if route.content_types and media not in route.content_types:
        raise Refused(415, f"expected Content-Type {route.describe()}; got {media[:80] or 'none'!r}")


# A direct handler: the request's scope and its checked body (a multipart route that keeps its parts: the
# parts) -> the answer.
DirectHandler = Callable[[dict, "bytes | list[Part]"], Awaitable[Answer]]


class RequestGuard:
    """ASGI middleware: `routes` maps a POST path to what it accepts; other POSTs get a small body limit.
    `direct` maps a POST path to a handler the guard calls itself (read at each request: the service fills it
    once its instance exists, after the middleware is built)."""

    def __init__(
        self,
        app,
        routes: dict[str, Route],
        body_timeout_s: float = 30.0,
        on_refused: Callable[[int], None] | None = None,
        direct: dict[str, DirectHandler] | None = None,
        upload_timeout_s: float | None = None,
        max_uploads: int | None = None,
    ):
        self.app, self.routes, self.body_timeout_s = app, routes, body_timeout_s
        # Bounds on what slow clients can hold: each body's whole read time, and how many are read at once
        # (every one holds a connection, a file descriptor and its bytes so far).
        self.upload_timeout_s, self.max_uploads, self.uploading = upload_timeout_s, max_uploads, 0
        self.refusing = 0  # requests over max_uploads whose bodies are being read away before their 503
        self.on_refused = on_refused or (lambda status: None)
        self.direct = direct if direct is not None else {}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked_send(message: dict) -> Awaitable | None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            return await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._checked(scope, receive)
                handler = self.direct.get(scope["path"]) if scope["method"] == "POST" else None
                if handler is not None:
                    answer = await handler(scope, scope.pop(PARTS_KEY, body))
                    return await send_json(tracked_send, answer.status, answer.body, answer.headers)
                receive = _replay(body, receive)
            await self.app(scope, receive, tracked_send)
        except Refused as exc:
            self.on_refused(exc.status)
            if not started:
                await send_json(send, exc.status, {"error": exc.message}, exc.headers)
        except Exception:  # a fault of ours: logged with its traceback here, answered without details
            log.exception("request to %s failed", scope.get("path"))
            if not started:
                await send_json(send, 500, {"error": "internal error (logged on the server)"})

    async def _checked(self, scope: dict, receive: Callable) -> bytes:
        """The body, read within its route's limits and checked (a kept form goes to scope[PARTS_KEY], and
        the body returned is then empty). Every body read, one refused for its size being drained too, counts
        towards max_uploads; past it the request is refused (503). Its body is first read away for at most
        REFUSAL_DRAIN_S where that lets the client read the answer (worth_draining), by at most max_uploads
        such refusals at once (the rest unread): at most twice max_uploads bodies are read at once."""
        if self.max_uploads is not None and self.uploading >= self.max_uploads:
            if self.refusing < self.max_uploads and worth_draining(scope):
                await self._drain_refused(receive)
            raise Refused(
                503,
                f"{self.max_uploads} uploads are being received already (the limit): try again shortly",
                {"Retry-After": "1", "Connection": "close"},
            )
        self.uploading += 1
        try:
            return await self._read_checked(scope, receive)
        finally:
            self.uploading -= 1

    async def _drain_refused(self, receive: Callable) -> None:
        """Read a refused body away briefly: a client that sends its whole body before reading (most simple
        ones) then reads the 503, where closing the connection on unread bytes would reset it mid-send. Bounded
        in time, bytes and how many at once, so refusals cannot hold what the limit protects."""
        self.refusing += 1
        try:
            await drain(receive, DRAIN_BYTES, min(self.body_timeout_s, REFUSAL_DRAIN_S), REFUSAL_DRAIN_S)
        except Exception:  # the client went away or broke its body: it still gets (or misses) the 503
            log.debug("draining a body refused at the upload limit failed", exc_info=True)
        finally:
            self.refusing -= 1

    async def _read_checked(self, scope: dict, receive: Callable) -> bytes:
        route = self.routes.get(scope["path"])
        limit = route.max_body if route else SMALL_BODY
        length = _header(scope, b"content-length")
        if length is not None:
            if not length.isdigit():
                raise Refused(400, "Content-Length is not a number")
            if int(length) > limit:
                if worth_draining(scope):  # read it away first: the client then sees the answer
                    await drain(receive, DRAIN_BYTES, self.body_timeout_s, self.upload_timeout_s)
                raise Refused(
                    413, f"request body of {length} bytes is over the limit of {limit} bytes", {"Connection": "close"}
                )
        content_type = _header(scope, b"content-type")
        if route is not None and route.kind != "multipart":
            check_content_type(route, content_type)
        body = await read_body(receive, limit, self.body_timeout_s, self.upload_timeout_s)
        if route is not None and route.kind == "multipart":
            parts = check_multipart(route, content_type, body, keep=route.keep_parts)
            if route.keep_parts:  # the endpoint reads the parts; the body is not held twice
                scope[PARTS_KEY], body = parts, b""
        return body


def _replay(body: bytes, receive: Callable) -> Callable:
    """A `receive` that hands the already-read body on once, then defers to the connection (disconnects)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
