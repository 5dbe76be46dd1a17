"""Image decoding and preprocessing shared by prepare, training, evaluation and serving.

Training reads images that `prepare` resized with `resize_square`; serving calls the same function on
uploads, so the two can never disagree.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from .config import IMAGENET_MEAN, IMAGENET_STD

INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}

# A decompression bomb (huge declared dimensions) is refused before decoding; so is a sliver (a 30000 x 1 PNG
# is 172 bytes, but resizing its short side to the model's size makes a 6.7-megapixel-per-row strip).
MAX_PIXELS = 64_000_000
MAX_SIDE = 16_384
MAX_ASPECT_RATIO = 20.0
# Each scan of a progressive JPEG is a pass over the whole image: a small file that repeats one scan hundreds of
# times costs seconds to decode per request. Encoders write about 10 (mozjpeg and jpegtran at most a few dozen).
MAX_JPEG_SCANS = 100
MAX_JPEG_SEGMENTS = 10_000  # markers with a length; a photo has a few dozen
_MARKER = re.compile(rb"\xff([^\x00\xff])")  # a marker, past fill bytes (0xFF runs) and stray bytes
_ENTROPY_END = re.compile(rb"\xff(?=[^\x00\xd0-\xd7\xff])")  # not a stuffed 0xFF00, restart or fill byte
_OBJECT_ADDRESS = re.compile(r" ?<[^<>]* at 0x[0-9a-fA-F]+>")  # PIL names its BytesIO: no heap address to clients


class ImageError(ValueError):
    """An image that cannot be used: not an image, truncated, too large."""


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # How an image becomes image_size x image_size (resize_square reads these): the shorter side resized with
    # this PIL filter (PIL's filters widen their support when shrinking, so downscaling is antialiased), then
    # the centre cropped.
    interpolation: str = "bilinear"
    crop: str = "center"
    face_margin: float | None = None  # how training faces were framed (face box x margin); None: not recorded
    colour: str = "rgb"  # grey: luma in all three channels, before mean and std (model.colour)

    def __post_init__(self):
        if self.colour not in ("rgb", "grey"):
            raise ValueError(f"preprocess.colour: {self.colour!r} is not one of ['grey', 'rgb']")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"preprocess.interpolation: {self.interpolation!r} is not one of {sorted(INTERPOLATIONS)}")
        if self.crop != "center":
            raise ValueError(f"preprocess.crop: {self.crop!r} is not supported (only 'center')")

    def square(self, img: Image.Image) -> np.ndarray:
        """The model's input image: image_size x image_size x 3 uint8, made as training made its images."""
        return resize_square(img, self.image_size, self.interpolation)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        return cls(
            image_size=int(d["image_size"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
            # before these were fields, configs said "shorter-side bilinear antialias + center crop" in prose
            interpolation=str(d.get("interpolation", "bilinear")),
            crop=str(d.get("crop", "center")),
            face_margin=float(d["face_margin"]) if d.get("face_margin") is not None else None,
            colour=str(d.get("colour", "rgb")),  # models from before the field saw colour
        )


def check_dimensions(
    w: int,
    h: int,
    name: str,
    max_pixels: int = MAX_PIXELS,
    max_side: int = MAX_SIDE,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
) -> None:
    """Refuse sizes that would cost far more to decode or resize than any face image needs."""
    if w < 1 or h < 1:
        raise ImageError(f"{name}: {w}x{h} has no pixels")
    if w * h > max_pixels:
        raise ImageError(f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    if max(w, h) > max_side:
        raise ImageError(f"{name}: {w}x{h} exceeds the limit of {max_side} pixels per side")
    if max(w, h) / min(w, h) > max_aspect_ratio:
        raise ImageError(f"{name}: {w}x{h} exceeds the limit of {max_aspect_ratio:g}:1 on the aspect ratio")


def decode_image(
    data: bytes,
    name: str = "image",
    max_pixels: int = MAX_PIXELS,
    max_side: int = MAX_SIDE,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
) -> Image.Image:
    """Decode fully (so truncation is caught here, not later), turn it upright as its EXIF orientation says
    (a phone photo is stored sideways with a tag; training and serving both read it through here), and convert
    to RGB. Sizes are checked from the header, before any pixel is decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            check_dimensions(*img.size, name, max_pixels, max_side, max_aspect_ratio)
            if jpeg_scan_count(data, MAX_JPEG_SCANS) > MAX_JPEG_SCANS:  # any JPEG stream: also MPO and others
                raise ImageError(
                    f"{name}: a JPEG of more than {MAX_JPEG_SCANS} scans or {MAX_JPEG_SEGMENTS} segments is "
                    "refused (encoders write about 10 scans): each scan is another pass over the whole image"
                )
            img.load()
            # inside the try: some modes a file may declare (TIFF's "La") have no conversion to RGB
            return ImageOps.exif_transpose(img).convert("RGB")
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"{name}: refused as a decompression bomb ({exc})") from None
        except Exception as exc:  # PIL raises several types for bad data
            reason = _OBJECT_ADDRESS.sub("", str(exc))
            raise ImageError(f"{name}: not a readable image ({type(exc).__name__}: {reason})") from None


def jpeg_scan_count(data: bytes, stop_after: int = MAX_JPEG_SCANS) -> int:
    """The number of scans (SOS segments) in a JPEG's first image, found by walking its markers without
    decoding; counting stops once past `stop_after`. Stray bytes between segments are skipped, as decoders
    skip them. A stream of more than MAX_JPEG_SEGMENTS segments counts as `stop_after + 1`: walking it would
    itself cost, and no encoder writes one. The searches run in C (re), never byte by byte in Python."""
    if not data.startswith(b"\xff\xd8"):
        return 0
    pos, scans, segments = 2, 0, 0
    while (found := _MARKER.search(data, pos)) is not None:
        marker, pos = found.group(1)[0], found.end()
        if marker == 0xD9:  # end of image
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            continue
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            return stop_after + 1
        pos += int.from_bytes(data[pos : pos + 2], "big")
        if marker == 0xDA:  # start of scan: its entropy-coded data runs to the next real marker
            scans += 1
            if scans > stop_after:
                break
            end = _ENTROPY_END.search(data, pos)
            pos = end.start() if end is not None else len(data)
    return scans


def resize_square(img: Image.Image, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """Resize the shorter side to `size` and center-crop: an HxWx3 uint8 array."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), INTERPOLATIONS[interpolation], reducing_gap=None)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale


def luma(batch: torch.Tensor) -> torch.Tensor:
    """float N x 3 x H x W -> N x H x W grey (the weights above)."""
    return (batch * torch.tensor(LUMA, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)).sum(1)


def standardize(batch01: torch.Tensor, cfg: PreprocessConfig, inplace: bool = False) -> torch.Tensor:
    """float NCHW in [0, 1] -> normalised with the stored mean and std (a grey model's: luma first)."""
    if cfg.colour == "grey":
        batch01, inplace = luma(batch01).unsqueeze(1).expand_as(batch01), False
    mean = torch.tensor(cfg.mean, device=batch01.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=batch01.device).view(1, 3, 1, 1)
    if inplace:
        return batch01.sub_(mean).div_(std)
    return (batch01 - mean) / std


def normalize(batch_uint8: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """uint8 NCHW -> float NCHW normalised with the stored mean and std, at the model's size (images cached
    larger than a model takes, model.image_size, are downscaled here)."""
    return standardize(to_size(batch_uint8.float() / 255.0, cfg.image_size), cfg)


def to_size(batch: torch.Tensor, size: int) -> torch.Tensor:
    """A float NCHW batch at size x size: unchanged when it is, else resized (antialiased, like PIL's filters)."""
    if batch.shape[-1] == size and batch.shape[-2] == size:
        return batch
    return torch.nn.functional.interpolate(
        batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )


def to_model_input(images: list[Image.Image] | list[np.ndarray], cfg: PreprocessConfig) -> torch.Tensor:
    """PIL images (or already-resized arrays) -> a normalised float batch for the model."""
    arrays = [im if isinstance(im, np.ndarray) else cfg.square(im) for im in images]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return normalize(batch, cfg)
