"""Low-level cues that separate real from fake within a data set but not across sets (shortcuts a detector can
learn instead of manipulation traces): sharpness and JPEG quality, per class, for every shared set.

    python benchmarks/shortcuts.py --datasets ../shared/datasets --out benchmarks/results/shortcuts.json

For each set with both classes: the ROC-AUC of "blurrier means fake" alone (minus the log variance of the
Laplacian of the grey centre half of the image, at its own resolution), the median sharpness per class and the mean JPEG
quantisation step per class (higher: stronger compression). An AUC far from 0.5 in opposite directions on two
sets means a model that learns sharpness on one is inverted on the other.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dfdetect import augment
from dfdetect.io_utils import atomic_write_json
from dfdetect.metrics import roc_auc

SETS = {  # name -> (real folder, fake folder) inside --datasets
    "faceswap128": ("faceswap128/test/real", "faceswap128/test/fake"),
    "lfw_faceswap": ("lfw_faceswap/real", "lfw_faceswap/fake"),
    "tpdne_stylegan2": ("tpdne_stylegan2/real", "tpdne_stylegan2/fake"),
    "utkface_real": ("utkface_real/real", None),
}


def sharpness(image: Image.Image) -> float:
    """The library's measure (`augment.sharpness`, what sharpness matching equalises) of one file, at its own
    resolution (a resize would remove the fine detail where the classes differ)."""
    rgb = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    return float(augment.sharpness(rgb[None])[0])


def jpeg_step(image: Image.Image) -> float | None:
    """The mean step of the luma quantisation table (None for a file that is not a JPEG)."""
    tables = getattr(image, "quantization", None)
    return float(np.mean(tables[0])) if tables else None


def measure(folder: Path, n: int, rng: random.Random) -> dict:
    files = sorted(folder.glob("*.jpg"))
    files = rng.sample(files, min(n, len(files)))
    sharp, steps = [], []
    for path in files:
        with Image.open(path) as image:
            steps.append(jpeg_step(image))
            sharp.append(sharpness(image))
    steps = [s for s in steps if s is not None]
    return {
        "files": len(files),
        "sharpness": sharp,
        "median_sharpness": round(float(np.median(sharp)), 3),
        "mean_jpeg_step": round(float(np.mean(steps)), 2) if steps else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", type=Path, default=Path("../shared/datasets"), help="folder holding the sets")
    ap.add_argument("--n", type=int, default=300, help="files drawn per class (seeded)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the draw")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = ap.parse_args()
    rng, rows = random.Random(args.seed), {}
    for name, (real, fake) in SETS.items():
        if not (args.datasets / real).is_dir():
            continue
        r = measure(args.datasets / real, args.n, rng)
        row = {"real": {k: v for k, v in r.items() if k != "sharpness"}}
        if fake:
            f = measure(args.datasets / fake, args.n, rng)
            row["fake"] = {k: v for k, v in f.items() if k != "sharpness"}
            labels = np.array([0] * len(r["sharpness"]) + [1] * len(f["sharpness"]))
            row["auc_blurrier_means_fake"] = round(roc_auc(labels, -np.array(r["sharpness"] + f["sharpness"]), 0.5), 3)
        rows[name] = row
        print(name, json.dumps(row))
    atomic_write_json(
        args.out,
        {
            "benchmark": "shortcuts",
            "command": "python benchmarks/shortcuts.py "
            f"--datasets {args.datasets} --n {args.n} --seed {args.seed} --out {args.out}",
            "sets": rows,
        },
    )


if __name__ == "__main__":
    main()
