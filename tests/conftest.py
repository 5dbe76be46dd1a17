import json
import shutil
from pathlib import Path

import pytest

from dfdetect.config import parse_params
from dfdetect.sample_data import generate

REPO = Path(__file__).resolve().parents[1]


def last_json(output: str):
    """The JSON object a command prints last, after any logs (it starts on a line that is exactly "{")."""
    lines = output.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))


def small_params(**sections):
    """Params for fast tests: small images, few epochs, no MLflow model logging unless asked."""
    raw = {
        "seed": 7,
        "prepare": {"image_size": 48, "min_size": 16},
        "train": {"epochs": 3, "batch_size": 16, "lr": 0.002, "early_stopping_patience": 0},
        "mlflow": {"log_model": False},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_params(raw, "test params")


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample") / "data"
    generate(root, {"train": 24, "val": 8, "test": 8}, size=64, seed=3)
    return root


@pytest.fixture
def data_copy(sample_root, tmp_path) -> Path:
    """A private copy of the small sample data set that a test may damage."""
    dst = tmp_path / "data"
    shutil.copytree(sample_root, dst)
    return dst


@pytest.fixture(scope="session")
def prepared_small(sample_root, tmp_path_factory) -> Path:
    from dfdetect.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "prepared"
    prepare(sample_root, out, small_params().prepare)
    return out


@pytest.fixture(scope="session")
def tracked_run(prepared_small, tmp_path_factory):
    """A small trained and evaluated model, tracked in a SQLite MLflow store: what `register` starts from."""
    from dfdetect.evaluate import evaluate
    from dfdetect.train import train

    root = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    params = small_params(mlflow={"log_model": True, "tracking_uri": uri}, train={"epochs": 2})
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        train(params, prepared_small, root / "models", root / "history.csv")
        evaluate(params, prepared_small, root / "models", root / "eval", root / "eval" / "metrics.json", root / "plots")
    return {"params": params, "uri": uri, "prepared": prepared_small, "models": root / "models",
            "metrics": root / "eval" / "metrics.json", "root": root}


def write_video(path, frames, fps=10):
    """An MPEG-4 video of the given RGB frames (PyAV's bundled FFmpeg), for video tests."""
    import av
    import numpy as np

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
