"""`bentoml serve` on 127.0.0.1, called over HTTP with real JPEGs; a promotion while requests run."""

import io
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import BIN, REPO, bentoml_serve, post_frame
from PIL import Image

from dfdetect import promotion, registry

pytestmark = pytest.mark.slow


def jpeg(path: Path) -> bytes:
    return path.read_bytes()


def test_health_reports_model_version_alias_and_device(service):
    body = requests.get(f"{service['url']}/health", timeout=5).json()
    assert body["status"] == "ok" and body["ready"] is True
    assert body["model"] == service["params"].registry.model_name and body["version"] == "1"
    assert body["alias"] == "champion" and body["device"] == "cpu"
    loaded = registry.load("champion", params=service["params"])
    point = body["operating_point"]  # what a verdict means: the policy chosen on validation and its rates
    assert body["threshold"] == pytest.approx(loaded.threshold) == pytest.approx(point["threshold"])
    assert point["policy"] == "eer" and 0 <= point["val_fpr"] <= 1 and 0 <= point["val_recall"] <= 1
    assert body["review_band"] == [0.0, 1.0]


def test_analyze_frame_answers_the_original_json(service, sample_root):
    fake = next((sample_root / "test" / "fake").iterdir())
    r = post_frame(service["url"], jpeg(fake), frameNumber="12")
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"frameNumber", "confidence", "distribution", "is_fake", "processingTime", "modelVersion"}
    assert body["frameNumber"] == 12 and body["modelVersion"] == f"{service['params'].registry.model_name}/1"
    assert body["distribution"]["real"] + body["distribution"]["fake"] == pytest.approx(1.0, abs=1e-5)
    loaded = registry.load("champion", params=service["params"])
    assert body["is_fake"] == (body["distribution"]["fake"] >= loaded.threshold)


def test_raw_body_endpoint_answers_as_the_multipart_one(service, sample_root):
    url = f"{service['url']}/inference/analyze-frame/raw"
    for path in [next((sample_root / "test" / label).iterdir()) for label in ("fake", "real")]:
        raw = requests.post(
            url, data=jpeg(path), params={"frameNumber": 7}, headers={"Content-Type": "image/jpeg"}, timeout=30
        )
        assert raw.status_code == 200, raw.text
        form = post_frame(service["url"], jpeg(path), frameNumber="7").json()
        body = raw.json()
        assert set(body) == set(form) and body["frameNumber"] == 7 and body["is_fake"] == form["is_fake"]
        assert body["distribution"]["fake"] == pytest.approx(form["distribution"]["fake"], abs=1e-6)
        assert raw.headers["X-Request-ID"] == body["requestId"] != form["requestId"]
    for query, field in (({"frameNumber": -1}, "frameNumber"), ({"explain": "maybe"}, "explain")):
        bad = requests.post(url, data=jpeg(path), params=query, headers={"Content-Type": "image/jpeg"}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"].startswith(field), bad.text
    # what is not an image is refused with a 4xx that says why, never fetched or parsed as anything else
    url_body = requests.post(url, data=b"http://127.0.0.1:1/secret", headers={"Content-Type": "image/jpeg"}, timeout=30)
    assert url_body.status_code == 400 and "error" in url_body.json()
    wrong_type = requests.post(url, data=jpeg(path), headers={"Content-Type": "text/plain"}, timeout=30)
    assert wrong_type.status_code == 415 and "image/jpeg" in wrong_type.json()["error"]
    assert len(wrong_type.headers["X-Request-ID"]) == 32  # a refusal carries its id too
    too_big = requests.post(
        url,
        data=b"\xff" * (int(service["params"].serving.max_upload_mb * 2**20) + 1),
        headers={"Content-Type": "image/jpeg"},
        timeout=30,
    )
    assert too_big.status_code == 413


def post_frames(url: str, images: list[bytes], **form) -> requests.Response:
    files = [("images", (f"f{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    return requests.post(f"{url}/inference/analyze-frames", files=files, data=form, timeout=60)


def test_batch_endpoint_answers_each_image_as_the_single_one(service, sample_root):
    paths = [p for label in ("fake", "real") for p in sorted((sample_root / "test" / label).iterdir())[:3]]
    r = post_frames(service["url"], [jpeg(p) for p in paths], frameNumber="10")
    assert r.status_code == 200, r.text
    answers = r.json()
    assert [a["index"] for a in answers] == list(range(len(paths)))
    for i, (path, body) in enumerate(zip(paths, answers)):
        single = post_frame(service["url"], jpeg(path), frameNumber=str(10 + i)).json()
        assert set(body) == set(single) | {"index"} and body["frameNumber"] == 10 + i
        assert body["is_fake"] == single["is_fake"] and body["modelVersion"] == single["modelVersion"]
        assert body["distribution"]["fake"] == pytest.approx(single["distribution"]["fake"], abs=1e-6)
    assert [a["frameNumber"] for a in post_frames(service["url"], [jpeg(paths[0])] * 2).json()] == [0, 1]


def test_batch_endpoint_refuses_a_bad_image_by_index_and_bounds_the_whole_request(service, sample_root):
    url, serving = service["url"], service["params"].serving
    good = jpeg(next((sample_root / "test" / "fake").iterdir()))
    bad = post_frames(url, [good, good[:300], good])  # a truncated second image
    assert bad.status_code == 400 and bad.json()["index"] == 1, bad.text
    assert bad.json()["error"].startswith("images[1]: not a readable image")
    too_many = post_frames(url, [good] * (serving.max_batch_images + 1))
    assert too_many.status_code == 400 and f"more than {serving.max_batch_images} files" in too_many.json()["error"]
    one_too_large = post_frames(url, [good, b"\xff" * (int(serving.max_upload_mb * 2**20) + 1)])
    assert one_too_large.status_code == 413 and one_too_large.json()["index"] == 1, one_too_large.text
    # each image under max_upload_mb, together over max_batch_mb: refused before any is decoded
    under_each = int(serving.max_upload_mb * 2**20) - 1024
    count = int(serving.max_batch_mb * 2**20 / under_each) + 2
    assert count <= serving.max_batch_images
    too_much = post_frames(url, [good + b"\0" * (under_each - len(good))] * count)
    assert too_much.status_code == 413 and "over the limit" in too_much.json()["error"]
    # small files that would decode to more than max_batch_megapixels together (6 megapixels each)
    flat = io.BytesIO()
    Image.new("L", (3000, 2000)).save(flat, "PNG")
    n = int(serving.max_batch_megapixels / 6) + 1
    started = time.monotonic()
    pixels = post_frames(url, [flat.getvalue()] * n)
    assert pixels.status_code == 400 and "serving.max_batch_megapixels" in pixels.json()["error"], pixels.text
    assert time.monotonic() - started < 5
    explain = post_frames(url, [good], explain="true")  # Grad-CAM is one image at a time: the single endpoint
    assert explain.status_code == 400 and "unexpected field 'explain'" in explain.json()["error"]
    wrong_frame = post_frames(url, [good], frameNumber="-1")
    assert wrong_frame.status_code == 400 and "frameNumber" in wrong_frame.json()["error"]
    assert post_frames(url, [good]).status_code == 200  # and it still serves


def test_explain_returns_a_grad_cam_overlay(service, sample_root):
    import base64

    fake = next((sample_root / "test" / "fake").iterdir())
    r = post_frame(service["url"], jpeg(fake), explain="true")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["heatmap"].startswith("data:image/png;base64,") and body["explainedBy"] == body["modelVersion"]
    png = Image.open(io.BytesIO(base64.b64decode(body["heatmap"].split(",", 1)[1])))
    size = service["params"].prepare.image_size
    assert png.size == (size, size)
    assert abs(body["fake_probability"] - body["distribution"]["fake"]) < 0.05  # fp32 explain vs bf16 serving
    assert "heatmap" not in post_frame(service["url"], jpeg(fake)).json()  # only when asked


def test_same_verdict_as_the_library(service, sample_root):
    """Serving preprocesses with the training code: its probability matches the library's, up to bf16."""
    from dfdetect.inference import Predictor
    from dfdetect.preprocessing import decode_image

    loaded = registry.load("champion", params=service["params"])
    predictor = Predictor.from_trained(loaded.trained, "registry")
    for path in sorted((sample_root / "test" / "real").iterdir())[:3]:
        expected = float(predictor.score([decode_image(path.read_bytes())])[0])
        served = post_frame(service["url"], jpeg(path)).json()["distribution"]["fake"]
        assert served == pytest.approx(expected, abs=0.02)


def _batch_histogram(url: str) -> tuple[float, float]:
    """(batches with one image, all batches) from the service's dfdetect_batch_size histogram."""
    values = {}
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("dfdetect_batch_size_bucket{") and 'le="1.0"' in line:
            values["one"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("dfdetect_batch_size_count"):
            values["all"] = float(line.rsplit(" ", 1)[1])
    return values.get("one", 0.0), values.get("all", 0.0)


def test_concurrent_requests_are_scored_in_shared_batches(service, sample_root):
    from concurrent.futures import ThreadPoolExecutor

    images = [jpeg(p) for p in sorted((sample_root / "test" / "fake").iterdir())[:48]]
    one_before, all_before = _batch_histogram(service["url"])
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda data: post_frame(service["url"], data), images))
    assert [r.status_code for r in answers] == [200] * len(images)
    one, batches = _batch_histogram(service["url"])
    assert 0 < batches - all_before < len(images)  # fewer model calls than requests
    assert batches - all_before > one - one_before  # and some call held several requests


def test_score_api_gives_the_frame_endpoint_probability_for_the_same_pixels(service, sample_root):
    from dfdetect.preprocessing import decode_image, resize_square

    path = next((sample_root / "test" / "real").iterdir())
    size = service["params"].prepare.image_size
    pixels = resize_square(decode_image(path.read_bytes()), size)
    r = requests.post(f"{service['url']}/score", json={"images": [pixels.tolist()]}, timeout=30)
    assert r.status_code == 200, r.text
    [row] = r.json()
    assert set(row) >= {"fake_probability", "threshold", "version"}
    assert row["fake_probability"] == pytest.approx(
        post_frame(service["url"], jpeg(path)).json()["distribution"]["fake"], abs=1e-5
    )
    bad = requests.post(f"{service['url']}/score", json={"images": [[[1, 2], [3, 4]]]}, timeout=30)
    assert bad.status_code == 400 and "N x S x S x 3" in bad.text


@pytest.mark.parametrize(
    "payload, name, status, message",
    [
        (b"this is not an image", "notes.jpg", 400, "not a readable image"),
        ("truncated", "cut.jpg", 400, "not a readable image"),
        ("bomb", "bomb.png", 400, "exceeds the limit"),
        ("large", "huge.png", 413, "over the limit"),
    ],
)
def test_bad_uploads_get_a_4xx_that_says_why(service, sample_root, payload, name, status, message):
    if payload == "truncated":
        payload = jpeg(next((sample_root / "test" / "fake").iterdir()))[:300]
    elif payload == "bomb":
        buf = io.BytesIO()
        Image.new("1", (9000, 9000)).save(buf, "PNG")
        payload = buf.getvalue()
    elif payload == "large":
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buf, "PNG")
        payload = buf.getvalue()
    r = post_frame(service["url"], payload, name=name)
    assert r.status_code == status, r.text
    assert message in r.text and "error" in r.text


def test_missing_field_is_a_400(service):
    # a multipart form without its file (a form-encoded body is a 415: tests/test_serving_hostile.py)
    r = requests.post(f"{service['url']}/inference/analyze-frame", files={"frameNumber": (None, "1")}, timeout=10)
    assert r.status_code == 400 and "image" in r.text


def test_a_promotion_reaches_the_running_service_without_a_failed_request(service, sample_root):
    image = jpeg(next((sample_root / "test" / "fake").iterdir()))
    statuses, versions, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            r = post_frame(service["url"], image)
            statuses.append(r.status_code)
            if r.status_code == 200:
                versions.append(r.json()["modelVersion"])

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        run = service["run"]
        registry.register(service["params"], run["models"], run["metrics"], run["prepared"])
        assert promotion.promote(service["params"], run["prepared"])["verdict"] == "promoted"
        name = service["params"].registry.model_name
        deadline = time.monotonic() + 30
        while not versions or versions[-1] != f"{name}/2":
            assert time.monotonic() < deadline, f"still answering {versions[-1:]}"
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert versions[0] == f"{name}/1" and versions[-1] == f"{name}/2"
    assert requests.get(f"{service['url']}/health", timeout=5).json()["version"] == "2"


@pytest.fixture(scope="module")
def clip(sample_root, tmp_path_factory):
    from conftest import write_video

    faces = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((sample_root / "test" / "fake").iterdir())[:8]]
    frames = [faces[i % len(faces)] for i in range(30)]
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", frames, fps=10)


def test_analyze_video_scores_sampled_frames_and_their_mean(service, clip):
    r = requests.post(
        f"{service['url']}/inference/analyze-video",
        files={"video": ("clip.mp4", clip.read_bytes(), "video/mp4")},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["frames"]) == service["params"].serving.video_frames
    assert body["frames"][0]["frameNumber"] == 0 and body["frames"][-1]["frameNumber"] == 29
    assert body["fake_probability"] == pytest.approx(np.mean([f["fake_probability"] for f in body["frames"]]), abs=1e-5)
    assert body["resolution"] == {"width": 64, "height": 64} and body["fps"] == pytest.approx(10)
    assert body["duration"] == pytest.approx(3.0, abs=0.2) and body["total_frames"] == 30
    # the video file's own content credentials (none here) and the verdict with the fixture's [0, 1] review band
    assert body["provenance"]["checked"] is True and body["provenance"]["present"] is False
    assert body["verdict"] == "review" and body["is_fake"] == (body["fake_probability"] >= body["threshold"])


def test_unsupported_video_is_a_400(service):
    r = requests.post(
        f"{service['url']}/inference/analyze-video",
        files={"video": ("x.mp4", b"\x00\x00\x00 ftypisom junk", "video/mp4")},
        timeout=30,
    )
    assert r.status_code == 400 and "not a supported video" in r.text


def test_metrics_count_requests_per_endpoint_and_predictions_per_version_and_label(service, sample_root):
    image = jpeg(next((sample_root / "test" / "real").iterdir()))
    post_frame(service["url"], image)
    raw = f"{service['url']}/inference/analyze-frame/raw"
    assert requests.post(raw, data=image, headers={"Content-Type": "image/jpeg"}, timeout=30).status_code == 200
    assert requests.post(raw, data=image, headers={"Content-Type": "text/plain"}, timeout=30).status_code == 415
    assert requests.post(f"{service['url']}/score", json={"images": [[[1]]]}, timeout=30).status_code == 400
    text = requests.get(f"{service['url']}/metrics", timeout=10).text
    # BentoML's own request metrics for its APIs; the image routes the guard answers itself have their own
    # latency histogram (by endpoint and status), and refusals their counter
    assert 'endpoint="/score"' in text and "bentoml_service_request_duration_seconds" in text
    for route in ("/inference/analyze-frame", "/inference/analyze-frame/raw"):
        assert f'dfdetect_direct_request_duration_seconds_count{{endpoint="{route}",http_response_code="200"}}' in text
    assert 'dfdetect_refused_requests_total{status="415"}' in text
    assert "dfdetect_predictions_total{" in text and f'version="{service["params"].registry.model_name}/' in text


def _review_count(url: str) -> float:
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith('dfdetect_verdicts_total{verdict="review"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_review_band_answers_review_keeps_is_fake_and_counts_on_metrics(service, sample_root):
    """The fixture's band is [0, 1]: every answer is 'review', is_fake still says which side of the threshold."""
    before = _review_count(service["url"])
    paths = [next((sample_root / "test" / label).iterdir()) for label in ("fake", "real")]
    bodies = [post_frame(service["url"], jpeg(p)).json() for p in paths]
    threshold = requests.get(f"{service['url']}/health", timeout=5).json()["threshold"]
    for body in bodies:
        assert body["verdict"] == "review" and body["is_fake"] == (body["distribution"]["fake"] >= threshold)
    assert _review_count(service["url"]) == before + len(bodies)


def test_package_builds_a_bento_with_the_wheel_and_the_endpoints(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "PATH": f"{BIN}:{os.environ['PATH']}"}
    done = subprocess.run(
        [str(BIN / "dfdetect"), "package"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    tag = done.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    bento = tmp_path / "bentoml" / "bentos" / name / version
    assert (bento / "env" / "python" / "wheels" / "dfdetect-0.1.0-py3-none-any.whl").exists()
    openapi = (bento / "apis" / "openapi.yaml").read_text()
    assert "/inference/analyze-frame" in openapi and "/inference/analyze-video" in openapi


def test_face_crop_mode_scores_the_face_and_refuses_a_frame_without_one(service, tmp_path):
    """serving.face_crop: the served model sees the face crop `prepare` would make (same code and settings)."""
    from skimage import data as skdata
    from test_faces import ASTRONAUT_FACE

    from dfdetect.faces import iou

    raw = {**service["raw"], "serving": {**service["raw"]["serving"], "face_crop": True, "max_upload_mb": 2}}
    photo, blank = io.BytesIO(), io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(photo, "JPEG", quality=90)
    Image.new("RGB", (320, 240), (120, 140, 160)).save(blank, "JPEG")
    with bentoml_serve(raw, service["run"]["uri"], tmp_path) as (url, wait_for):
        wait_for(ready=True)  # the champion promoted by the `service` fixture
        r = post_frame(url, photo.getvalue(), name="astronaut.jpg")
        assert r.status_code == 200, r.text
        face = r.json()["face"]
        assert iou((face["x"], face["y"], face["width"], face["height"]), ASTRONAUT_FACE) > 0.6
        none = post_frame(url, blank.getvalue(), name="wall.jpg")
        assert none.status_code == 422 and "no face found" in none.text


def test_content_credentials_are_reported_beside_the_models_score(service, sample_root):
    """C2PA over HTTP: a valid manifest, an AI-generation declaration, a tampered image (hash mismatch) and no
    manifest at all; the model's P(fake) is answered in every case (signing leaves the pixels as they were)."""
    from c2pa_signing import CLAIM_GENERATOR, sign_image, tamper

    plain = jpeg(next((sample_root / "test" / "real").iterdir()))
    unsigned = post_frame(service["url"], plain).json()
    assert unsigned["provenance"]["present"] is False and unsigned["provenance"]["valid"] is None
    signed = post_frame(service["url"], sign_image(plain)).json()
    credentials = signed["provenance"]
    assert (
        credentials["present"] and credentials["valid"] and credentials["claim_generator"].startswith(CLAIM_GENERATOR)
    )
    assert credentials["ai_generated"] is False and credentials["trusted"] is False  # no trust anchors configured
    assert signed["distribution"]["fake"] == pytest.approx(unsigned["distribution"]["fake"], abs=1e-6)
    declared = post_frame(service["url"], sign_image(plain, ai_generated=True)).json()
    assert declared["provenance"]["ai_generated"] is True and "trainedAlgorithmicMedia" in str(
        declared["provenance"]["digital_source_type"]
    )
    assert "fake" in declared["distribution"] and declared["verdict"] in ("fake", "real", "review")
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(noisy, "JPEG")
    tampered = post_frame(service["url"], tamper(sign_image(noisy.getvalue()))).json()
    assert tampered["provenance"]["present"] and tampered["provenance"]["valid"] is False
    assert "assertion.dataHash.mismatch" in [e["code"] for e in tampered["provenance"]["errors"]]
    batch = post_frames(service["url"], [plain, sign_image(plain, ai_generated=True)])
    assert [b["provenance"]["ai_generated"] for b in batch.json()] == [False, True]
