"""What a recipe change costs per training step, measured beside the recipe it changes.

Whole-run wall times on a shared 2-core machine drift by a third from one hour to the next, which hides a
few per cent. This times single training steps (self-blends, augmentation, forward, backward, optimizer step:
what `dfdetect train` does per batch, without validation) of params.yaml's recipe and of the same recipe with
`--set` overrides, alternating step by step on the same batches, so that machine drift hits both alike.

    python benchmarks/recipe_step_cost.py --prepared /tmp/work/prepared --set 'train.augment.jpeg_scale=[0.5,1.5]'
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from dfdetect import runtime
from dfdetect.config import load_params
from dfdetect.data import load_split, preprocess_config
from dfdetect.models import create_model
from dfdetect.overrides import apply_overrides
from dfdetect.sbi import batch_options, sbi_batch
from dfdetect.train import augmented_batch, model_input, train_step


def step_seconds(model, optimizer, scaler, rt, train, sbi_options, pre, images, labels, gen) -> float:
    """One training step of recipe `train` on a uint8 batch, in seconds (`sbi_options`: its sbi_batch
    arguments, the face mesh included where the recipe uses it)."""
    started = time.perf_counter()
    if train.sbi.mode != "none":
        images, labels = sbi_batch(images, labels, gen=gen, **sbi_options)
    x = model_input(augmented_batch(images, train.augment, gen, rt), pre, rt)
    train_step(model, optimizer, scaler, rt, x, labels.float())
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepared", type=Path, required=True, help="a prepared cache (dfdetect prepare's --out)")
    ap.add_argument("--set", action="append", default=[], help="override of the changed recipe, e.g. train.lr=0.001")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="the recipe both start from")
    ap.add_argument("--steps", type=int, default=20, help="timed steps of each recipe (after 4 warm-up steps)")
    ap.add_argument("--out", type=Path, help="JSON file to write (default: print only)")
    args = ap.parse_args()

    base = load_params(args.params)
    recipes = {"params.yaml": base, "with --set": apply_overrides(base, args.set)}
    rt = runtime.resolve("cpu", base.train.precision, base.train.channels_last)
    pre = preprocess_config(args.prepared)
    split = load_split(args.prepared, "train")
    runtime.seed_everything(0)
    model = create_model(base.model).to(memory_format=rt.memory_format()).train()  # one network: same arithmetic
    optimizer = torch.optim.Adam(model.parameters(), lr=base.train.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    sbi_options = {name: batch_options(params.train.sbi) for name, params in recipes.items()}
    times = {name: [] for name in recipes}
    for step in range(4 + args.steps):
        idx = np.sort(rng.choice(len(split.labels), base.train.batch_size, replace=False))
        images = torch.from_numpy(np.ascontiguousarray(split.images[idx])).permute(0, 3, 1, 2).contiguous()
        labels = torch.from_numpy(split.labels[idx])
        for name, params in recipes.items():
            options = sbi_options[name]
            seconds = step_seconds(model, optimizer, scaler, rt, params.train, options, pre, images, labels, gen)
            if step >= 4:
                times[name].append(seconds)
    medians = {name: float(np.median(v)) for name, v in times.items()}
    result = {
        "benchmark": "recipe_step_cost",
        "command": "python benchmarks/recipe_step_cost.py " + " ".join(f"--set '{s}'" for s in args.set),
        "prepared": str(args.prepared),
        "image_size": pre.image_size,
        "batch_size": base.train.batch_size,
        "steps": args.steps,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "median_seconds_per_step": {k: round(v, 4) for k, v in medians.items()},
        "changed_over_base": round(medians["with --set"] / medians["params.yaml"] - 1, 4),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
