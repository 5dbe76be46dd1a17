"""Where can a network see a self-blend's seam? For each candidate layer of EfficientNet-Lite0 (ImageNet
weights), train the boundary head (dfdetect.boundary, `train.sbi.boundary_weight`) with the backbone on real
training faces and their self-blends, the boundary loss alone, and compare its loss with the best constant
guess of each batch's targets. The faces are self-blended and augmented as params.yaml's recipe trains them
(`train.sbi`, `train.augment`). Soft targets leave a loss no prediction removes (their own entropy, higher on
coarser maps), so the figure compared is the share of the constant's removable loss that remains:
(loss - floor) / (constant - floor). Well below 1: the seam is readable at that layer; near 1, the head learns
little more than "a tenth of the map is seam". Training faces only: no evaluation set is looked at.

  python benchmarks/boundary_layers.py --data ../shared/datasets/faceswap128 \
      --out benchmarks/results/boundary_layers.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dfdetect import runtime
from dfdetect.boundary import BoundarySupervision, boundary_map
from dfdetect.config import ModelParams, Params, load_params
from dfdetect.io_utils import atomic_write_json
from dfdetect.models import create_model
from dfdetect.preprocessing import PreprocessConfig, standardize
from dfdetect.progress import progress
from dfdetect.sbi import sbi_batch_with_masks
from dfdetect.train import augmented_batch_with_masks


def real_faces(data: Path, count: int) -> torch.Tensor:
    """`count` real training faces of `data` (evenly spaced over the sorted names), uint8 N x 3 x H x W."""
    files = sorted((data / "train" / "real").iterdir())
    picked = files[:: max(1, len(files) // count)][:count]
    return torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in picked])).permute(0, 3, 1, 2)


def _entropy(target: torch.Tensor) -> float:
    """The BCE a perfect prediction still has on soft targets: their mean binary entropy."""
    t = target.clamp(1e-6, 1 - 1e-6)
    return float(-(t * t.log() + (1 - t) * (1 - t).log()).mean())


def fit_layer(faces: torch.Tensor, layer: str, params: Params, steps: int, batch: int, bar, task) -> dict:
    """Train the head at `layer` (and the backbone) on the boundary loss alone; the last quarter's mean loss
    against the best constant guess of the same batches and against their entropy floor."""
    torch.manual_seed(params.seed)
    rt = runtime.resolve("cpu", "fp32", False)
    pre = PreprocessConfig(image_size=faces.shape[-1])
    sbi, augment = params.train.sbi, params.train.augment
    model = create_model(ModelParams(name="efficientnet_lite0", pretrained=True)).train()
    size = faces.shape[-1]
    supervision = BoundarySupervision(model, layer, 1.0, size, torch.device("cpu"))
    optimizer = torch.optim.Adam([*model.parameters(), *supervision.head.parameters()], lr=params.train.lr)
    gen = torch.Generator().manual_seed(params.seed)
    losses, constants, floors = [], [], []
    with supervision.attached(model):
        for _ in range(steps):
            pick = torch.randint(0, len(faces), (batch,), generator=gen)
            images, _, masks, known = sbi_batch_with_masks(
                faces[pick], torch.zeros(batch, dtype=torch.long), sbi.prob, gen, None, sbi.alteration
            )
            x, masks = augmented_batch_with_masks(images, masks, augment, gen, rt)
            model(standardize(x, pre))  # as training standardises (dfdetect.preprocessing)
            loss = supervision.loss(masks, known)
            target = boundary_map(masks, supervision.features.shape[-2:])
            guess = target.mean().clamp(1e-4, 1 - 1e-4).expand_as(target)
            constants.append(float(F.binary_cross_entropy(guess, target)))
            floors.append(_entropy(target))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.update(task, advance=1, info=f"{layer} loss {losses[-1]:.3f}")
        shape = tuple(supervision.features.shape[1:])
    tail = max(1, steps // 4)
    loss, constant, floor = (float(np.mean(v[-tail:])) for v in (losses, constants, floors))
    return {
        "feature_map": list(shape),
        "loss": round(loss, 4),
        "constant_guess": round(constant, 4),
        "entropy_floor": round(floor, 4),
        "remaining": round((loss - floor) / (constant - floor), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a data set with train/real/ faces (faceswap128)")
    parser.add_argument(
        "--layers",
        nargs="+",
        default=[r"^net\._blocks\.4$", r"^net\._blocks\.7$", r"^net\._blocks\.10$", r"^net\._blocks\.14$"],
        help="train.sbi.boundary_layer values to compare (regular expressions naming one module each)",
    )
    parser.add_argument("--faces", type=int, default=400, help="real training faces drawn from")
    parser.add_argument("--steps", type=int, default=80, help="optimiser steps per layer")
    parser.add_argument("--batch", type=int, default=32, help="faces per step (half become self-blends)")
    parser.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="the recipe: its seed, train.lr, sbi and augment"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/boundary_layers.json"))
    args = parser.parse_args()
    params = load_params(args.params)
    faces = real_faces(args.data, args.faces)
    started, rows = time.time(), {}
    with progress() as bar:
        task = bar.add_task("boundary head per layer", total=args.steps * len(args.layers), info="")
        for layer in args.layers:
            rows[layer] = fit_layer(faces, layer, params, args.steps, args.batch, bar, task)
            print(layer, rows[layer], flush=True)
    result = {
        "command": "python benchmarks/boundary_layers.py " + " ".join(sys.argv[1:]),
        "faces": len(faces),
        "steps": args.steps,
        "batch": args.batch,
        "seconds": round(time.time() - started, 1),
        "layers": rows,
    }
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
