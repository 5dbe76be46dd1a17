"""`dfdetect export`: a trained model as ONNX (fp32; int8 quantised dynamically, and statically with calibration
images), checked against PyTorch.

The exported graph takes the normalised N x 3 x S x S batch and returns P(fake); `export.json` beside it holds
the preprocessing, label map, threshold and the measured difference from eager PyTorch.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .io_utils import atomic_write_bytes, atomic_write_json
from .labels import LABEL_MAP
from .preprocessing import PreprocessConfig, normalize

log = logging.getLogger(__name__)


class FakeProbability(nn.Module):
    """A normalised N x 3 x S x S batch -> P(fake) for each image."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.sigmoid(self.net(x).float())


def onnx_bytes(model: nn.Module, image_size: int) -> bytes:
    """The model as one self-contained ONNX file (weights inside), with a dynamic batch dimension."""
    wrapped = FakeProbability(model).eval()
    example = torch.randn(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapped,
            (example,),
            dynamic_shapes=({0: batch},),
            input_names=["images"],
            output_names=["fake_probability"],
            dynamo=True,
            verbose=False,
        )
        path = Path(tmp) / "model.onnx"
        program.save(str(path), external_data=False)
        return path.read_bytes()


def quantize_int8(model_bytes: bytes) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model_bytes)
        logging.getLogger("root").setLevel(logging.ERROR)  # its advice to pre-process is for static quantisation
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        return dst.read_bytes()


def quantize_static_int8(model_bytes: bytes, calibration: np.ndarray, batch: int = 16) -> bytes:
    """Static int8 (ONNX Runtime's quantiser, QDQ format): weights per channel, and activation ranges fixed
    beforehand from `calibration` (normalised N x 3 x S x S images like those served), so that no range is
    measured while serving, unlike dynamic int8."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise ValueError("static int8 needs calibration images; none were given")

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.starts = iter(range(0, len(calibration), batch))

        def get_next(self):
            start = next(self.starts, None)
            return None if start is None else {"images": np.ascontiguousarray(calibration[start : start + batch])}

    with tempfile.TemporaryDirectory() as tmp:
        src, ready, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "ready.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model_bytes)
        logging.getLogger("root").setLevel(logging.ERROR)
        quant_pre_process(str(src), str(ready), skip_symbolic_shape=True)  # shapes and folded constants
        quantize_static(
            str(ready),
            str(dst),
            Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        return dst.read_bytes()


def calibration_images(prepared_dir: str | Path, pre: PreprocessConfig, n: int, split: str = "val") -> np.ndarray:
    """Up to `n` images of a prepared split (both classes, a fixed sample), normalised (and downscaled) for the
    model."""
    from .data import load_split

    data = load_split(prepared_dir, split)
    if data.images.shape[1] < pre.image_size:
        raise ValueError(
            f"{prepared_dir}: its images are {data.images.shape[1]} px, the model takes {pre.image_size} px"
        )
    pick = np.sort(np.random.default_rng(0).permutation(len(data.labels))[:n])
    nhwc = torch.from_numpy(np.ascontiguousarray(data.images[pick]))
    return normalize(nhwc.permute(0, 3, 1, 2), pre).numpy()


class OnnxModel:
    """ONNX Runtime session with the same call as the eager model: normalised float batch -> P(fake)."""

    def __init__(self, model_bytes: bytes, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"images": np.ascontiguousarray(x, dtype=np.float32)})[0]


def max_difference(model: nn.Module, onnx_model: OnnxModel, x: torch.Tensor) -> float:
    """Largest |P(fake) ONNX - P(fake) eager| on a normalised batch."""
    with torch.no_grad():
        eager = FakeProbability(model).eval()(x).numpy()
    return float(np.abs(onnx_model(x.numpy()) - eager).max())


def check_batch(pre: PreprocessConfig, n: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth random images (noise is easy to call fake with certainty, which would hide differences)."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (n, 3, 8, 8)).astype(np.float32)
    images = torch.nn.functional.interpolate(torch.from_numpy(low), size=(pre.image_size,) * 2, mode="bilinear")
    return normalize(images.round().clamp(0, 255).to(torch.uint8), pre)


def export(
    model: nn.Module,
    pre: PreprocessConfig,
    threshold: float,
    out_dir: str | Path,
    int8: bool = True,
    source: str = "",
    calibration: np.ndarray | None = None,
) -> dict:
    """model.onnx (fp32), model.int8.onnx (dynamic int8, with `int8`), model.int8-static.onnx (static int8,
    with `calibration` images) and export.json with each one's largest P(fake) difference from eager."""
    out_dir = Path(out_dir)
    model = model.eval()
    fp32 = onnx_bytes(model, pre.image_size)
    x = check_batch(pre)
    atomic_write_bytes(out_dir / "model.onnx", fp32)
    report = {
        "source": source,
        "preprocess": pre.to_dict(),
        "label_map": LABEL_MAP,
        "threshold": threshold,
        "output": "probability that the image is fake (label 1)",
        "input": "images: N x 3 x S x S, normalised",
        "files": {"fp32": "model.onnx"},
        "max_abs_difference_vs_eager": {"fp32": max_difference(model, OnnxModel(fp32), x)},
    }
    if int8:
        q = quantize_int8(fp32)
        atomic_write_bytes(out_dir / "model.int8.onnx", q)
        report["files"]["int8"] = "model.int8.onnx"
        report["max_abs_difference_vs_eager"]["int8"] = max_difference(model, OnnxModel(q), x)
    if calibration is not None:
        q = quantize_static_int8(fp32, calibration)
        atomic_write_bytes(out_dir / "model.int8-static.onnx", q)
        report["files"]["int8_static"] = "model.int8-static.onnx"
        report["calibration_images"] = len(calibration)
        report["max_abs_difference_vs_eager"]["int8_static"] = max_difference(model, OnnxModel(q), x)
    atomic_write_json(out_dir / "export.json", report)
    log.info("exported %s to %s: %s", source, out_dir, json.dumps(report["max_abs_difference_vs_eager"]))
    return report
