import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from dfdetect.config import parse_params
from dfdetect.sample_data import generate

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def last_json(output: str):
    """The JSON object a command prints last, after any logs (it starts on a line that is exactly "{")."""
    lines = output.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    # raw_decode: text after the object (a later CliRunner call's stale log handler complaining) is not JSON
    return json.JSONDecoder().raw_decode("\n".join(lines[start:]))[0]


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
    return {
        "params": params,
        "uri": uri,
        "prepared": prepared_small,
        "models": root / "models",
        "metrics": root / "eval" / "metrics.json",
        "root": root,
    }


def write_video(path, frames, fps=10, codec="mpeg4", options: dict | None = None):
    """A video of the given RGB frames (PyAV's bundled FFmpeg; the container from the suffix), for video tests.
    `options` go to the encoder, e.g. {"g": "12", "bf": "3"} for libx264's keyframe interval and B-frames."""
    import av
    import numpy as np

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
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
        canvas[y : y + face.shape[0], x : x + face.shape[1]] = face
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


# --- a running `bentoml serve` (tests/test_serving*.py share one: starting it and promoting costs ~30 s) ---


@contextlib.contextmanager
def bentoml_serve(raw: dict, tracking_uri: str, root: Path):
    """`bentoml serve` with these params on a free port; yields (url, wait_for_ready); stopped with its workers."""
    import yaml

    from dfdetect import servers

    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    env = {
        **os.environ,
        "DFDETECT_PARAMS": str(params_file),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "BENTOML_HOME": str(root / "bentoml"),
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    log = open(root / "serve.log", "wb")
    for attempt in range(3):  # a free port can be taken by another process before the server binds it
        port = servers.free_port()
        proc = subprocess.Popen(
            [str(BIN / "bentoml"), "serve", "serving.service:Detector", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            break  # still running: it bound its sockets
        if b"Address already in use" not in (root / "serve.log").read_bytes() or attempt == 2:
            break
    url = f"http://127.0.0.1:{port}"

    import requests

    def wait_for(ready: bool):
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (root / "serve.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/health", timeout=2).json().get("ready") is ready:
                    return
            except (requests.RequestException, ValueError):
                pass
            assert time.monotonic() < deadline, (root / "serve.log").read_text()[-3000:]
            time.sleep(0.5)

    wait_for.process = proc  # for a test that kills the service itself (kill_service)
    try:
        yield url, wait_for
    finally:
        servers.Server("bentoml", proc, url, root / "serve.log").stop()  # its workers too
        log.close()


def kill_service(proc: subprocess.Popen) -> None:
    """SIGKILL to a served service and every one of its workers at once, as a crash of the pod would."""
    import psutil

    from dfdetect.servers import descendants

    workers = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for p in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait(20)


def post_frame(url, data: bytes, name="face.jpg", **form):
    import requests

    return requests.post(
        f"{url}/inference/analyze-frame", files={"image": (name, data, "image/jpeg")}, data=form, timeout=30
    )


def require_server(what: str, available: bool):
    """Skip a test whose server is not installed here; fail instead under .ci/run (DFDETECT_REQUIRE_SERVERS=1)."""
    if not available:
        message = f"{what} is not installed (.ci/run installs it)"
        if os.environ.get("DFDETECT_REQUIRE_SERVERS") == "1":
            pytest.fail(message)
        pytest.skip(message)


def serving_params(tracked_run) -> dict:
    raw = tracked_run["params"].model_dump(mode="json")
    raw["registry"] = {"model_name": f"served-{uuid.uuid4().hex[:8]}"}
    raw["promotion"].update(floors={}, min_improvement=0.0)
    raw["serving"].update(
        poll_interval_s=1,
        max_upload_mb=0.1,
        max_batch_mb=0.5,
        device="cpu",
        header_timeout_s=3,
        body_timeout_s=3,
        upload_timeout_s=8,
    )
    raw["serving"]["review_band"] = [0.0, 1.0]  # every answer is "review": is_fake must not change with it
    return raw


@pytest.fixture(scope="session")
def service(tracked_run, sample_root, tmp_path_factory):
    import requests

    from dfdetect import promotion, registry

    root = tmp_path_factory.mktemp("serving")
    raw = serving_params(tracked_run)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    params = parse_params(raw)
    with bentoml_serve(raw, tracked_run["uri"], root) as (url, wait_for):
        # Started before anything is promoted: it runs, but is not ready (the Kubernetes readiness probe).
        wait_for(ready=False)
        assert requests.get(f"{url}/readyz", timeout=10).status_code == 503
        assert requests.get(f"{url}/livez", timeout=10).status_code == 200
        early = post_frame(url, next((sample_root / "test" / "fake").iterdir()).read_bytes())
        assert early.status_code == 503 and "no model loaded yet" in early.json()["error"], early.text
        assert early.headers.get("Retry-After")
        registry.register(params, tracked_run["models"], tracked_run["metrics"], tracked_run["prepared"])
        promotion.promote(params, tracked_run["prepared"])
        wait_for(ready=True)  # the poll picks the champion up, no restart
        assert requests.get(f"{url}/readyz", timeout=10).status_code == 200
        yield {"url": url, "params": params, "run": tracked_run, "log": root / "serve.log", "raw": raw}


@pytest.fixture(scope="module")
def postgres():
    """A throw-away PostgreSQL cluster on a loopback port (dfdetect.servers), stopped when the module ends."""
    from dfdetect import servers

    try:
        servers.postgres_bin("initdb")
        available = True
    except servers.ServerError:
        available = False
    require_server("PostgreSQL (Debian package postgresql)", available)
    root = Path(tempfile.mkdtemp(prefix="dfdetect-pg-"))  # under /tmp: the postgres user must reach it
    os.chmod(root, 0o755)
    server = servers.start_postgres(root / "data", log_dir=root)
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


# --- hostile uploads (test_decode_limits.py, test_serving_hostile.py) ---------------------------------------


def la_tiff() -> bytes:
    """A grey TIFF with pre-multiplied alpha: PIL opens and loads it ("La") but cannot convert it to RGB."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("LA", (32, 32)).save(buf, format="TIFF")
    data = bytearray(buf.getvalue())
    entry = data.find((338).to_bytes(2, "little") + (3).to_bytes(2, "little"))  # ExtraSamples, SHORT
    assert entry > 0
    data[entry + 8 : entry + 10] = (1).to_bytes(2, "little")  # 2 (unassociated alpha) -> 1 (pre-multiplied)
    return bytes(data)


def many_scan_jpeg(extra_scans: int, size=(64, 64)) -> bytes:
    """A progressive JPEG whose last scan is repeated: small, valid, one more pass per copy."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (90, 120, 150)).save(buf, format="JPEG", progressive=True, quality=80)
    data = buf.getvalue()
    last_scan = data.rfind(b"\xff\xda")
    scan = data[last_scan:-2]  # up to EOI
    return data[:-2] + scan * extra_scans + b"\xff\xd9"


def write_mjpeg_video(path, sizes, container="avi", codec_tag: bytes | None = None):
    """An MJPEG video of frames of the given sizes (a stream may change size midway); the header declares the
    first frame's size. With `codec_tag`, the AVI's MJPG codec tag is replaced (a codec FFmpeg does not know)."""
    import io
    from fractions import Fraction

    import av
    from PIL import Image

    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream("mjpeg", rate=10)
        stream.width, stream.height = sizes[0]
        stream.pix_fmt = "yuvj420p"
        stream.time_base = Fraction(1, 10)
        for i, size in enumerate(sizes):
            buf = io.BytesIO()
            Image.new("RGB", size, (i * 20, 80, 160)).save(buf, format="JPEG", quality=50)
            packet = av.Packet(buf.getvalue())
            packet.stream, packet.pts, packet.dts = stream, i, i
            out.mux(packet)
    if codec_tag is not None:
        path.write_bytes(path.read_bytes().replace(b"MJPG", codec_tag))
    return path
