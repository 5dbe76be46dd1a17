"""A small ASGI app behind dfdetect's RequestGuard (at most one upload received at a time), for tests over real
HTTP: `uvicorn guarded_app:app --app-dir tests` serves it."""

from dfdetect.http_guard import SMALL_BODY, RequestGuard, read_body


async def echo_length(scope, receive, send):
    """Reads the whole body and answers its length."""
    body = await read_body(receive, SMALL_BODY, timeout_s=10.0)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


app = RequestGuard(echo_length, routes={}, body_timeout_s=10.0, upload_timeout_s=20.0, max_uploads=1)
