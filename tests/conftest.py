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


def face_frames(n: int, fake: bool, seed: int, size=(240, 320)) -> list:
    """Frames of a 'video' of a real face photo (scikit-image's astronaut) drifting over a plain background;
    a fake one has its inner face blurred and colour-shifted, the traces a face swap leaves."""
    import numpy as np
    from PIL import Image, ImageFilter
    from skimage import data

    rng = np.random.default_rng(seed)
    face = Image.fromarray(data.astronaut()[20:220, 120:330])  # the face is about 95 px wide in it
    if fake:
        inner = face.crop((55, 45, 150, 140)).filter(ImageFilter.GaussianBlur(2.5))
        inner = Image.fromarray(np.clip(np.asarray(inner).astype(int) + [25, -10, -15], 0, 255).astype(np.uint8))
        face = face.copy()
        face.paste(inner, (55, 45))
    face = np.asarray(face)
    background = rng.integers(40, 200, size=3)
    frames = []
    for i in range(n):
        canvas = np.empty((*size, 3), np.uint8)
        canvas[:] = background
        y, x = 10 + (i * 3 + seed) % 25, 20 + (i * 7 + seed * 5) % 80
        canvas[y:y + face.shape[0], x:x + face.shape[1]] = face
        frames.append(canvas)
    return frames


def make_face_videos(root, per_class: dict[str, int], frames: int = 6, seed: int = 0):
    """data/{split}/{real,fake}/clip_*.mp4 made of face_frames."""
    k = seed
    for split, count in per_class.items():
        for class_name in ("real", "fake"):
            folder = root / split / class_name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                k += 1
                write_video(folder / f"{class_name}_{split}_{i:03d}.mp4", face_frames(frames, class_name == "fake", k))
    return root
