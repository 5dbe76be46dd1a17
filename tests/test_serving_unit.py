"""The serving logic without a server: routing, shadow scoring, hot swaps, the response format."""

import time

import numpy as np
import pytest
import torch
from torch import nn

from dfdetect.artifact import TrainedModel
from dfdetect.config import parse_params
from dfdetect.model_set import ModelSet, Scored
from dfdetect.preprocessing import PreprocessConfig
from dfdetect.registry import LoadedModel
from dfdetect.responses import frame_response


class Constant(nn.Module):
    """A model whose logit is fixed: tells which version answered."""

    def __init__(self, logit: float):
        super().__init__()
        self.logit = nn.Parameter(torch.tensor(logit), requires_grad=False)

    def forward(self, x):
        return self.logit.expand(x.shape[0])


class FakeRegistry:
    def __init__(self):
        self.aliases = {"champion": "1", "challenger": "2"}
        self.logits = {"1": -2.0, "2": 2.0, "3": 0.0}
        self.loads = 0

    def resolve(self, ref):
        return self.aliases.get(ref, ref)

    def __call__(self, ref):
        version = self.resolve(ref)
        self.loads += 1
        return LoadedModel(
            TrainedModel(Constant(self.logits[version]), PreprocessConfig(16), 0.5, {"real": 0, "fake": 1}),
            "det",
            version,
            ref,
            "run",
        )


def images(n=64):
    return np.zeros((n, 16, 16, 3), dtype=np.uint8)


def model_set(mode="none", fraction=0.5):
    params = parse_params({"serving": {"challenger_mode": mode, "challenger_fraction": fraction, "device": "cpu"}})
    registry = FakeRegistry()
    ms = ModelSet(params, registry, seed=1)
    ms.refresh()
    return ms, registry


def test_champion_alone_answers_when_mode_is_off():
    ms, _ = model_set("none")
    assert {s.version for s in ms.score(images())} == {"det/1"}
    assert ms.challenger is None


def test_ab_mode_splits_traffic_by_the_configured_fraction():
    ms, _ = model_set("ab", fraction=0.25)
    versions = [s.version for s in ms.score(images(2000))]
    assert 0.2 < versions.count("det/2") / len(versions) < 0.3
    by_version = {s.version: s.fake_probability for s in ms.score(images(50))}
    assert by_version["det/1"] == pytest.approx(1 / (1 + np.exp(2)), rel=1e-2)


def test_shadow_mode_scores_the_challenger_but_the_champion_answers():
    ms, _ = model_set("shadow")
    scored = ms.score(images(5))
    assert {s.version for s in scored} == {"det/1"}
    assert all(s.shadow["version"] == "det/2" and s.shadow["fake_probability"] > 0.8 for s in scored)


def test_a_promotion_is_picked_up_and_unchanged_aliases_load_nothing():
    ms, registry = model_set("none")
    loads = registry.loads
    assert ms.refresh() is False and registry.loads == loads
    registry.aliases["champion"] = "3"
    assert ms.refresh() is True and ms.primary.version == "3"
    assert ms.score(images(1))[0].version == "det/3"


def test_a_failing_poll_keeps_serving():
    import threading

    ms, registry = model_set("none")
    ms.params = parse_params({"serving": {"poll_interval_s": 0.5, "device": "cpu"}})
    registry.resolve = lambda ref: (_ for _ in ()).throw(ConnectionError("tracking server down"))
    stop = threading.Event()
    worker = threading.Thread(target=ms.watch, args=(stop,))
    worker.start()
    time.sleep(1.2)
    stop.set()
    worker.join(5)
    assert ms.score(images(1))[0].version == "det/1"


def test_response_keeps_the_original_format_with_fake_as_label_one():
    body = frame_response(7, Scored(0.9, 0.5, "det/4"), time.perf_counter())
    assert body["frameNumber"] == 7 and body["is_fake"] is True and body["modelVersion"] == "det/4"
    assert body["distribution"] == {"real": pytest.approx(0.1), "fake": pytest.approx(0.9)}
    assert body["confidence"] == pytest.approx(0.9) and body["processingTime"] >= 0
    real = frame_response(0, Scored(0.2, 0.5, "det/4"), time.perf_counter())
    assert real["is_fake"] is False and real["confidence"] == pytest.approx(0.8)
    assert body["verdict"] == "fake" and real["verdict"] == "real" and body["threshold"] == 0.5


@pytest.mark.parametrize(
    "p, verdict", [(0.2, "real"), (0.35, "review"), (0.55, "review"), (0.65, "review"), (0.66, "fake")]
)
def test_review_band_answers_review_between_its_bounds_and_keeps_is_fake(p, verdict):
    body = frame_response(0, Scored(p, 0.5, "det/4"), time.perf_counter(), review_band=(0.35, 0.65))
    assert body["verdict"] == verdict and body["is_fake"] is (p >= 0.5)  # the original field is unchanged
    assert frame_response(0, Scored(p, 0.5, "det/4"), time.perf_counter())["verdict"] != "review"


def test_ensemble_serves_the_mean_of_its_versions_and_follows_aliases():
    params = parse_params({"serving": {"ensemble": ["champion", "2"], "device": "cpu"}})
    registry = FakeRegistry()
    ms = ModelSet(params, registry)
    ms.refresh()
    scored = ms.score(images(3))
    assert scored[0].fake_probability == pytest.approx(0.5, abs=1e-3)  # mean of sigmoid(-2) and sigmoid(2)
    assert scored[0].version == "det/ensemble:1+2"
    loads = registry.loads
    assert ms.refresh() is False and registry.loads == loads
    registry.aliases["champion"] = "3"
    assert ms.refresh() is True and ms.score(images(1))[0].version == "det/ensemble:3+2"
    assert registry.loads == loads + 1  # version 2 was kept, only 3 was loaded


def test_ab_routing_per_request_keeps_a_videos_frames_on_one_version():
    from dfdetect.model_set import pick_arm

    ms, _ = model_set("ab", fraction=0.25)
    for arm, version in (("challenger", "det/2"), ("primary", "det/1")):
        assert {s.version for s in ms.score(images(40), arm)} == {version}  # one request, one version
    rng = np.random.default_rng(0)
    arms = [pick_arm(ms.params.serving, True, rng) for _ in range(4000)]
    assert 0.22 < arms.count("challenger") / len(arms) < 0.28
    assert {pick_arm(ms.params.serving, False, rng) for _ in range(50)} == {"primary"}  # no challenger loaded
    off, _ = model_set("none")
    assert {s.version for s in off.score(images(10), "challenger")} == {"det/1"}


def test_an_explanation_never_moves_or_changes_the_module_that_scores():
    """Grad-CAM runs on its own fp32 CPU copy: the serving module keeps its device, weights and identity."""
    from dfdetect.config import ModelParams
    from dfdetect.models import create_model

    torch.manual_seed(0)
    net = create_model(ModelParams(name="custom_cnn", pretrained=False))
    loaded = LoadedModel(
        TrainedModel(net, PreprocessConfig(32), 0.5, {"real": 0, "fake": 1}), "det", "1", "champion", "run"
    )
    params = parse_params({"serving": {"runtime": "torch", "device": "cpu"}})

    class One:
        def resolve(self, ref):
            return "1"

        def __call__(self, ref):
            return loaded

    ms = ModelSet(params, One())
    ms.refresh()
    served = ms.primary.model
    before = {k: v.detach().clone() for k, v in served.state_dict().items()}
    devices = {p.device for p in served.parameters()}
    probe = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    scores = ms.primary.predict(probe)
    out = ms.explain(probe[0])
    assert out["heatmap"].startswith("data:image/png;base64,")
    assert ms.primary.model is served and ms.primary.torch_model is not served
    assert {p.device for p in served.parameters()} == devices
    assert all(torch.equal(before[k], v) for k, v in served.state_dict().items())
    assert np.allclose(ms.primary.predict(probe), scores)


def test_overload_and_a_dead_batcher_answer_503_that_say_so_with_retry_after(monkeypatch):
    """BentoML replaces the text of any 5xx with "unexpected error"; the service answers these itself."""
    import asyncio
    import importlib
    import json

    from conftest import REPO

    from dfdetect.batching import BatcherDead, Overloaded

    monkeypatch.setenv("DFDETECT_PARAMS", str(REPO / "params.yaml"))
    service = importlib.import_module("serving.service")

    async def overloaded():
        raise Overloaded("waited 1200 ms for the model")

    async def dead():
        raise BatcherDead("the batcher stopped")

    for api, says in ((overloaded, "overloaded"), (dead, "unavailable")):
        response = asyncio.run(service.answers_errors(api)())
        assert response.status_code == 503 and response.headers["Retry-After"]
        assert json.loads(response.body)["error"].startswith(says)


def test_serving_workers_sets_the_bentoml_worker_count(tmp_path):
    """Each worker process builds its own Detector (models and batcher); the count comes from params."""
    import os
    import subprocess
    import sys

    import yaml
    from conftest import REPO

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["serving"]["workers"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = subprocess.run(
        [sys.executable, "-c", "import serving.service as s; print(s.Detector.config['workers'])"],
        cwd=REPO,
        env={**os.environ, "DFDETECT_PARAMS": str(tmp_path / "params.yaml")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "3"


def _asgi_post(app, path: str, body: bytes, content_type: str, query: bytes = b"") -> tuple[int, dict, dict]:
    """POST through an ASGI app in one event loop: (status, headers, JSON body)."""
    import asyncio
    import json

    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "query_string": query,
        "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())],
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), json.loads(data)


def test_the_guard_answers_a_direct_route_itself_from_the_checked_body_and_never_the_app():
    from dfdetect.http_guard import Answer, RequestGuard, Route

    seen = []

    async def app(scope, receive, send):
        raise AssertionError("the app was called for a direct route")

    async def handler(scope, body):
        seen.append((scope["query_string"], body))
        return Answer(201, {"bytes": len(body)}, {"X-Seen": "yes"})

    guard = RequestGuard(app, {"/raw": Route("raw", 10, content_types=("image/jpeg",))}, direct={"/raw": handler})
    status, headers, body = _asgi_post(guard, "/raw", b"12345", "image/jpeg", b"frameNumber=3")
    assert (status, body, headers[b"x-seen"]) == (201, {"bytes": 5}, b"yes")
    assert seen == [(b"frameNumber=3", b"12345")]
    # a body the route refuses never reaches the handler
    assert _asgi_post(guard, "/raw", b"12345678901", "image/jpeg")[0] == 413
    assert _asgi_post(guard, "/raw", b"12345", "text/plain")[0] == 415
    assert len(seen) == 1


@pytest.mark.parametrize(
    "query, answer",
    [
        (b"", (0, False)),
        (b"frameNumber=7&explain=true", (7, True)),
        (b"explain=0&other=x", (0, False)),
        (b"frameNumber=2147483647", (2**31 - 1, False)),
        (b"frameNumber=2147483648", "frameNumber"),
        (b"frameNumber=-1", "frameNumber"),
        (b"frameNumber=1e3", "frameNumber"),
        (b"explain=maybe", "explain"),
    ],
)
def test_direct_frame_query_reads_frame_number_and_explain_as_the_form_does(monkeypatch, query, answer):
    import importlib

    from conftest import REPO

    monkeypatch.setenv("DFDETECT_PARAMS", str(REPO / "params.yaml"))
    service = importlib.import_module("serving.service")
    if isinstance(answer, tuple):
        assert service.frame_query(query) == answer
    else:
        with pytest.raises(service.ApiError) as refused:
            service.frame_query(query)
        assert refused.value.status == 400 and refused.value.message.startswith(answer)
