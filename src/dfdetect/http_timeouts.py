"""A header read timeout for the uvicorn server BentoML runs.

uvicorn times out idle keep-alive connections, but not a connection that opened and never finished its
request headers (one byte every few seconds holds a connection and its memory for good: "slowloris").
`install_header_timeout` gives every connection `timeout_s` to complete each request's headers; the body read
timeout is dfdetect.http_guard's. It patches uvicorn's HTTP protocol classes in this process, which is why
the service calls it at import time, before BentoML's worker builds its uvicorn server.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)
_installed: dict[type, float] = {}


def _protocol_classes() -> list[type]:
    classes = []
    from uvicorn.protocols.http.h11_impl import H11Protocol

    classes.append(H11Protocol)
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        classes.append(HttpToolsProtocol)
    except ImportError:  # httptools is optional
        pass
    return classes


def _idle(protocol) -> bool:
    cycle = getattr(protocol, "cycle", None)
    return cycle is None or cycle.response_complete


def _arm(protocol, timeout_s: float) -> None:
    if getattr(protocol, "_dfdetect_deadline", None) is not None:
        return
    armed_for = getattr(protocol, "cycle", None)

    def expire() -> None:
        protocol._dfdetect_deadline = None
        if getattr(protocol, "cycle", None) is armed_for and _idle(protocol) and not protocol.transport.is_closing():
            log.info("closing a connection that sent no complete request headers within %.0f s", timeout_s)
            protocol.transport.close()

    protocol._dfdetect_deadline = protocol.loop.call_later(timeout_s, expire)


def _disarm(protocol) -> None:
    handle = getattr(protocol, "_dfdetect_deadline", None)
    if handle is not None:
        handle.cancel()
        protocol._dfdetect_deadline = None


def install_header_timeout(timeout_s: float) -> None:
    """Idempotent; a second call with another value changes the timeout."""
    for cls in _protocol_classes():
        first = cls not in _installed
        _installed[cls] = timeout_s
        if not first:
            continue
        made, received, lost = cls.connection_made, cls.data_received, cls.connection_lost

        def connection_made(self, transport, _made=made, _cls=cls):
            _made(self, transport)
            _arm(self, _installed[_cls])

        def data_received(self, data, _received=received, _cls=cls):
            before = getattr(self, "cycle", None)
            _received(self, data)
            if getattr(self, "cycle", None) is not before:  # a request's headers were complete
                _disarm(self)
            if _idle(self):  # between requests, or the start of the next one: its headers are on the clock
                _arm(self, _installed[_cls])

        def connection_lost(self, exc, _lost=lost):
            _disarm(self)
            _lost(self, exc)

        cls.connection_made, cls.data_received, cls.connection_lost = connection_made, data_received, connection_lost
