"""Which real faces of another source a model calls fake: the false-positive rate of a reals-only set per
age band and per quartile of sharpness, with the sharpness of the training source's own test reals beside it.

A model trained on one source flags many reals of another (issue 15: a third of UTKFace's). This splits those
false positives by two properties a reals-only set can be read by: the age in its file names
(`age_gender_race_...`, UTKFace's naming) and how sharp each face crop is as the model receives it (the
library's sharpness measure, `augment.sharpness`, the one sharpness matching equalises in training). Within
one age range the sharpness quartiles show whether blur still reads as "fake"; the age bands show whether
faces unlike the training source's (infants, children) do. Faces are cropped as `evaluate` crops them
(prepare.faces at the model's own margin); the threshold is the model's own. With --changes every face is
scored again with one change at a time (zoomed, stretched, grain added, smoothed), and each change's rate is
reported for infants, children and adults: a change that moves one group's rate names a cue the model reads.

    python benchmarks/flagged_reals.py --checkpoint WORK/models/best.pt --datasets ../shared/datasets \\
        --out benchmarks/results/flagged_reals.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

AGE = re.compile(r"^(?P<age>\d+)_")
AGE_BANDS = [3, 13, 20, 40, 60]  # as benchmarks/generalisation.py bands UTKFace


def crop_sharpness(images: np.ndarray) -> np.ndarray:
    """The library's sharpness of each uint8 crop at the model's input size."""
    from dfdetect import augment

    out = []
    for i in range(0, len(images), 256):
        batch = torch.from_numpy(np.asarray(images[i : i + 256], dtype=np.float32) / 255).permute(0, 3, 1, 2)
        out.append(augment.sharpness(batch).numpy())
    return np.concatenate(out)


def _reframed(img: Image.Image, x_zoom: float, y_zoom: float) -> Image.Image:
    """Zoomed about the centre by x_zoom across and y_zoom down (above 1: the face larger), black outside."""
    w, h = img.size
    cx, cy = w / 2, h / 2
    return img.transform(
        img.size,
        Image.Transform.AFFINE,
        (1 / x_zoom, 0, cx - cx / x_zoom, 0, 1 / y_zoom, cy - cy / y_zoom),
        resample=Image.Resampling.BILINEAR,
    )


def _grain(img: Image.Image, std: float) -> Image.Image:
    """Grey film grain of `std` levels (seeded by the image, so a change is the same on every run)."""
    a = np.asarray(img, dtype=np.float64)
    noise = np.random.default_rng(int(a.sum()) % 2**32).normal(0, std, a.shape[:2])[..., None]
    return Image.fromarray(np.clip(a + noise, 0, 255).round().astype(np.uint8))


# One change of every face at a time (--changes): framing and proportions (how children's faces differ from
# adults' after the same crop) and skin texture (smooth skin, a blend's look). "taller" and "wider" zoom one
# axis only, so they enlarge the face as well as change its proportions.
FACE_CHANGES = {
    "none": lambda im: im,
    "zoom in x1.15": lambda im: _reframed(im, 1.15, 1.15),
    "zoom out x0.87": lambda im: _reframed(im, 0.87, 0.87),
    "taller x1.15": lambda im: _reframed(im, 1.0, 1.15),
    "wider x1.15": lambda im: _reframed(im, 1.15, 1.0),
    "grain std 4": lambda im: _grain(im, 4.0),
    "smoothed (median 3)": lambda im: im.filter(ImageFilter.MedianFilter(3)),
}


def rate(flagged: np.ndarray) -> dict:
    return {"n": int(flagged.size), "real_fpr": round(float(flagged.mean()), 4) if flagged.size else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True, help="a trained model (best.pt)")
    ap.add_argument("--datasets", type=Path, required=True, help="folder holding the sets")
    ap.add_argument("--reals", default="utkface_real", help="the reals-only set to split (file names age_...)")
    ap.add_argument(
        "--reference", default="faceswap128", help="the training source, whose test reals are the reference"
    )
    ap.add_argument(
        "--adults", type=int, nargs=2, default=(20, 60), metavar=("FROM", "TO"), help="the age range [FROM, TO)"
    )
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="whose prepare.faces crops the photos")
    ap.add_argument(
        "--changes",
        action="store_true",
        help="also score every face with one change at a time (zoom, stretch, grain, smoothing) and report each "
        "change's rate for infants, children and adults",
    )
    ap.add_argument("--out", type=Path, help="JSON file to write (default: print only)")
    args = ap.parse_args()

    from dfdetect.bands import band
    from dfdetect.config import SuiteSet, load_params
    from dfdetect.inference import Predictor
    from dfdetect.suite import load_suite_set

    predictor = Predictor.from_checkpoint(args.checkpoint)
    pre = predictor.pre
    faces = load_params(args.params).prepare.faces.with_margin(pre.face_margin)
    data = load_suite_set(SuiteSet(path=str(args.datasets / args.reals), face_crop=True), pre.image_size, faces)
    reals = data.split.labels == 0
    images, files = data.split.images[reals], [f for f, r in zip(data.files, reals) if r]
    reference = load_suite_set(SuiteSet(path=str(args.datasets / args.reference)), pre.image_size, faces)
    ref_images = reference.split.images[reference.split.labels == 0]

    def flagged_after(change) -> np.ndarray:
        scores = np.concatenate(
            [
                predictor.score([change(Image.fromarray(a)) for a in images[i : i + 64]])
                for i in range(0, len(images), 64)
            ]
        )
        return scores >= predictor.threshold

    flagged = flagged_after(FACE_CHANGES["none"])
    sharp = crop_sharpness(images)
    ages = np.array([int(m.group("age")) if (m := AGE.match(Path(f).name)) else -1 for f in files])
    if (ages < 0).any():
        sys.exit(f"{args.reals}: {int((ages < 0).sum())} file names do not start with an age (age_...)")
    adults = (ages >= args.adults[0]) & (ages < args.adults[1])

    edges = np.quantile(sharp, [0.25, 0.5, 0.75])
    quartile = np.searchsorted(edges, sharp, side="right")
    bands = [band(str(a), AGE_BANDS, f"{f}: age") for a, f in zip(ages, files)]
    in_band = {key: np.array([b == key for b in bands]) for key in sorted(set(bands))}  # (index, label), edge order
    by_age = {
        label: {**rate(flagged[members]), "median_sharpness": round(float(np.median(sharp[members])), 3)}
        for (_, label), members in in_band.items()
    }
    by_sharpness = {
        f"quartile {q + 1}": {
            "all": rate(flagged[quartile == q]),
            f"ages {args.adults[0]} to under {args.adults[1]}": rate(flagged[(quartile == q) & adults]),
        }
        for q in range(4)
    }
    result = {
        "benchmark": "flagged_reals",
        "command": " ".join(["python", "benchmarks/flagged_reals.py", *sys.argv[1:]]),
        "checkpoint": str(args.checkpoint),
        "threshold": predictor.threshold,
        "set": args.reals,
        "real_fpr": rate(flagged),
        "by_age": by_age,
        "sharpness_quartile_edges": [round(float(e), 3) for e in edges],
        "by_sharpness_quartile": by_sharpness,
        "reference_real_sharpness_quartiles": [
            round(float(q), 3) for q in np.quantile(crop_sharpness(ref_images), [0.25, 0.5, 0.75])
        ],
        "n_reference_reals": int(len(ref_images)),
    }
    if args.changes:  # the same faces with one change each: which moves the children's rate, and the adults'
        children = {label: m for (i, label), m in in_band.items() if i < 2}  # under 3, 3 to under 13
        groups = {**children, f"ages {args.adults[0]} to under {args.adults[1]}": adults}
        result["changes"] = {}
        for name, change in FACE_CHANGES.items():
            after = flagged if name == "none" else flagged_after(change)
            result["changes"][name] = {"all": rate(after)["real_fpr"]} | {
                group: rate(after[members])["real_fpr"] for group, members in groups.items()
            }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
