"""Grad-CAM (Selvaraju et al., 2017) heatmaps: which regions pushed the model towards "fake".

The gradient of the fake logit with respect to the last convolution's feature maps weighs those maps; their
positive sum, upsampled to the input, is the heatmap. Works for every registered architecture (the backbone's
last Conv2d is the layer; of a patch model, `model.patch_blocks`, it is the scoring convolution, so the heatmap is
the positive part of its map of local scores), in fp32, on one image at a time.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .preprocessing import PreprocessConfig, to_model_input


def last_conv(model: nn.Module) -> nn.Module:
    # The backbone's (Detector.net): a residual branch's convolutions see noise residuals, not the face.
    convs = [m for m in getattr(model, "net", model).modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer: Grad-CAM needs one")
    return convs[-1]


def grad_cam(model: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, float]:
    """x: 1 x 3 x H x W model input -> (H x W heatmap in [0, 1], P(fake)).

    The gradient is taken with torch.autograd.grad, not a tensor hook plus backward(): a hook closure that
    refers back to its tensor makes a cycle through the autograd graph that Python's collector cannot free
    (the service grew by about 0.3 MB per explanation), and nothing accumulates in the parameters' .grad."""
    store: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, output):
        store.setdefault("maps", output)  # the full-size pass's maps where the model sees several scales

    handle = last_conv(model).register_forward_hook(keep)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logit = model(x.detach().float().requires_grad_(True)).reshape(-1)[0]
            maps = store.pop("maps")
            (grads,) = torch.autograd.grad(logit, maps)
    finally:
        handle.remove()
        model.train(was_training)
        store.clear()
    maps, grads, p = maps.detach(), grads.detach(), float(torch.sigmoid(logit.detach()))
    del logit  # the graph goes with it
    cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * maps).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    peak = cam.max()
    cam = cam / peak if peak > 0 else cam
    return cam.cpu().numpy(), p


def overlay(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The heatmap in the 'jet' colours over the image (both H x W)."""
    from matplotlib import colormaps

    colours = (colormaps["jet"](heat)[..., :3] * 255).astype(np.float32)
    return (rgb.astype(np.float32) * (1 - alpha) + colours * alpha).clip(0, 255).astype(np.uint8)


def explain_image(model: nn.Module, pre: PreprocessConfig, image: Image.Image, device: str = "cpu") -> dict:
    """Grad-CAM of one PIL image: the model-size input, the heatmap, the overlay and P(fake)."""
    shown = pre.square(image)  # exactly what the model sees
    heat, p = grad_cam(model.to(device).float(), to_model_input([shown], pre).to(device))
    return {"heatmap": heat, "overlay": overlay(shown, heat), "fake_probability": p}


def png_base64(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
