"""A request id for every HTTP request: made here (never taken from the client, since the audit trail must be
able to trust it), visible to the handlers through a context variable, and sent back as `X-Request-ID`."""

from __future__ import annotations

import uuid
from contextvars import ContextVar
from typing import Callable

HEADER = b"x-request-id"
REQUEST_ID: ContextVar[str] = ContextVar("dfdetect_request_id", default="")


def current() -> str:
    """The id of the request being answered (a fresh one outside any request, e.g. in a direct call)."""
    return REQUEST_ID.get() or uuid.uuid4().hex


class RequestIds:
    """ASGI middleware: sets REQUEST_ID for the request's task and adds the header to its response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)

        async def send_with_id(message: dict):
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, request_id.encode())]}
            return await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)
