"""Which input properties a trained model reads as "fake": score the same faces with one property changed.

A model trained on one source can learn that source's colour, sharpness or compression instead of
manipulation traces. Changing one property of every input at test time (greyscale, half saturation,
grey-world white balance, a 64-px round trip, a blur, an unsharp mask, a JPEG re-save, one at 3/4 or 4/3 of the model's input
size resized back, as a photo's blocks reach the model after a face crop resized it) and scoring again
shows which of them moves the cross-dataset figures: a change that takes a set's real false-positive rate
from 49 % to 7 % names the cue. Each set is a seeded sample of --per-class files per class, face-cropped
as the model's own training faces were (prepare.faces, margin = the model's framing); faceswap128's test
split is used as it is (tight crops).

    python benchmarks/input_probe.py --checkpoint models/best.pt --datasets ../shared/datasets \\
        --out benchmarks/results/input_probe.json
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

CROPPED_SETS = ("lfw_faceswap", "tpdne_stylegan2", "utkface_real")  # whole photos: face-cropped like training
LUMA = np.array([0.299, 0.587, 0.114])


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _jpeg_at(img: Image.Image, side: int, quality: int) -> Image.Image:
    """Compressed at `side` x `side` pixels and resized back: a photo's blocks after a face crop resized them."""
    return _jpeg(img.resize((side, side), Image.BICUBIC), quality).resize(img.size, Image.BICUBIC)


def _saturation(img: Image.Image, factor: float) -> Image.Image:
    a = np.asarray(img, dtype=np.float64)
    grey = (a @ LUMA)[..., None]
    return Image.fromarray(np.clip(grey + factor * (a - grey), 0, 255).round().astype(np.uint8))


def _grey_world(img: Image.Image) -> Image.Image:
    a = np.asarray(img, dtype=np.float64)
    means = a.reshape(-1, 3).mean(0)
    return Image.fromarray(np.clip(a * (means.mean() / np.maximum(means, 1e-6)), 0, 255).round().astype(np.uint8))


def changes(input_side: int) -> dict:
    """Each change by name; `input_side` is the model's input size (where the JPEG blocks of the last two land
    magnified or shrunk by 4/3)."""
    return {
        "none": lambda im: im,
        "grey": lambda im: _saturation(im, 0.0),
        "half_saturation": lambda im: _saturation(im, 0.5),
        "grey_world": _grey_world,
        "down64": lambda im: im.resize((64, 64), Image.BILINEAR).resize(im.size, Image.BILINEAR),
        "blur1": lambda im: im.filter(ImageFilter.GaussianBlur(1.0)),
        "unsharp": lambda im: im.filter(ImageFilter.UnsharpMask(2, 100, 0)),
        "jpeg60": lambda im: _jpeg(im, 60),
        "jpeg70_blocks_x4/3": lambda im: _jpeg_at(im, round(input_side * 3 / 4), 70),  # a face smaller than the input
        "jpeg70_blocks_x3/4": lambda im: _jpeg_at(im, round(input_side * 4 / 3), 70),  # ... larger
    }


def sample_set(root: Path, per_class: int, seed: int, link_dir: Path) -> Path:
    """A folder of symlinks to a seeded sample of `per_class` files of each class of `root`."""
    rng = random.Random(seed)
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(class_dir.iterdir())
        (link_dir / class_dir.name).mkdir(parents=True)
        for f in rng.sample(files, min(per_class, len(files))):
            (link_dir / class_dir.name / f.name).symlink_to(f.resolve())
    return link_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True, help="a trained model (best.pt)")
    ap.add_argument("--datasets", type=Path, required=True, help="folder holding faceswap128 and the other sets")
    ap.add_argument("--per-class", type=int, default=300, help="files per class of each set (seeded sample)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the samples")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="whose prepare.faces crops the photos")
    ap.add_argument("--out", type=Path, help="JSON file to write (default: print only)")
    args = ap.parse_args()

    from dfdetect.config import SuiteSet, load_params
    from dfdetect.inference import Predictor
    from dfdetect.metrics import roc_auc
    from dfdetect.suite import load_suite_set

    predictor = Predictor.from_checkpoint(args.checkpoint)
    pre = predictor.pre
    faces = load_params(args.params).prepare.faces.with_margin(pre.face_margin)
    sets = {}
    with tempfile.TemporaryDirectory(prefix="dfdetect-probe-") as tmp:
        for name in CROPPED_SETS:
            folder = sample_set(args.datasets / name, args.per_class, args.seed, Path(tmp) / name)
            data = load_suite_set(SuiteSet(path=str(folder), face_crop=True), faces.crop_size, faces)
            sets[name] = (data.split.images, data.split.labels)
        test = sample_set(args.datasets / "faceswap128" / "test", args.per_class, args.seed, Path(tmp) / "fs")
        data = load_suite_set(SuiteSet(path=str(test)), pre.image_size, faces)
        sets["faceswap128"] = (data.split.images, data.split.labels)

    rows = {}
    for change, fn in changes(pre.image_size).items():
        row = {}
        for name, (images, labels) in sets.items():
            scores = np.concatenate(
                [
                    predictor.score([fn(Image.fromarray(a)) for a in images[i : i + 64]])
                    for i in range(0, len(images), 64)
                ]
            )
            if len(set(labels.tolist())) == 2:
                row[f"{name}_roc_auc"] = round(roc_auc(labels, scores, 0.5), 4)
            reals = scores[labels == 0]
            row[f"{name}_real_fpr"] = round(float(np.mean(reals >= predictor.threshold)), 4) if len(reals) else None
        rows[change] = row
        print(change, json.dumps(row), flush=True)
    result = {
        "benchmark": "input_probe",
        "command": " ".join(["python", "benchmarks/input_probe.py", *sys.argv[1:]]),
        "checkpoint": str(args.checkpoint),
        "threshold": predictor.threshold,
        "per_class": args.per_class,
        "seed": args.seed,
        "changes": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
