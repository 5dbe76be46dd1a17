"""dfdetect.provenance: C2PA content credentials of uploads, read offline, on JPEGs signed here with a
throwaway certificate chain (tests/c2pa_signing.py)."""

from __future__ import annotations

import io
import json
import socket
import sys
import threading
import time

import numpy as np
import pytest
from c2pa_signing import (
    AI_SOURCE_TYPE,
    CAPTURE_SOURCE_TYPE,
    CLAIM_GENERATOR,
    EDIT_ACTION,
    SIGNER_COMMON_NAME,
    SIGNER_ORGANIZATION,
    sign_image,
    sign_with_remote_manifest,
    signing_identity,
    tamper,
)
from PIL import Image

from dfdetect.provenance import OFFLINE_SETTINGS, check_content_credentials, guess_mime_type

HASH_MISMATCH = "assertion.dataHash.mismatch"


def encode(fmt: str = "JPEG") -> bytes:
    # Noise, so the JPEG has enough scan data for tamper() to change pixels in the middle of it.
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt)
    return out.getvalue()


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    return encode()


@pytest.fixture(scope="module")
def signed(jpeg) -> bytes:
    return sign_image(jpeg)


def test_an_image_without_a_manifest_has_none(jpeg):
    result = check_content_credentials(jpeg, "image/jpeg")
    assert result["checked"] is True and result["present"] is False
    assert result["valid"] is None and result["error"] is None
    assert result["ai_generated"] is False and result["actions"] == []


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_a_file_without_a_manifest_marker_is_answered_without_the_sdk_as_the_sdk_answers(monkeypatch, fmt):
    import c2pa

    data = encode(fmt)
    by_sdk = check_content_credentials(data)
    monkeypatch.setattr(c2pa.Reader, "try_create", lambda *a, **k: pytest.fail("the SDK was asked"))
    assert check_content_credentials(data, decodes=True) == by_sdk
    with pytest.raises(pytest.fail.Exception):  # a marker (here in trailing bytes) sends it to the SDK
        check_content_credentials(data + b"c2pa", decodes=True)


def test_signed_and_remote_manifests_are_read_by_the_sdk_past_the_shortcut(jpeg, signed):
    assert check_content_credentials(signed, decodes=True)["valid"] is True
    remote = check_content_credentials(sign_with_remote_manifest(jpeg, "http://127.0.0.1:9/m.c2pa"), decodes=True)
    assert remote["remote_manifest"] is True


def test_a_signed_image_is_valid_with_its_generator_and_signer(signed):
    result = check_content_credentials(signed, "image/jpeg")
    assert result["present"] is True and result["valid"] is True
    assert result["validation_state"] == "Valid"
    assert result["claim_generator"] == CLAIM_GENERATOR
    assert result["signer"] == {"issuer": SIGNER_ORGANIZATION, "common_name": SIGNER_COMMON_NAME}
    assert result["signed_at"] is None  # no time-stamp authority
    assert result["ai_generated"] is False and result["digital_source_type"] == CAPTURE_SOURCE_TYPE
    assert result["edited"] is False and result["actions"] == ["c2pa.created"]
    assert HASH_MISMATCH not in codes(result)


def test_without_trust_anchors_a_valid_signer_is_not_trusted(signed):
    result = check_content_credentials(signed)
    assert result["valid"] is True and result["trusted"] is False
    assert "signingCredential.untrusted" in codes(result)


def test_a_signer_that_chains_to_a_configured_anchor_is_trusted(signed):
    anchors = signing_identity().root_pem.decode()
    result = check_content_credentials(signed, "image/jpeg", trust_anchors_pem=anchors)
    assert result["validation_state"] == "Trusted"
    assert result["valid"] is True and result["trusted"] is True and result["errors"] == []


def test_an_ai_declaration_is_reported_with_its_source_type(jpeg):
    result = check_content_credentials(sign_image(jpeg, ai_generated=True), "image/jpeg")
    assert result["valid"] is True
    assert result["ai_generated"] is True and result["digital_source_type"] == AI_SOURCE_TYPE


def test_an_edit_is_reported_with_its_actions(jpeg):
    result = check_content_credentials(sign_image(jpeg, edited=True), "image/jpeg")
    assert result["valid"] is True and result["edited"] is True
    assert result["actions"] == ["c2pa.opened", EDIT_ACTION]
    assert result["ai_generated"] is False


def test_an_ai_image_edited_later_is_still_declared_ai_through_its_ingredient(jpeg):
    result = check_content_credentials(sign_image(jpeg, ai_generated=True, edited=True), "image/jpeg")
    assert result["valid"] is True and result["edited"] is True
    assert result["ai_generated"] is True and result["digital_source_type"] == AI_SOURCE_TYPE
    assert result["actions"][:2] == ["c2pa.opened", EDIT_ACTION]  # the active manifest's come first


def test_pixels_changed_after_signing_make_the_manifest_invalid(signed):
    tampered = tamper(signed)
    assert not np.array_equal(decode(tampered), decode(signed))  # the tamper did change pixels
    result = check_content_credentials(tampered, "image/jpeg")
    assert result["present"] is True and result["valid"] is False
    assert result["validation_state"] == "Invalid"
    assert HASH_MISMATCH in codes(result)


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all" * 10, b"\xff\xd8\xff\xe0" + b"\x00" * 64, None, "a string"],
    ids=["empty", "garbage", "jpeg-header-only", "none", "str"],
)
def test_garbage_gives_an_answer_not_an_exception(data):
    result = check_content_credentials(data)
    assert result["checked"] is True and result["present"] is False and result["valid"] is None
    assert isinstance(result["error"], str) and result["error"]


def test_a_truncated_signed_image_gives_an_answer(signed):
    result = check_content_credentials(signed[: len(signed) // 2], "image/jpeg")
    assert result["present"] is False and result["error"]


def test_signed_and_tampered_images_still_decode_for_the_detector(jpeg, signed):
    assert np.array_equal(decode(signed), decode(jpeg))  # the manifest sits beside the pixels
    for variant in (sign_image(jpeg, ai_generated=True), sign_image(jpeg, edited=True)):
        assert np.array_equal(decode(variant), decode(jpeg))
    assert decode(tamper(signed)).shape == decode(jpeg).shape


def test_the_result_is_json_ready(signed):
    for data in (signed, tamper(signed), b"garbage"):
        result = check_content_credentials(data)
        assert json.loads(json.dumps(result)) == result


@pytest.mark.parametrize("fmt, mime", [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")])
def test_the_type_is_guessed_from_the_bytes(fmt, mime):
    assert guess_mime_type(encode(fmt)) == mime
    assert check_content_credentials(encode(fmt)) == check_content_credentials(encode(fmt), mime)


def test_unknown_bytes_have_no_guessed_type():
    assert guess_mime_type(b"BM\x00\x00") is None and guess_mime_type(b"") is None


def test_the_type_is_guessed_when_not_given(signed):
    assert check_content_credentials(signed)["valid"] is True


def test_a_remote_manifest_is_reported_but_never_fetched(jpeg):
    import c2pa

    with listener() as (url, connections):
        data = sign_with_remote_manifest(jpeg, url)
        result = check_content_credentials(data, "image/jpeg")
        assert connections == []
        # The control: with the SDK's default settings the same read would fetch, so the test can fail.
        with pytest.raises(c2pa.C2paError), c2pa.Reader("image/jpeg", io.BytesIO(data), context=c2pa.Context()):
            pass
        assert wait_for(connections)
    assert result["present"] is False and result["remote_manifest"] is True
    assert url in result["error"]


@pytest.mark.parametrize("section", ["verify", "core"])
def test_each_offline_setting_alone_stops_the_fetch(jpeg, section):
    # The SDK ignores unknown keys silently: this shows both spellings are real in the installed version.
    import c2pa

    with listener() as (url, connections):
        data = sign_with_remote_manifest(jpeg, url)
        context = c2pa.Context.from_dict({section: OFFLINE_SETTINGS[section]})
        with pytest.raises(c2pa.C2paError), c2pa.Reader("image/jpeg", io.BytesIO(data), context=context):
            pass
        assert connections == []


def test_without_the_sdk_the_check_says_so(monkeypatch, signed):
    monkeypatch.setitem(sys.modules, "c2pa", None)  # makes `import c2pa` raise ImportError
    result = check_content_credentials(signed)
    assert result["checked"] is False and result["present"] is False
    assert result["error"] == "c2pa-python is not installed"


def codes(result: dict) -> list[str]:
    return [error["code"] for error in result["errors"]]


class listener:
    """A TCP socket on 127.0.0.1 that records each connection's first bytes: an HTTP request, if any came."""

    def __enter__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.connections: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()
        return f"http://127.0.0.1:{self.server.getsockname()[1]}/manifest.c2pa", self.connections

    def _accept(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:  # closed by __exit__
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.connections.append(conn.recv(4096))
                except OSError:
                    self.connections.append(b"")

    def __exit__(self, *exc):
        self.server.close()


def wait_for(items: list, timeout: float = 5.0) -> bool:
    """Whether the list gets an item within the timeout (the listener appends from its own thread)."""
    deadline = time.monotonic() + timeout
    while not items and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(items)
