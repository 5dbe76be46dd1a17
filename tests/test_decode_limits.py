"""Limits on what one upload may cost to decode or to receive, found by the second hostile-input run: images
whose decoding fails late or takes many passes, videos whose frames grow midway or are millions, bodies that
trickle in, and what error messages may show. Unit level; test_serving_hostile.py checks them over HTTP."""

import asyncio
import io
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import la_tiff, many_scan_jpeg, write_mjpeg_video, write_video
from PIL import Image

from dfdetect.http_guard import Refused, RequestGuard, read_body
from dfdetect.preprocessing import MAX_JPEG_SCANS, MAX_JPEG_SEGMENTS, ImageError, decode_image, jpeg_scan_count
from dfdetect.video import VideoError, read_frames


def test_an_image_that_loads_but_has_no_rgb_conversion_is_a_clear_image_error():
    with pytest.raises(ImageError, match=r"tiff: not a readable image \(ValueError: conversion from La"):
        decode_image(la_tiff(), "tiff")


def test_scans_are_counted_from_the_markers_without_decoding():
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(buf, format="JPEG")
    assert jpeg_scan_count(buf.getvalue()) == 1  # baseline: one scan
    progressive = many_scan_jpeg(0)
    assert 2 <= jpeg_scan_count(progressive) <= 20
    assert jpeg_scan_count(many_scan_jpeg(5)) == jpeg_scan_count(progressive) + 5
    assert jpeg_scan_count(b"not a jpeg") == 0
    tiny_segments = b"\xff\xd8" + b"\xff\xc4\x00\x02" * (MAX_JPEG_SEGMENTS + 1)  # walking them would cost
    assert jpeg_scan_count(tiny_segments) > MAX_JPEG_SCANS


def test_a_jpeg_of_hundreds_of_scans_is_refused_and_an_ordinary_progressive_one_decodes():
    decode_image(many_scan_jpeg(20), "ok.jpg")  # repeated scans within the limit: still an image
    with pytest.raises(ImageError, match=rf"many.jpg: a JPEG of more than {MAX_JPEG_SCANS} scans"):
        decode_image(many_scan_jpeg(MAX_JPEG_SCANS), "many.jpg")


def test_stray_bytes_or_a_multi_picture_file_do_not_hide_the_scans():
    """Decoders skip stray bytes between segments, and PIL opens a JPEG with a second picture as "MPO": the
    count must see the same scans the decoder will decode."""
    many = many_scan_jpeg(MAX_JPEG_SCANS)
    first_scan = many.find(b"\xff\xda")
    stray = many[:first_scan] + b"\x00\x00" + many[first_scan:]
    assert jpeg_scan_count(stray) > MAX_JPEG_SCANS
    with pytest.raises(ImageError, match="scans"):
        decode_image(stray, "stray.jpg")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(
        buf, format="MPO", save_all=True, append_images=[Image.new("RGB", (8, 8))], progressive=True
    )
    data = buf.getvalue()
    end = data.find(b"\xff\xd9")  # the first picture's end: repeat its last scan before it
    mpo = data[:end] + data[data.rfind(b"\xff\xda", 0, end) : end] * MAX_JPEG_SCANS + data[end:]
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    with pytest.raises(ImageError, match="scans"):
        decode_image(mpo, "multi.jpg")


def test_image_errors_show_no_memory_address():
    with pytest.raises(ImageError) as caught:
        decode_image(b"\x00" * 64, "upload")
    assert "cannot identify image file" in str(caught.value)
    assert not re.search(r"0x[0-9a-f]{6,}", str(caught.value)), caught.value


@pytest.mark.parametrize("container", ["avi", "matroska"])
def test_frames_that_grow_past_the_limit_midway_are_refused(tmp_path, container):
    video = write_mjpeg_video(tmp_path / "grow", [(64, 64)] + [(3200, 3200)] * 3, container)
    assert len(read_frames(video, 4, "video").frames) == 4  # without a limit: decodable, 10 megapixels each
    with pytest.raises(VideoError, match=r"video: a frame could not be decoded \(damaged or over the limit of"):
        read_frames(video, 4, "video", max_pixels=8_300_000)


def test_a_video_codec_ffmpeg_does_not_know_is_a_clear_video_error(tmp_path):
    video = write_mjpeg_video(tmp_path / "unknown.avi", [(64, 64)] * 3, codec_tag=b"ZZZZ")
    with pytest.raises(VideoError, match="video: its video codec is not one this machine can decode"):
        read_frames(video, 2, "video")


def test_reading_a_video_stops_at_its_time_limit(tmp_path):
    video = write_video(tmp_path / "long.mp4", [np.full((64, 64, 3), i % 250, np.uint8) for i in range(60)])
    assert len(read_frames(video, 4, "video", time_limit_s=30).frames) == 4
    with pytest.raises(VideoError, match=r"video: reading the sampled frames took over 1e-06 s"):
        read_frames(video, 4, "video", time_limit_s=1e-6)


def _trickle(chunks: int, pause_s: float):
    """An ASGI receive that sends one byte per call after `pause_s`, `chunks` times."""
    sent = 0

    async def receive():
        nonlocal sent
        await asyncio.sleep(pause_s)
        sent += 1
        return {"type": "http.request", "body": b"x", "more_body": sent < chunks}

    return receive


def test_a_body_that_trickles_in_without_stalling_is_refused_at_the_upload_timeout():
    async def main():
        assert await read_body(_trickle(5, 0.01), 1000, timeout_s=1.0, total_s=5.0) == b"xxxxx"
        with pytest.raises(Refused) as caught:
            await read_body(_trickle(1000, 0.05), 10_000, timeout_s=1.0, total_s=0.3)
        return caught.value

    refused = asyncio.run(main())
    assert refused.status == 408 and "took over 0.3 s" in refused.message


def test_bodies_past_the_upload_limit_get_503_and_the_count_frees_again():
    seen = []

    async def app(scope, receive, send):
        seen.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = RequestGuard(app, routes={}, body_timeout_s=2.0, max_uploads=2)
    scope = {"type": "http", "method": "POST", "path": "/x", "headers": []}

    async def post(pause_s):
        answer = []

        async def send(message):
            answer.append(message)

        await guard(dict(scope), _trickle(3, pause_s), send)
        return answer[0]["status"], dict(answer[0].get("headers", []))

    async def main():
        slow = [asyncio.ensure_future(post(0.1)) for _ in range(2)]
        await asyncio.sleep(0.05)  # both slow bodies are being received
        refused = await post(0.0)
        return refused, await asyncio.gather(*slow), await post(0.0)

    refused, slow, after = asyncio.run(main())
    assert refused[0] == 503 and refused[1].get(b"retry-after") == b"1"
    assert [s[0] for s in slow] == [200, 200] and after[0] == 200 and guard.uploading == 0


def test_a_refused_body_is_drained_for_at_most_the_upload_timeout():
    """A body over its limit is read away so the client sees the 413, but a slow one is not waited for."""
    from dfdetect.http_guard import drain

    async def main():
        loop = asyncio.get_running_loop()
        started = loop.time()
        await drain(_trickle(1000, 0.05), 10_000, timeout_s=1.0, total_s=0.3)
        return loop.time() - started

    assert asyncio.run(main()) < 0.6


def test_a_body_being_drained_counts_towards_the_upload_limit():
    async def app(scope, receive, send):  # never reached: every body here is refused
        raise AssertionError("the guard passed a refused body on")

    guard = RequestGuard(app, routes={}, body_timeout_s=2.0, upload_timeout_s=5.0, max_uploads=1)
    oversized = {"type": "http", "method": "POST", "path": "/x", "headers": [(b"content-length", b"70000")]}
    statuses = []

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def main():
        draining = asyncio.ensure_future(guard(dict(oversized), _trickle(20, 0.05), send))
        await asyncio.sleep(0.2)  # over 64 KiB: refused, and being read away
        busy = guard.uploading
        await guard(dict(oversized), _trickle(3, 0.0), send)
        await draining
        return busy

    assert asyncio.run(main()) == 1
    assert statuses == [503, 413] and guard.uploading == 0


def _post_then_read(port: int, size: int) -> bytes:
    """A plain client: sends a POST's headers, then its whole body in 64 KiB pieces (streaming it from a file,
    say), then reads the answer's status line."""
    import socket
    import time

    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
        time.sleep(0.1)  # the server has the headers (and has answered them) before the body comes
        for start in range(0, size, 65536):
            client.sendall(b"x" * min(65536, size - start))
        return client.recv(4096).split(b"\r\n")[0]


def test_a_client_sending_while_the_uploads_are_full_reads_the_503_not_a_reset(tmp_path):
    """Over real HTTP (uvicorn): with the one upload slot held by a slow client, a client that sends a 1 MB
    body before reading gets the 503, because its body is read away first (closing the connection on unread
    bytes resets it mid-send: BrokenPipeError)."""
    import socket
    import sys
    import time

    import requests

    from dfdetect.servers import Server, _port_open, _spawn, _wait, free_port

    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "guarded_app:app", "--app-dir", str(Path(__file__).parent)]
    proc, log = _spawn("guarded", [*cmd, "--host", "127.0.0.1", "--port", str(port)], tmp_path)
    with _wait(Server("guarded", proc, f"http://127.0.0.1:{port}", log), lambda: _port_open(port), 30) as server:
        with socket.create_connection(("127.0.0.1", port)) as slow:  # holds the slot: 10 of 1000 bytes sent
            slow.sendall(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
            time.sleep(0.5)
            for _ in range(2):
                assert _post_then_read(port, 1_000_000) == b"HTTP/1.1 503 Service Unavailable"
            refused = requests.post(f"{server.url}/x", data=b"x" * 100, timeout=10)
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "1", refused.text
            assert "uploads are being received" in refused.json()["error"]
            slow.sendall(b"x" * 990)
            assert slow.recv(4096).split(b"\r\n")[0] == b"HTTP/1.1 200 OK"
        assert requests.post(f"{server.url}/x", data=b"x" * 100, timeout=10).text == "100"  # the slot is free again


def test_refused_bodies_are_read_away_briefly_and_only_a_few_at_once():
    """Past the upload limit a body is read away for at most REFUSAL_DRAIN_S before the 503, and at most
    max_uploads such refusals drain at once: the rest are answered at once, unread."""
    from dfdetect import http_guard

    async def app(scope, receive, send):  # holds the one slot while its body trickles in
        await read_body(receive, 10_000, 5.0)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    guard = RequestGuard(app, routes={}, body_timeout_s=5.0, max_uploads=1)
    scope = {"type": "http", "method": "POST", "path": "/x", "headers": []}
    answers = []

    def sender(name):
        async def send(message):
            if message["type"] == "http.response.start":
                answers.append((name, message["status"], asyncio.get_running_loop().time()))

        return send

    async def main():
        loop = asyncio.get_running_loop()
        held = asyncio.ensure_future(guard(dict(scope), _trickle(30, 0.1), sender("held")))
        await asyncio.sleep(0.05)
        started = loop.time()
        slow_refusal = asyncio.ensure_future(guard(dict(scope), _trickle(1000, 0.05), sender("drained")))
        await asyncio.sleep(0.05)
        draining = guard.refusing
        await guard(dict(scope), _trickle(1000, 0.05), sender("unread"))  # one refusal drains already
        await asyncio.gather(held, slow_refusal)
        return started, draining

    started, draining = asyncio.run(main())
    times = {name: (status, at - started) for name, status, at in answers}
    assert draining == 1 and guard.refusing == 0 and guard.uploading == 0
    assert times["unread"][0] == 503 and times["unread"][1] < 0.3  # answered at once
    assert times["drained"][0] == 503 and 0.9 <= times["drained"][1] < http_guard.REFUSAL_DRAIN_S + 0.5
    assert times["held"][0] == 200


def test_a_refused_body_is_not_asked_for_when_its_client_waits_for_100_continue_or_it_is_too_large():
    """Reading a body makes the server send `100 Continue`: a client that waits for it before sending reads the
    refusal at once instead, and a body over DRAIN_BYTES would reset its connection anyway."""
    from dfdetect.http_guard import DRAIN_BYTES, worth_draining

    def scope(*headers):
        return {"type": "http", "method": "POST", "path": "/x", "headers": list(headers)}

    assert worth_draining(scope()) and worth_draining(scope((b"content-length", b"1000")))
    assert not worth_draining(scope((b"expect", b"100-Continue"), (b"content-length", b"1000")))
    assert not worth_draining(scope((b"content-length", str(DRAIN_BYTES + 1).encode())))

    async def app(scope, receive, send):  # never reached
        raise AssertionError("passed on")

    async def never_receive():
        raise AssertionError("the refused body was asked for")

    statuses = []

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    guard = RequestGuard(app, routes={}, body_timeout_s=2.0, max_uploads=1)
    guard.uploading = 1  # the one slot is taken
    waiting = scope((b"expect", b"100-continue"), (b"content-length", b"5000"))
    asyncio.run(guard(waiting, never_receive, send))
    guard.uploading = 0
    oversized = scope((b"expect", b"100-continue"), (b"content-length", b"70000"))  # over SMALL_BODY: 413
    asyncio.run(guard(oversized, never_receive, send))
    assert statuses == [503, 413]
