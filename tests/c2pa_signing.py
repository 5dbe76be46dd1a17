"""Signed JPEGs for the tests of dfdetect.provenance: a throwaway certificate chain made with `cryptography`,
images signed with it by the C2PA SDK (ES256, no time-stamp authority, nothing fetched), and a tamper that
changes pixels after signing.

What the SDK (c2pa-python 0.38, c2pa-rs 0.91) demands of the signing certificate, found by trying: v3, not
self-signed, not a CA, keyUsage with digitalSignature, an authorityKeyIdentifier, and an EKU it accepts
(emailProtection passes; serverAuth, clientAuth, anyExtendedKeyUsage or none fail, and documentSigning passes
the signer but fails the SDK's own check after signing). A basicConstraints extension is optional.
"""

from __future__ import annotations

import datetime
import functools
import io
import struct
from dataclasses import dataclass

import c2pa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLAIM_GENERATOR = "dfdetect-tests/1.0"
SIGNER_ORGANIZATION = "dfdetect test signer"
SIGNER_COMMON_NAME = "dfdetect test signing key"
IPTC = "http://cv.iptc.org/newscodes/digitalsourcetype/"
AI_SOURCE_TYPE = IPTC + "trainedAlgorithmicMedia"
CAPTURE_SOURCE_TYPE = IPTC + "digitalCapture"
EDIT_ACTION = "c2pa.color_adjustments"

# Small and offline: no thumbnail in the manifest, no HTTP of any kind while signing.
SIGNING_SETTINGS = {"builder": {"thumbnail": {"enabled": False}}, "core": {"allowed_network_hosts": []}}


@dataclass(frozen=True)
class SigningIdentity:
    root_pem: bytes  # the trust anchor, for tests of `trusted`
    chain_pem: bytes  # signer certificate, then the root
    key_pem: bytes  # the signer's private key, PKCS#8


@functools.cache
def signing_identity() -> SigningIdentity:
    """An ECDSA P-256 root and a signer certificate it issued; made once per process (key generation is the
    slow part)."""
    root_key, signer_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root_name = _name("dfdetect test root", "dfdetect test CA")
    root = (
        _certificate_builder(root_name, root_name, root_key.public_key(), days=365)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signing=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    signer = (
        _certificate_builder(
            _name(SIGNER_COMMON_NAME, SIGNER_ORGANIZATION), root_name, signer_key.public_key(), days=30
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signing=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(signer_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key = signer_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return SigningIdentity(root.public_bytes(pem), signer.public_bytes(pem) + root.public_bytes(pem), key)


def _name(common_name: str, organization: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
        ]
    )


def _certificate_builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    # Valid from yesterday: a clock a little behind must not make the certificate "not yet valid".
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _key_usage(signing: bool) -> x509.KeyUsage:
    """digitalSignature for the signer; keyCertSign and cRLSign for the CA."""
    return x509.KeyUsage(
        digital_signature=signing,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=not signing,
        crl_sign=not signing,
        encipher_only=False,
        decipher_only=False,
    )


def sign_image(
    jpeg_bytes: bytes, *, ai_generated: bool = False, edited: bool = False, claim_generator: str = CLAIM_GENERATOR
) -> bytes:
    """The JPEG with an embedded, signed C2PA manifest. `ai_generated` declares a c2pa.created action with the
    IPTC source type trainedAlgorithmicMedia (else digitalCapture). `edited` signs an edit instead: c2pa.opened
    of the image as parent ingredient, then c2pa.color_adjustments; with `ai_generated` too, the parent is first
    signed as AI-generated, so the declaration is only in the ingredient's manifest."""
    if edited:
        parent = jpeg_bytes
        if ai_generated:
            parent = sign_image(jpeg_bytes, ai_generated=True, claim_generator=claim_generator)
        return _sign(parent, _manifest(claim_generator), edit_of=parent)
    source_type = AI_SOURCE_TYPE if ai_generated else CAPTURE_SOURCE_TYPE
    created = {"action": "c2pa.created", "digitalSourceType": source_type}
    manifest = _manifest(claim_generator, [{"label": "c2pa.actions", "data": {"actions": [created]}}])
    return _sign(jpeg_bytes, manifest)


def sign_with_remote_manifest(jpeg_bytes: bytes, url: str) -> bytes:
    """The JPEG with no embedded manifest, only a reference (in XMP) to one at `url`."""
    created = {"action": "c2pa.created", "digitalSourceType": CAPTURE_SOURCE_TYPE}
    manifest = _manifest(CLAIM_GENERATOR, [{"label": "c2pa.actions", "data": {"actions": [created]}}])
    return _sign(jpeg_bytes, manifest, remote_url=url)


def _manifest(claim_generator: str, assertions: list | None = None) -> dict:
    name, _, version = claim_generator.partition("/")
    info = {"name": name, **({"version": version} if version else {})}
    return {
        "claim_generator_info": [info],
        "title": "upload.jpg",
        "format": "image/jpeg",
        "assertions": assertions or [],
    }


def _sign(source: bytes, manifest: dict, edit_of: bytes | None = None, remote_url: str | None = None) -> bytes:
    identity = signing_identity()
    info = c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, identity.chain_pem, identity.key_pem, None)
    with c2pa.Context.from_dict(SIGNING_SETTINGS) as context, c2pa.Builder(manifest, context) as builder:
        if edit_of is not None:
            builder.set_intent(c2pa.C2paBuilderIntent.EDIT)  # the SDK adds c2pa.opened of the parent
            builder.add_ingredient(
                {"title": "parent.jpg", "relationship": "parentOf"}, "image/jpeg", io.BytesIO(edit_of)
            )
            builder.add_action({"action": EDIT_ACTION})
        if remote_url is not None:
            builder.set_no_embed()
            builder.set_remote_url(remote_url)
        signed = io.BytesIO()
        with c2pa.Signer.from_info(info) as signer:
            builder.sign(signer, "image/jpeg", io.BytesIO(source), signed)
        return signed.getvalue()


def tamper(signed_jpeg: bytes) -> bytes:
    """The signed JPEG with one bit of its entropy-coded pixel data flipped, halfway through the scan: the data
    hash no longer matches, the manifest is untouched, and the file still decodes (from that block on, to other
    pixels). Needs a baseline JPEG with some scan data, e.g. a noisy image."""
    data = bytearray(signed_jpeg)
    start, end = _scan_data(data)
    i = (start + end) // 2
    # Skip 0xFF bytes and the stuffed 0x00 after them: changing those would make or break a marker.
    while i < end and (data[i] == 0xFF or data[i - 1] == 0xFF or data[i] ^ 0x10 == 0xFF):
        i += 1
    if i >= end:
        raise ValueError("no pixel byte to tamper with")
    data[i] ^= 0x10
    return bytes(data)


def _scan_data(data: bytes | bytearray) -> tuple[int, int]:
    """Start and end of the entropy-coded data after the first SOS marker (the manifest segments come before)."""
    i = 2  # after SOI
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker == 0xDA:
            return i + 2 + length, len(data) - 2  # up to the EOI marker
        i += 2 + length
    raise ValueError("not a JPEG with a scan")
