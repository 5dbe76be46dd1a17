"""Discovering a data set in the layout data/{train,val,test}/{real,fake}/* and reading the prepared cache."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .labels import CLASS_NAMES, label_of
from .preprocessing import PreprocessConfig
from .video import VIDEO_EXTENSIONS

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}
SPLITS = ("train", "val", "test")
REQUIRED_SPLITS = ("train", "val")


class DatasetError(ValueError):
    """The data set does not follow the expected layout."""


@dataclass(frozen=True)
class ImageFile:
    path: Path  # absolute
    relpath: str  # relative to the data root (face crops: to the prepared folder), as stored in the manifest
    split: str
    class_name: str
    video: str = ""  # the source video (frames of one video stay in one split); "" = the image alone
    frame: int = -1  # frame number in that video
    identity: str = ""  # the person, when the file names say (prepare.group_pattern)
    source: str = ""  # for face crops: the data file they were cut from
    dataset: str = ""  # the mixture source it belongs to (prepare.name or a prepare.sources name)

    @property
    def label(self) -> int:
        return label_of(self.class_name)

    @property
    def is_video(self) -> bool:
        return self.path.suffix.lower() in VIDEO_EXTENSIONS

    @property
    def group(self) -> str:
        return self.video or self.relpath


def discover(root: str | Path) -> tuple[list[ImageFile], list[str]]:
    """List the images of each split and class; returns (files, notes). Raises on a broken layout."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: data folder not found (expected {root}/{{train,val,test}}/{{real,fake}}/)")
    notes, files = [], []
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            if split in REQUIRED_SPLITS:
                raise DatasetError(f"{split_dir}: missing split folder '{split}' (train and val are required)")
            notes.append(f"no '{split}' split: evaluation will use 'val' instead")
            continue
        for class_name in CLASS_NAMES:
            class_dir = split_dir / class_name
            if not class_dir.is_dir():
                raise DatasetError(f"{class_dir}: missing class folder (each split needs real/ and fake/)")
            try:  # not p.is_file(): FIFOs and broken links are listed too, to be reported unreadable, not skipped
                found = sorted(
                    p
                    for p in class_dir.rglob("*")
                    if p.suffix.lower() in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS and not p.is_dir()
                )
            except OSError as exc:
                raise DatasetError(f"{class_dir}: cannot list the folder ({exc.strerror or exc})") from None
            if not found:
                raise DatasetError(
                    f"{class_dir}: empty class, no images ({sorted(IMAGE_EXTENSIONS)}) "
                    f"or videos ({sorted(VIDEO_EXTENSIONS)})"
                )
            files += [ImageFile(p, p.relative_to(root).as_posix(), split, class_name) for p in found]
        extra = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name not in CLASS_NAMES)
        if extra:
            notes.append(f"{split_dir}: ignored folders {extra} (classes are {list(CLASS_NAMES)})")
    return files, notes


# --- the prepared cache, written by prepare and read by train and evaluate ---

CACHE_META = "meta.json"


def cache_paths(cache_dir: Path, split: str) -> tuple[Path, Path]:
    return cache_dir / f"{split}_images.npy", cache_dir / f"{split}_labels.npy"


@dataclass
class PreparedSplit:
    images: np.ndarray  # N x H x W x 3 uint8 (memory-mapped)
    labels: np.ndarray  # N int64
    relpaths: list[str]
    videos: list[str] | None = None  # the source video of each image (video-level metrics); None: one each
    datasets: list[str] | None = None  # the mixture source of each image; None: one data set

    @property
    def groups(self) -> list[str]:
        return self.videos or self.relpaths


def load_meta(cache_dir: str | Path) -> dict:
    meta_path = Path(cache_dir) / CACHE_META
    if not meta_path.exists():
        raise DatasetError(f"{meta_path}: no prepared data here; run `dfdetect prepare` first")
    return json.loads(meta_path.read_text())


def load_split(cache_dir: str | Path, split: str) -> PreparedSplit:
    cache_dir = Path(cache_dir)
    meta = load_meta(cache_dir)
    if split not in meta["splits"]:
        raise DatasetError(f"{cache_dir}: split '{split}' was not prepared (have {sorted(meta['splits'])})")
    img_path, lab_path = cache_paths(cache_dir, split)
    return PreparedSplit(
        images=np.load(img_path, mmap_mode="r"),
        labels=np.load(lab_path).astype(np.int64),
        relpaths=meta["splits"][split]["relpaths"],
        videos=meta["splits"][split].get("videos"),
        datasets=meta["splits"][split].get("datasets"),
    )


FACES_DIR = "faces"  # face crops live in the prepared folder under this name


def original_path(prepared_dir: str | Path, relpath: str) -> Path:
    """Where the image behind a manifest path is: face crops in the prepared folder, the rest in the data."""
    if relpath.startswith(FACES_DIR + "/"):
        return Path(prepared_dir) / relpath
    meta = load_meta(prepared_dir)
    if relpath.startswith("@"):  # another source of a mixture: @NAME/<path inside it>
        name, _, rest = relpath[1:].partition("/")
        return Path(meta["sources"][name]["path"]) / rest
    return Path(meta["data_dir"]) / relpath


def preprocess_config(cache_dir: str | Path) -> PreprocessConfig:
    return PreprocessConfig.from_dict(load_meta(cache_dir)["preprocess"])


class CachedBatches(torch.utils.data.Dataset):
    """Indexed by a list of indices, returns a whole batch: uint8 N x 3 x H x W and int64 labels.

    One fancy-index per batch instead of one Python call per image keeps the data path cheap.
    """

    def __init__(self, split: PreparedSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, indices):
        idx = np.sort(np.asarray(indices))  # sorted reads are faster on a memory map; order is restored below
        order = np.argsort(np.argsort(np.asarray(indices)))
        images = torch.from_numpy(np.ascontiguousarray(self.split.images[idx][order])).permute(0, 3, 1, 2)
        return images, torch.from_numpy(self.split.labels[idx][order])


def batch_loader(
    split: PreparedSplit,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
    num_workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
    sampler: torch.utils.data.Sampler | None = None,
) -> torch.utils.data.DataLoader:
    """Batches in a seeded order; `pin_memory` (for CUDA) lets the host-to-device copy run asynchronously.
    `sampler` replaces the order (a DistributedSampler gives each process its share)."""
    dataset = CachedBatches(split)
    if sampler is not None:
        base = sampler
    elif shuffle:
        base = torch.utils.data.RandomSampler(dataset, generator=generator)
    else:
        base = torch.utils.data.SequentialSampler(dataset)
    sampler = torch.utils.data.BatchSampler(base, batch_size, drop_last=drop_last)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )
