"""A small ASGI app behind dfdetect's RequestGuard (at most one upload received at a time), for tests over real
HTTP: `uvicorn guarded_app:app --app-dir tests` serves it."""

from dfdetect.http_guard import RequestGuard


async def echo_length(scope, receive, send):
    """Reads the whole body and answers its length."""
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(size).encode()})


app = RequestGuard(echo_length, routes={}, body_timeout_s=10.0, upload_timeout_s=20.0, max_uploads=1)
