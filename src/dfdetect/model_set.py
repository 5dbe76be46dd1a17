"""The models the BentoML service (serving/service.py) answers with: registered versions on a fast runtime,
the champion/challenger routing, and hot swaps when an alias moves. Its JSON is in responses.py."""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from . import runtime
from .config import Params
from .preprocessing import PreprocessConfig, normalize
from .registry import LoadedModel

log = logging.getLogger(__name__)


class ServedModel:
    """A registered version ready to score uint8 batches. Runtimes: ONNX Runtime fp32 (`auto` on the CPU: 3.4x
    eager fp32 PyTorch for EfficientNet-Lite0 here), PyTorch with bf16 + channels_last on a CPU that has native
    bf16 or fp16 on CUDA (`auto` there), or ONNX Runtime with dynamic int8."""

    def __init__(self, loaded: LoadedModel, device: str = "auto", runtime_name: str = "auto", precision: str = "auto"):
        self.name, self.version, self.threshold = loaded.name, loaded.version, loaded.threshold
        self.operating_point = loaded.trained.operating_point  # the threshold's policy and validation rates
        self.preprocess: PreprocessConfig = loaded.preprocess
        if runtime_name == "auto":  # ONNX Runtime is 3-4x eager PyTorch on these CPUs (benchmarks/serving.py)
            runtime_name = "torch" if runtime.resolve(device).device.type == "cuda" else "onnx"
        self.runtime_name = runtime_name
        if runtime_name == "torch":
            # Grad-CAM needs an fp32 module with gradients on the CPU: its own copy, so an explanation can
            # never move or change the module that scores (a .cpu() on it would break the next CUDA batch).
            self.torch_model = copy.deepcopy(loaded.model).cpu().eval()
            self.rt = runtime.resolve(device, precision, "auto" if precision == "auto" else False)
            runtime.flush_denormals(self.rt.device)
            self.model = loaded.model.to(self.rt.device, memory_format=self.rt.memory_format()).eval()
        else:  # ONNX Runtime on the CPU, exported from this very version at load time
            from .export import OnnxModel, onnx_bytes, quantize_int8

            self.torch_model = loaded.model.cpu().eval()  # only Grad-CAM uses it: ONNX Runtime scores
            self.rt = runtime.resolve("cpu", "fp32", False)
            graph = onnx_bytes(loaded.model.eval(), self.preprocess.image_size)
            self.model = OnnxModel(quantize_int8(graph) if runtime_name == "onnx-int8" else graph)

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}"

    def predict(self, images: np.ndarray) -> np.ndarray:
        """N x S x S x 3 uint8 (any S) -> P(fake) per image."""
        images = np.ascontiguousarray(images)
        if not images.flags.writeable:  # e.g. a memory-mapped cache: torch wants writable memory
            images = images.copy()
        x = torch.from_numpy(images).permute(0, 3, 1, 2).to(self.rt.device)
        size = self.preprocess.image_size
        if x.shape[-1] != size or x.shape[-2] != size:  # a swap to a model of another input size
            x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            x = x.round().clamp(0, 255).to(torch.uint8)
        x = normalize(x, self.preprocess).contiguous(memory_format=self.rt.memory_format())
        if self.runtime_name != "torch":
            return self.model(x.numpy())
        with torch.inference_mode(), self.rt.autocast():
            return torch.sigmoid(self.model(x).float()).cpu().numpy()


class Ensemble:
    """The mean P(fake) of several served versions, answering as one model (threshold: their mean)."""

    def __init__(self, members: list[ServedModel]):
        self.members = members
        first = members[0]
        self.name, self.preprocess, self.rt, self.runtime_name = (
            first.name,
            first.preprocess,
            first.rt,
            first.runtime_name,
        )
        self.version = "+".join(m.version for m in members)
        self.threshold = float(np.mean([m.threshold for m in members]))
        self.operating_point = {"policy": "mean of the members' thresholds", "threshold": self.threshold}

    @property
    def label(self) -> str:
        return f"{self.name}/ensemble:{self.version}"

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.mean([m.predict(images) for m in self.members], axis=0)


class Loader(Protocol):
    def resolve(self, ref: str) -> str: ...  # alias or version -> version

    def __call__(self, ref: str) -> LoadedModel: ...


@dataclass
class Scored:
    fake_probability: float
    threshold: float
    version: str  # name/version that answered
    shadow: dict | None = None  # the challenger's score in shadow mode

    @property
    def is_fake(self) -> bool:
        return self.fake_probability >= self.threshold


class ModelSet:
    """The served champion (and challenger), kept in step with the registry by `refresh`.

    A new version is loaded completely before it replaces the old one in a single assignment, so requests in
    flight finish on the model they started with and no request fails during a promotion.
    """

    def __init__(self, params: Params, loader: Loader, seed: int = 0):
        self.params, self.loader = params, loader
        self.primary: ServedModel | Ensemble | None = None
        self.challenger: ServedModel | None = None
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self.primary is not None

    def _fresh(self, ref: str, current: ServedModel | None) -> ServedModel:
        if current is not None and self.loader.resolve(ref) == current.version:
            return current  # the cheap check: no download when nothing moved
        return ServedModel(self.loader(ref), self.params.serving.device, self.params.serving.runtime)

    def refresh(self) -> bool:
        """Follow the aliases; True when a served version changed."""
        with self._lock:
            before = (self.primary and self.primary.version, self.challenger and self.challenger.version)
            if self.params.serving.ensemble:
                old = {m.version: m for m in self.primary.members} if isinstance(self.primary, Ensemble) else {}
                members = []
                for ref in self.params.serving.ensemble:
                    version = self.loader.resolve(ref)
                    members.append(old.get(version) or self._fresh(ref, None))
                if not isinstance(self.primary, Ensemble) or [m.version for m in members] != [
                    m.version for m in self.primary.members
                ]:
                    self.primary = Ensemble(members)
            else:
                self.primary = self._fresh(self.params.serving.alias, self.primary)
            if self.params.serving.challenger_mode != "none":
                try:
                    candidate = self._fresh("challenger", self.challenger)
                except Exception as exc:  # no challenger right now: serve the champion alone
                    log.info("no challenger served: %s", exc)
                    candidate = None
                self.challenger = None if candidate is None or candidate.version == self.primary.version else candidate
            after = (self.primary.version, self.challenger and self.challenger.version)
        if after != before:
            log.info("serving %s (challenger %s, mode %s)", after[0], after[1], self.params.serving.challenger_mode)
        return after != before

    def watch(self, stop: threading.Event) -> None:
        """Poll the registry until `stop` is set; a failed poll keeps the models being served."""
        while not stop.wait(self.params.serving.poll_interval_s):
            try:
                self.refresh()
            except Exception as exc:
                log.warning("registry poll failed, still serving %s: %s", self.primary and self.primary.label, exc)

    def score(self, images: np.ndarray, arm: str = "auto") -> list[Scored]:
        """Score a batch. `arm`: "primary" or "challenger" (in A/B mode: every image of the call goes to that
        version; the HTTP service draws one arm per request, so a video's frames share one version), or "auto"
        (A/B drawn per image)."""
        primary, challenger = self.primary, self.challenger  # one consistent pair for the whole batch
        if primary is None:
            raise RuntimeError("no model loaded yet")
        mode = self.params.serving.challenger_mode if challenger is not None else "none"
        if mode == "ab" and arm == "challenger":
            return [Scored(float(v), challenger.threshold, challenger.label) for v in challenger.predict(images)]
        p = primary.predict(images)
        results = [Scored(float(v), primary.threshold, primary.label) for v in p]
        if mode == "shadow":
            q = challenger.predict(images)
            for r, v in zip(results, q):
                r.shadow = {"version": challenger.label, "fake_probability": float(v)}
        elif mode == "ab" and arm == "auto":
            to_challenger = self._rng.random(len(images)) < self.params.serving.challenger_fraction
            if to_challenger.any():
                q = challenger.predict(images[to_challenger])
                for i, v in zip(np.flatnonzero(to_challenger), q):
                    results[i] = Scored(float(v), challenger.threshold, challenger.label)
        return results

    def explain(self, image: np.ndarray) -> dict:
        """Grad-CAM of one uint8 image with the primary version (the first member of an ensemble)."""
        from .explain import grad_cam, overlay, png_base64

        primary = self.primary
        if primary is None:
            raise RuntimeError("no model loaded yet")
        model = primary.members[0] if isinstance(primary, Ensemble) else primary
        x = normalize(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None], model.preprocess)
        with self._lock:  # one backward pass at a time through the shared module
            heat, p = grad_cam(model.torch_model, x)
        return {
            "heatmap": png_base64(overlay(image, heat)),
            "explainedBy": model.label,
            "fake_probability": round(p, 6),
        }

    def info(self) -> dict:
        primary, challenger = self.primary, self.challenger
        return {
            "ready": primary is not None,
            "model": primary and primary.name,
            "version": primary and primary.version,
            "alias": self.params.serving.alias,
            "device": primary and str(primary.rt.device),
            "precision": primary and primary.rt.precision,
            "runtime": primary and primary.runtime_name,
            "image_size": primary and primary.preprocess.image_size,
            "face_margin": primary and primary.preprocess.face_margin,
            "threshold": primary and primary.threshold,
            "operating_point": primary and primary.operating_point,
            "review_band": self.params.serving.review_band,
            "challenger": challenger and challenger.version,
            "challenger_mode": self.params.serving.challenger_mode,
        }


def pick_arm(serving, has_challenger: bool, rng: np.random.Generator) -> str:
    """Which version answers one request in A/B mode: the challenger with probability challenger_fraction."""
    if serving.challenger_mode == "ab" and has_challenger and rng.random() < serving.challenger_fraction:
        return "challenger"
    return "primary"


class RegistryLoader:
    """Loads versions from the MLflow registry; `resolve` is the cheap check the poller makes first.

    The client is made on first use, not here: a registry that is down at start-up must leave the service
    running and not ready (the poll retries), never stop it from starting."""

    def __init__(self, params: Params):
        self.params = params
        self.name = params.registry.model_name
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from .registry import client_for

            self._client = client_for(self.params)
        return self._client

    def resolve(self, ref: str) -> str:
        from .registry import get_version

        return str(get_version(self.client, self.name, ref).version)

    def __call__(self, ref: str) -> LoadedModel:
        from .registry import load_version

        return load_version(self.client, self.name, ref)
