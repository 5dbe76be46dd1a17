"""A small, deterministic synthetic face-swap data set, so the pipeline runs with no download.

"real": a procedurally drawn face with camera-like grain, then JPEG.
"fake": the same kind of face whose inner region (eyes, nose, mouth) was replaced by another drawn
face the way a face swap does it: rendered at 15-30 % of the resolution and upsampled
(resampling), with a colour mismatch, pasted through a feathered mask (a blending boundary), then the same
grain and JPEG. The traces are coarse enough that a model seeing the faces at half size still finds them.
Both classes come from one face generator, so only the swap traces tell them apart.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SKIN = [(255, 219, 172), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (92, 58, 32)]
HAIR = [(20, 20, 20), (60, 40, 25), (120, 80, 40), (200, 170, 100), (140, 140, 140), (90, 30, 20)]
IRIS = [(60, 90, 140), (70, 50, 30), (60, 110, 70), (40, 40, 40)]


@dataclass(frozen=True)
class FaceSpec:
    skin: tuple
    hair: tuple
    iris: tuple
    background: tuple
    cx: float
    cy: float
    rx: float
    ry: float
    eye_dy: float
    eye_dx: float
    mouth_w: float
    light: float


def _jitter(rng, color, amount=18):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)


def random_face(rng: np.random.Generator) -> FaceSpec:
    return FaceSpec(
        skin=_jitter(rng, SKIN[rng.integers(len(SKIN))]),
        hair=_jitter(rng, HAIR[rng.integers(len(HAIR))]),
        iris=IRIS[rng.integers(len(IRIS))],
        background=tuple(int(x) for x in rng.integers(30, 230, 3)),
        cx=0.5 + rng.uniform(-0.04, 0.04),
        cy=0.52 + rng.uniform(-0.04, 0.04),
        rx=rng.uniform(0.30, 0.36),
        ry=rng.uniform(0.38, 0.45),
        eye_dy=rng.uniform(-0.10, -0.05),
        eye_dx=rng.uniform(0.12, 0.16),
        mouth_w=rng.uniform(0.10, 0.16),
        light=rng.uniform(-0.25, 0.25),
    )


def render_face(spec: FaceSpec, size: int) -> np.ndarray:
    """Draw a face at `size` px: float32 HxWx3 in [0, 255], no grain yet."""
    s = size
    img = Image.new("RGB", (s, s), spec.background)
    d = ImageDraw.Draw(img)
    cx, cy, rx, ry = spec.cx * s, spec.cy * s, spec.rx * s, spec.ry * s
    d.ellipse([cx - rx * 1.08, cy - ry * 1.12, cx + rx * 1.08, cy + ry * 0.6], fill=spec.hair)  # hair
    d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=spec.skin)  # head
    ey, ex = cy + spec.eye_dy * s, spec.eye_dx * s
    er = 0.045 * s
    for side in (-1, 1):
        x = cx + side * ex
        d.line([x - er * 1.3, ey - er * 2.0, x + er * 1.3, ey - er * 2.2], fill=spec.hair, width=max(1, s // 40))
        d.ellipse([x - er * 1.4, ey - er * 0.8, x + er * 1.4, ey + er * 0.8], fill=(245, 245, 245))
        d.ellipse([x - er * 0.7, ey - er * 0.7, x + er * 0.7, ey + er * 0.7], fill=spec.iris)
        d.ellipse([x - er * 0.3, ey - er * 0.3, x + er * 0.3, ey + er * 0.3], fill=(10, 10, 10))
    shade = tuple(int(c * 0.8) for c in spec.skin)
    d.polygon([(cx, ey + er), (cx - 0.035 * s, cy + 0.1 * s), (cx + 0.02 * s, cy + 0.1 * s)], fill=shade)
    my, mw = cy + 0.22 * s, spec.mouth_w * s
    d.chord([cx - mw, my - 0.04 * s, cx + mw, my + 0.05 * s], 0, 180, fill=(150, 50, 60))
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(s / 256)), dtype=np.float32)
    # Side lighting: a horizontal brightness gradient.
    ramp = 1.0 + spec.light * np.linspace(-1, 1, s, dtype=np.float32)[None, :, None]
    return np.clip(arr * ramp, 0, 255)


def _inner_face_mask(spec: FaceSpec, size: int, feather: float) -> np.ndarray:
    s = size
    m = Image.new("L", (s, s), 0)
    cx, cy = spec.cx * s, spec.cy * s
    d = ImageDraw.Draw(m)
    d.ellipse(
        [cx - spec.rx * s * 0.78, cy - spec.ry * s * 0.55, cx + spec.rx * s * 0.78, cy + spec.ry * s * 0.75], fill=255
    )
    m = m.filter(ImageFilter.GaussianBlur(feather * s))
    return np.asarray(m, dtype=np.float32)[..., None] / 255.0


def swap_face(target: FaceSpec, source: FaceSpec, size: int, rng: np.random.Generator) -> np.ndarray:
    """Paste the source face's inner region into the target, leaving face-swap traces."""
    base = render_face(target, size)
    # The swapped face keeps the target's geometry (the swap aligns it) but the source's identity.
    # Swaps pair similar skin tones, so the donor's skin is near the target's.
    donor_spec = FaceSpec(
        **{
            **source.__dict__,
            "cx": target.cx,
            "cy": target.cy,
            "rx": target.rx,
            "ry": target.ry,
            "skin": _jitter(rng, target.skin, 10),
            "background": target.background,
            "light": target.light,
        }
    )
    # Generator output at 15-30 % of the frame's resolution: below what a half-size view keeps, so the swap's
    # softness survives a model that sees faces at 64 px (model.image_size: 64).
    low = max(12, int(size * rng.uniform(0.15, 0.3)))
    donor = render_face(donor_spec, low)
    donor = np.asarray(Image.fromarray(donor.astype(np.uint8)).resize((size, size), Image.BILINEAR), np.float32)
    # Colour mismatch of 6-12 % per channel, either way: never so small that no trace is left
    gain = 1 + rng.choice([-1.0, 1.0], size=3) * rng.uniform(0.06, 0.12, size=3)
    donor = donor * gain.astype(np.float32)
    mask = _inner_face_mask(target, size, feather=rng.uniform(0.01, 0.03))
    return base * (1 - mask) + donor * mask


def finish(arr: np.ndarray, rng: np.random.Generator, quality: int) -> bytes:
    """Camera grain and JPEG, the same for both classes."""
    arr = arr + rng.normal(0, 6.0, arr.shape).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_image(label: str, index: int, seed: int, size: int) -> bytes:
    rng = np.random.default_rng([seed, index, 0 if label == "real" else 1])
    target = random_face(rng)
    if label == "real":
        arr = render_face(target, size)
    else:
        arr = swap_face(target, random_face(rng), size, rng)
    return finish(arr, rng, quality=int(rng.integers(80, 96)))


def generate(out_dir: str | Path, per_class: dict[str, int], size: int = 128, seed: int = 42) -> dict:
    """Write out_dir/{split}/{real,fake}/*.jpg deterministically; returns the counts written."""
    out_dir = Path(out_dir)
    counts, index = {}, 0
    for split, n in per_class.items():
        for label in ("real", "fake"):
            folder = out_dir / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                path = folder / f"{label}_{split}_{i:05d}.jpg"
                tmp = path.with_suffix(".jpg.tmp")
                tmp.write_bytes(make_image(label, index, seed, size))
                os.replace(tmp, path)
                index += 1
            counts[f"{split}/{label}"] = n
    return counts
