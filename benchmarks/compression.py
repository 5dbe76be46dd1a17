"""Compression on faceswap128 (issue 18): the default recipe as teacher beside a distilled student, the teacher
pruned x2 and quantised to static int8; in-process images/s on the CPU and test ROC-AUC of each (JSON, README):

  python benchmarks/compression.py --data ../shared/datasets/faceswap128 --out benchmarks/results/compression.json

Each model is measured the way it would serve on the CPU: as an ONNX Runtime session (fp32, or its int8 graph),
on pre-normalised batches of 32 test images (model time only: decoding is the same for every row), with 1
thread (one pinned core, as benchmarks/serving.py) and with every core. Test ROC-AUC is scored through that
same session, so what quantisation costs shows. The target: one row at >= 3x the teacher's images/s with a
test ROC-AUC within 0.01 of the teacher's. Trainings use params.yaml (the default recipe) and dfdetect's
own commands' functions: prepare, train, distill, prune.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from generalisation import VIDEO_FRAMES  # faceswap128's <label>_<video>_<frame> names

from dfdetect.artifact import TrainedModel
from dfdetect.config import load_params, parse_params
from dfdetect.data import load_split
from dfdetect.distill import distill
from dfdetect.export import OnnxModel, calibration_images, onnx_bytes, quantize_int8, quantize_static_int8
from dfdetect.io_utils import atomic_write_json
from dfdetect.metrics import roc_auc
from dfdetect.overrides import apply_overrides
from dfdetect.prepare import prepare
from dfdetect.preprocessing import normalize
from dfdetect.pruning import prune
from dfdetect.train import train

BATCH = 32


def test_batches(prepared: Path, trained: TrainedModel) -> tuple[list[np.ndarray], np.ndarray]:
    """The test split, normalised for this model (downscaled for a smaller student), in batches of 32."""
    split = load_split(prepared, "test")
    batches = []
    for start in range(0, len(split.labels), BATCH):
        nhwc = torch.from_numpy(np.ascontiguousarray(split.images[start : start + BATCH]))
        batches.append(normalize(nhwc.permute(0, 3, 1, 2), trained.preprocess).numpy())
    return batches, np.asarray(split.labels)


def throughput(model: OnnxModel, batch: np.ndarray, seconds: float) -> float:
    model(batch)  # warm-up: the first run allocates
    done, began = 0, time.perf_counter()
    while done == 0 or time.perf_counter() - began < seconds:
        model(batch)
        done += len(batch)
    return round(done / (time.perf_counter() - began), 1)


def measure(name: str, graph: bytes, trained: TrainedModel, prepared: Path, seconds: float, how: str) -> dict:
    batches, labels = test_batches(prepared, trained)
    scores = np.concatenate([OnnxModel(graph)(b) for b in batches])
    full = next(b for b in batches if len(b) == BATCH)
    row = {
        "model": name,
        "how": how,
        "image_size": trained.preprocess.image_size,
        "onnx_mb": round(len(graph) / 2**20, 2),
        "parameters": sum(p.numel() for p in trained.module.parameters()),
        "test_roc_auc": round(roc_auc(labels, scores, 0.5), 4),
        "images_per_s_1_thread": throughput(OnnxModel(graph, threads=1), full, seconds),
        "images_per_s_all_threads": throughput(OnnxModel(graph), full, seconds),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="faceswap128 in the seed layout")
    ap.add_argument("--out", type=Path, required=True, help="JSON to write")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dfdetect-compression"), help="prepared data and models")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="the recipe (default: the default one)")
    ap.add_argument("--student", action="append", default=[], help="KEY=VALUE of the student's recipe (repeatable)")
    ap.add_argument("--prune-epochs", type=int, default=1, help="fine-tuning epochs after pruning")
    ap.add_argument("--speedup", type=float, default=2.0, help="pruning target: MACs divided by this")
    ap.add_argument("--seconds", type=float, default=5.0, help="throughput measuring time per model and setting")
    ap.add_argument("--workers", type=int, default=2, help="prepare's processes")
    args = ap.parse_args()
    student_set = args.student or ["model.image_size=96"]

    raw = load_params(args.params).model_dump(mode="json")
    raw["prepare"].update(name="faceswap128", group_pattern=VIDEO_FRAMES)
    raw["evaluate"].update(datasets=[], robustness=False)
    params = parse_params(raw, "benchmark params")
    work, prepared = args.work, args.work / "prepared"
    minutes = {}

    def timed(key, fn, *a, **k):
        began = time.perf_counter()
        out = fn(*a, **k)
        minutes[key] = round((time.perf_counter() - began) / 60, 2)
        print(f"{key}: {minutes[key]} min", flush=True)
        return out

    if not (prepared / "report.json").exists():
        timed("prepare", prepare, args.data, prepared, params.prepare, workers=args.workers)
    if not (work / "teacher" / "best.pt").exists():
        timed("teacher_train", train, params, prepared, work / "teacher", track=False)
    teacher_path = work / "teacher" / "best.pt"
    student_params = apply_overrides(params, [*student_set, f"distill.teachers={json.dumps([str(teacher_path)])}"])
    if not (work / "student" / "best.pt").exists():
        timed("student_distill", distill, student_params, prepared, work / "student", track=False)
    if not (work / "pruned" / "best.pt").exists():
        # pruning's fine-tune is never probed (pruning.prune sets it), so a probing recipe's epochs do not bind here
        prune_params = apply_overrides(params, ["train.probe_epochs=0", f"train.epochs={args.prune_epochs}"])
        teacher_copy = TrainedModel.load(teacher_path)
        timed(
            "prune_fine_tune",
            prune,
            prune_params,
            teacher_copy,
            str(teacher_path),
            args.speedup,
            prepared,
            work / "pruned",
            track=False,
        )

    rows = []
    teacher, student, pruned = (TrainedModel.load(work / n / "best.pt") for n in ("teacher", "student", "pruned"))
    for name, trained, how in [
        ("teacher", teacher, "default recipe (params.yaml), ONNX fp32"),
        ("student", student, "distilled: " + " ".join(student_set)),
        ("pruned_x2", pruned, f"teacher pruned to 1/{args.speedup} MACs, {args.prune_epochs} epoch fine-tune"),
    ]:
        graph = onnx_bytes(trained.module.eval(), trained.preprocess.image_size)
        rows.append(measure(name, graph, trained, prepared, args.seconds, how))
        calibration = calibration_images(prepared, trained.preprocess, 256)
        rows.append(
            measure(
                f"{name}_static_int8",
                quantize_static_int8(graph, calibration),
                trained,
                prepared,
                args.seconds,
                how + ", static int8 (256 validation images)",
            )
        )
        if name == "teacher":
            rows.append(
                measure(
                    "teacher_dynamic_int8",
                    quantize_int8(graph),
                    trained,
                    prepared,
                    args.seconds,
                    "today's dynamic int8",
                )
            )
    base = rows[0]
    for row in rows:
        for key in ("images_per_s_1_thread", "images_per_s_all_threads"):
            row[key.replace("images_per_s", "speedup")] = round(row[key] / base[key], 2)
        row["roc_auc_vs_teacher"] = round(row["test_roc_auc"] - base["test_roc_auc"], 4)
        row["meets_target"] = row["speedup_1_thread"] >= 3 and row["roc_auc_vs_teacher"] >= -0.01
    report = {
        "command": "python benchmarks/compression.py --data "
        + str(args.data)
        + "".join(f" --student {s}" for s in args.student)
        + (f" --speedup {args.speedup}" if args.speedup != 2.0 else ""),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
        },
        "minutes": minutes,
        "distill": student_params.distill.model_dump(mode="json"),
        "student_recipe": student_set,
        "target": ">= 3x the teacher's images/s (1 thread) with test ROC-AUC within 0.01",
        "target_met_by": [r["model"] for r in rows if r["meets_target"]],
        "rows": rows,
    }
    atomic_write_json(args.out, report)
    print(json.dumps({k: report[k] for k in ("minutes", "target_met_by")}))


if __name__ == "__main__":
    main()
