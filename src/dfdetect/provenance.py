"""An uploaded image's C2PA content credentials, checked offline: is a manifest embedded, do its signature and
the hash of the content still verify, does it chain to a trusted signer, and does it declare AI generation or
edits. A signed declaration of AI generation is evidence the detector cannot give; a valid manifest says
nothing about images without one.

Nothing here touches the network: remote manifests, OCSP and every other HTTP request of the SDK are switched
off in the settings of each read. `c2pa` (c2pa-python) is imported only when an image is checked, so the
library and the service start without it.
"""

from __future__ import annotations

import io
import json

# IPTC digital source types that declare generative AI (http://cv.iptc.org/newscodes/digitalsourcetype/...).
AI_SOURCE_TYPES = frozenset({"trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia"})

# Actions the C2PA spec counts as non-editorial: the content itself was not changed.
NON_EDITING_ACTIONS = frozenset(
    {"c2pa.created", "c2pa.opened", "c2pa.published", "c2pa.repackaged", "c2pa.transcoded", "c2pa.watermarked"}
)

# An embedded manifest store is a JUMBF box labelled "c2pa" in every container the SDK reads (JPEG APP11, PNG
# caBX, RIFF, ISO BMFF), and a remote one is referenced by XMP's dcterms:provenance. An image that decodes and
# holds neither has nothing to read: answered without starting the SDK (a read costs about as much CPU as the
# rest of a served request).
MANIFEST_MARKERS = (b"c2pa", b"provenance")

# Settings of every read: no remote manifest, no OCSP, and an empty allow-list of hosts, which makes the SDK
# refuse any other HTTP request it might make (a null list would allow all hosts).
OFFLINE_SETTINGS = {
    "verify": {"remote_manifest_fetch": False, "ocsp_fetch": False},
    "core": {"allowed_network_hosts": []},
}

# (offset, magic bytes, MIME type): enough to tell the SDK which container to parse.
_MAGIC = (
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (8, b"WEBP", "image/webp"),
    (0, b"GIF8", "image/gif"),
    (0, b"II*\x00", "image/tiff"),
    (0, b"MM\x00*", "image/tiff"),
    (8, b"avif", "image/avif"),
    (8, b"heic", "image/heic"),
)


def guess_mime_type(data: bytes) -> str | None:
    """The image type from its first bytes, or None (the SDK then detects it itself)."""
    head = bytes(data[:16])
    for offset, magic, mime in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return mime
    return None


def _result(**fields) -> dict:
    """Every key, always, so the service's response schema does not depend on the case."""
    base = {
        "checked": True,
        "present": False,
        "valid": None,
        "validation_state": None,
        "trusted": False,
        "errors": [],
        "claim_generator": None,
        "signer": None,
        "signed_at": None,
        "ai_generated": False,
        "digital_source_type": None,
        "edited": False,
        "actions": [],
        "remote_manifest": False,
        "error": None,
    }
    return {**base, **fields}


def check_content_credentials(
    data: bytes, mime_type: str | None = None, *, trust_anchors_pem: str | None = None, decodes: bool = False
) -> dict:
    """The C2PA content credentials of one image as a JSON-ready dict (keys in `_result`). Never raises for bad
    input: an unreadable file comes back with `error` set and `present` False.

    `valid` follows the SDK's validation_state (Valid or Trusted: signature and content hash verify); `errors`
    lists every failed status, so a valid manifest from an untrusted signer still lists
    signingCredential.untrusted there.

    `trust_anchors_pem`: PEM root certificates; `trusted` is True only when the signer chains to one of them
    (none by default, so by default nothing is trusted, however valid).

    `decodes`: the caller has decoded `data` as an image (the service has); then a file without a manifest
    marker is answered as the SDK answers it, without the SDK. A broken file still goes to the SDK, which names
    what is wrong."""
    try:
        import c2pa
    except ImportError:
        return _result(checked=False, error="c2pa-python is not installed")
    if decodes and MANIFEST_MARKERS[0] not in data and MANIFEST_MARKERS[1] not in data:
        return _result()
    try:
        context = _offline_context(c2pa, trust_anchors_pem)
    except Exception as e:  # a bad trust anchor is a configuration error; the image was never looked at
        return _result(checked=False, error=f"invalid C2PA settings: {e}")
    with context:
        try:
            store = _read_store(c2pa, data, mime_type or guess_mime_type(data), context)
        except Exception as e:  # any upload, however broken, gets an answer rather than a 500
            return _unreadable(e)
    if store is None:
        return _result()
    try:
        return _summarise(store)
    except Exception as e:  # a manifest of a shape the SDK let through but nothing here expects
        return _result(present=True, valid=False, error=f"unexpected manifest content: {e!r}")


def _offline_context(c2pa, trust_anchors_pem: str | None):
    """A fresh SDK context with the network off. Built per call: it costs well under a millisecond, and a
    cached one would be refused in a forked worker (the SDK ties each context to the process that made it)."""
    settings = dict(OFFLINE_SETTINGS)
    if trust_anchors_pem:
        settings["trust"] = {"trust_anchors": trust_anchors_pem}
    with c2pa.Settings.from_dict(settings) as built:
        return c2pa.Context(settings=built)


def _read_store(c2pa, data: bytes, mime_type: str | None, context) -> dict | None:
    """The manifest store as the SDK reports it (with its validation), or None when there is no manifest."""
    reader = c2pa.Reader.try_create(mime_type, io.BytesIO(data), context=context)
    if reader is None:
        return None
    with reader:
        return json.loads(reader.json())


def _unreadable(error: Exception) -> dict:
    """No manifest could be read. A manifest kept at a remote URL is reported, but never fetched."""
    message = str(error) or type(error).__name__
    return _result(error=message, remote_manifest=message.startswith("Remote"))


def _summarise(store: dict) -> dict:
    """The fields of the result from the manifest store: validation of the active manifest, and what the
    active manifest and the manifests of its ingredients declare."""
    manifests = _manifests_in_order(store)
    active = manifests[0] if manifests else {}
    state = store.get("validation_state")
    source_type = _digital_source_type(manifests)
    actions = _action_names(manifests)
    signature = active.get("signature_info") or {}
    return _result(
        present=True,
        valid=state in ("Valid", "Trusted"),
        validation_state=state,
        trusted=state == "Trusted",
        errors=_failures(store),
        claim_generator=_claim_generator(active),
        signer={"issuer": signature.get("issuer"), "common_name": signature.get("common_name")},
        signed_at=signature.get("time"),
        ai_generated=_is_ai(source_type),
        digital_source_type=source_type,
        edited=any(name not in NON_EDITING_ACTIONS for name in actions),
        actions=actions,
    )


def _manifests_in_order(store: dict) -> list[dict]:
    """The active manifest first, then the others in the store (those of ingredients: an AI image that was
    edited later still carries the generator's declaration there)."""
    manifests = store.get("manifests") or {}
    label = store.get("active_manifest")
    first = [manifests[label]] if label in manifests else []
    return first + [m for key, m in manifests.items() if key != label]


def _failures(store: dict) -> list[dict]:
    """The SDK's failed validation codes: of the active manifest and of its ingredients."""
    results = store.get("validation_results")
    if not isinstance(results, dict):  # older SDKs only have the flat list
        statuses = store.get("validation_status") or []
    else:
        statuses = list((results.get("activeManifest") or {}).get("failure") or [])
        for delta in results.get("ingredientDeltas") or []:
            statuses += (delta.get("validationDeltas") or {}).get("failure") or []
    errors = []
    for status in statuses:
        entry = {"code": status.get("code"), "explanation": status.get("explanation")}
        if entry not in errors:
            errors.append(entry)
    return errors


def _claim_generator(manifest: dict) -> str | None:
    """The claim generator: v1 claims have a string; v2 claims a list of {name, version}, shown name/version."""
    if manifest.get("claim_generator"):
        return manifest["claim_generator"]
    infos = manifest.get("claim_generator_info") or []
    if not infos or not isinstance(infos[0], dict) or not infos[0].get("name"):
        return None
    name, version = infos[0]["name"], infos[0].get("version")
    return f"{name}/{version}" if version else name


def _action_names(manifests: list[dict]) -> list[str]:
    """The action names of every manifest, once each, the active manifest's first."""
    names = []
    for manifest in manifests:
        for assertion in _action_assertions(manifest):
            for action in assertion.get("actions") or []:
                name = action.get("action") if isinstance(action, dict) else None
                if name and name not in names:
                    names.append(name)
    return names


def _action_assertions(manifest: dict) -> list[dict]:
    """The data of c2pa.actions, c2pa.actions.v2 and repeated instances (c2pa.actions__1)."""
    found = []
    for assertion in manifest.get("assertions") or []:
        label = str(assertion.get("label", ""))
        if label == "c2pa.actions" or label.startswith(("c2pa.actions.", "c2pa.actions__")):
            if isinstance(assertion.get("data"), dict):
                found.append(assertion["data"])
    return found


def _digital_source_type(manifests: list[dict]) -> str | None:
    """The declared digital source type: an AI one wherever it is declared, else the first one found. It is
    looked for in every assertion (actions, their templates and parameters, IPTC photo metadata)."""
    declared = [value for manifest in manifests for value in _source_types(manifest.get("assertions") or [])]
    return next((v for v in declared if _is_ai(v)), declared[0] if declared else None)


def _source_types(node) -> list[str]:
    """Every string under a key named digitalSourceType (any prefix or case, e.g. Iptc4xmpExt:DigitalSourceType)."""
    if isinstance(node, list):
        return [value for item in node for value in _source_types(item)]
    if not isinstance(node, dict):
        return []
    found = []
    for key, value in node.items():
        if str(key).lower().endswith("digitalsourcetype") and isinstance(value, str):
            found.append(value)
        else:
            found += _source_types(value)
    return found


def _is_ai(source_type: str | None) -> bool:
    """Whether an IPTC digital source type (URI or bare term) declares generative AI."""
    return bool(source_type) and source_type.rstrip("/").rsplit("/", 1)[-1] in AI_SOURCE_TYPES
