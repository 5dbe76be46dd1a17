"""Training on a mixture of data sets: find each source's files, give sets without split folders a stable split,
cap a source's size, and draw training batches with a share per source.

`prepare` merges every source into one prepared cache that remembers which source each image came from; the
split of a file never depends on the other sources, so adding a source never moves another's files between
splits. Training then draws `train.source_weights` shares per epoch.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .config import SourceParams
from .data import IMAGE_EXTENSIONS, SPLITS, DatasetError, ImageFile, discover
from .labels import CLASS_NAMES
from .video import VIDEO_EXTENSIONS

DEFAULT_SPLIT = {"train": 0.7, "val": 0.15, "test": 0.15}  # for sets without split folders
SPLIT_SALT = "dfdetect-split"  # constant: renaming a set never moves its files between splits
SOURCE_PREFIX = "@"  # manifest paths of a mixture's other sources: @NAME/<path inside that source>


def source_relpath(name: str, rel: str) -> str:
    return f"{SOURCE_PREFIX}{name}/{rel}"


def split_source_relpath(relpath: str) -> tuple[str, str] | None:
    """'@NAME/rest' -> (NAME, rest); None for a path of the main data set."""
    if not relpath.startswith(SOURCE_PREFIX):
        return None
    name, _, rest = relpath[1:].partition("/")
    return name, rest


def _unit(*parts: str) -> float:
    """A stable number in [0, 1) for a key: the same on every machine and run, unlike hash()."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def has_splits(root: Path) -> bool:
    return any((root / s).is_dir() for s in SPLITS)


def list_unsplit(root: Path) -> list[ImageFile]:
    """{real,fake}/ without split folders; either class may be missing (a set of reals only, say)."""
    files = []
    for class_name in CLASS_NAMES:
        folder = root / class_name
        if not folder.is_dir():
            continue
        try:
            found = sorted(
                p
                for p in folder.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS and not p.is_dir()
            )
        except OSError as exc:
            raise DatasetError(f"{folder}: cannot list the folder ({exc.strerror or exc})") from None
        files += [ImageFile(p, p.relative_to(root).as_posix(), "", class_name) for p in found]
    if not files:
        raise DatasetError(f"{root}: no images or videos under {root}/{{real,fake}}/ or {root}/{{train,val,test}}/")
    return files


def assign_splits(files: list[ImageFile], fractions: dict[str, float], salt: str) -> list[ImageFile]:
    """Each group (identity, else video, else file) to one split, so frames of one video or photos of one person
    never straddle splits: per class, groups in a stable hashed order are cut at the shares, so every split
    gets its share of each class (at least one group where the class has one for every split). The order never
    depends on other files, so adding files moves few groups. A group of both classes goes with its first file's."""
    order = [s for s in SPLITS if fractions.get(s, 0) > 0]
    groups: dict[str, list[ImageFile]] = defaultdict(list)
    for f in files:
        groups[f.identity or f.video or f.relpath].append(f)
    by_class: dict[str, list[str]] = defaultdict(list)
    for key, members in groups.items():
        by_class[members[0].class_name].append(key)
    split_of = {}
    for keys in by_class.values():
        keys.sort(key=lambda k: _unit(salt, k))
        n, start = len(keys), 0
        for i, split in enumerate(order):
            left = len(order) - i - 1  # splits still to fill after this one
            if n < len(order):  # too few groups to give every split one: all train
                size = n if i == 0 else 0
            else:
                size = n - start if not left else min(n - start - left, max(1, round(n * fractions[split])))
            for key in keys[start : start + size]:
                split_of[key] = split
            start += size
    return [replace(f, split=split_of[f.identity or f.video or f.relpath]) for f in files]


def cap_per_class(files: list[ImageFile], cap: int | None, salt: str) -> tuple[list[ImageFile], int]:
    """At most `cap` files per (split, class), whole groups chosen in a stable hashed order; (kept, dropped)."""
    if cap is None:
        return files, 0
    groups: dict[tuple[str, str], dict[str, list[ImageFile]]] = defaultdict(lambda: defaultdict(list))
    for f in files:
        groups[(f.split, f.class_name)][f.identity or f.video or f.relpath].append(f)
    kept = []
    for members in groups.values():
        taken = 0
        for key in sorted(members, key=lambda k: _unit(salt, "cap", k)):
            if taken >= cap:
                break
            kept += members[key]
            taken += len(members[key])
    kept_set = {id(f) for f in kept}
    return [f for f in files if id(f) in kept_set], len(files) - len(kept)


def discover_source(source: SourceParams, assign_groups) -> tuple[list[ImageFile], list[str]]:
    """A mixture source's files, split, grouped, capped and named; (files, notes)."""
    root, name = Path(source.path), source.label
    if not root.is_dir():
        raise DatasetError(f"{root}: data set folder of prepare.sources '{name}' not found")
    if has_splits(root):
        files, notes = discover(root)
        files, group_notes = assign_groups(files, source.group_pattern)
    else:
        files, group_notes = assign_groups(list_unsplit(root), source.group_pattern)
        files = assign_splits(files, source.split, SPLIT_SALT)
        notes = [f"source '{name}': no split folders; split by group {dict(source.split)}"]
    files, dropped = cap_per_class(files, source.max_per_class, SPLIT_SALT)
    if dropped:
        notes.append(f"source '{name}': {dropped} files left out by max_per_class={source.max_per_class}")
    named = [
        replace(
            f,
            relpath=source_relpath(name, f.relpath),
            dataset=name,
            video=f"{name}/{f.video}" if f.video else "",
            identity=f"{name}/{f.identity}" if f.identity else "",
        )
        for f in files
    ]
    return named, notes + [f"source '{name}': {n}" for n in group_notes]


def dvc_version(path: str | Path) -> str:
    """The md5 DVC recorded for a data folder (PATH.dvc beside it), or 'untracked'."""
    dvc_file = Path(str(path).rstrip("/") + ".dvc")
    if not dvc_file.is_file():
        return "untracked"
    import yaml

    try:
        outs = yaml.safe_load(dvc_file.read_text()).get("outs") or []
        return str(outs[0].get("md5", "unknown")) if outs else "unknown"
    except (yaml.YAMLError, AttributeError, IndexError):
        return "unreadable"


# --- training draws ---------------------------------------------------------------------------------------


class MixtureSampler(torch.utils.data.Sampler):
    """Indices of one epoch where each source gets its weight's share of the draws (with replacement within a
    source only when its share exceeds its size). The order comes from the seed and the epoch alone, so a
    resumed run draws the same batches; `rank`/`world` give each training process its slice."""

    def __init__(self, datasets: list[str], weights: dict[str, float], seed: int, rank: int = 0, world: int = 1):
        self.names = sorted(set(datasets))
        unknown = set(weights) - set(self.names)
        if unknown:
            raise DatasetError(
                f"train.source_weights names {sorted(unknown)}, but the prepared data has only {self.names}"
            )
        self.members = {n: np.flatnonzero(np.asarray(datasets) == n) for n in self.names}
        self.weights = {n: float(weights.get(n, 1.0)) for n in self.names}
        if sum(self.weights.values()) <= 0:
            raise DatasetError("train.source_weights: at least one source needs a positive weight")
        self.total = len(datasets)
        self.seed, self.rank, self.world, self.epoch = seed, rank, world, 0

    def counts(self) -> dict[str, int]:
        """Draws per source in one epoch (as many draws as images in all)."""
        total_w = sum(self.weights.values())
        return {n: int(round(self.total * w / total_w)) for n, w in self.weights.items()}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _epoch_indices(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        parts = []
        for name, n in self.counts().items():
            pool = self.members[name]
            if n <= 0 or len(pool) == 0:
                continue
            repeats = math.ceil(n / len(pool))
            draws = np.concatenate([rng.permutation(pool) for _ in range(repeats)])[:n]
            parts.append(draws)
        indices = rng.permutation(np.concatenate(parts)) if parts else np.array([], dtype=np.int64)
        usable = len(indices) - len(indices) % self.world
        return indices[:usable][self.rank :: self.world]

    def __iter__(self):
        return iter(self._epoch_indices().tolist())

    def __len__(self) -> int:
        return sum(self.counts().values()) // self.world
