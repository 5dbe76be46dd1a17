"""Drift against the reference profile stored with a model (Evidently): reported on shifted traffic, not on a
sample of the reference's own distribution."""

import json

import numpy as np
import pytest

from dfdetect.drift import DriftError, brightness, check_drift, comparable_columns


def rows(n, seed, light=0.5, size=128, fake_rate=0.5):
    rng = np.random.default_rng(seed)
    fake = rng.random(n) < fake_rate
    return [
        {
            "fake_probability": float(rng.beta(5, 2) if f else rng.beta(2, 5)),
            "verdict": "fake" if f else "real",
            "width": int(rng.normal(size, size / 10)),
            "height": int(rng.normal(size, size / 10)),
            "brightness": float(rng.normal(light, 0.08)),
        }
        for f in fake
    ]


def _projected_input(model, layer, images: np.ndarray) -> np.ndarray:
    """What `embed` should give: `layer`'s input (averaged over the map where it is one), projected by the matrix
    seeded with the feature width, computed here independently of drift.py."""
    import torch

    from dfdetect.drift import EMBEDDING_DIMS
    from dfdetect.preprocessing import PreprocessConfig, normalize

    seen = []
    hook = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(normalize(torch.from_numpy(images).permute(0, 3, 1, 2), PreprocessConfig(images.shape[1])))
    hook.remove()
    features = (seen[0].mean(dim=(2, 3)) if seen[0].dim() == 4 else seen[0]).double().numpy()
    projection = np.random.default_rng(features.shape[1]).normal(size=(features.shape[1], EMBEDDING_DIMS))
    return features @ projection / np.sqrt(features.shape[1])


def test_no_drift_on_a_sample_of_the_reference_distribution(tmp_path):
    summary = check_drift({"rows": rows(400, 0)}, rows(200, 1), 0.5, tmp_path)
    assert summary["drifted"] is False and summary["drift_share"] < 0.5
    assert set(summary["columns"]) == {"fake_probability", "verdict", "width", "height", "brightness"}
    assert (tmp_path / "drift.html").stat().st_size > 0 and json.loads((tmp_path / "drift.json").read_text())


def test_drift_on_darker_larger_images_with_more_fake_verdicts(tmp_path):
    shifted = rows(200, 1, light=0.25, size=512, fake_rate=0.9)
    summary = check_drift({"rows": rows(400, 0)}, shifted, 0.5, tmp_path)
    assert summary["drifted"] is True and summary["drift_share"] >= 0.8
    assert all(summary["columns"][c]["drifted"] for c in ("width", "height", "brightness", "verdict"))
    assert summary["current_fake_rate"] > summary["reference_fake_rate"] + 0.2


def test_only_columns_both_sides_have_are_compared_and_nothing_to_compare_is_an_error(tmp_path):
    reference = [{**r, "jpeg_quality": None} for r in rows(50, 0)]
    current = [{**r, "jpeg_quality": 90} for r in rows(50, 1)]
    numeric, categorical = comparable_columns(reference, current)
    assert "jpeg_quality" not in numeric and categorical == ["verdict"]
    with pytest.raises(DriftError, match="nothing to compare"):
        check_drift({"rows": []}, current, 0.5, tmp_path)


def test_brightness_is_the_mean_pixel_of_each_input():
    images = np.stack([np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)])
    assert list(brightness(images)) == [0.0, 1.0]


def test_embedding_drift_is_a_classifier_telling_the_two_apart():
    from dfdetect.drift import embedding_drift

    rng = np.random.default_rng(0)
    reference = rng.normal(0, 1, (200, 16))
    same = embedding_drift(reference, rng.normal(0, 1, (100, 16)))
    moved = embedding_drift(reference, rng.normal(0.8, 1, (100, 16)))
    assert same["drifted"] is False and same["classifier_auc"] < 0.65
    assert moved["drifted"] is True and moved["classifier_auc"] > 0.8
    assert embedding_drift(reference, reference[:3])["classifier_auc"] is None  # too few to judge


def test_embeddings_are_the_models_penultimate_features_projected_and_count_as_a_column(tmp_path):
    import torch

    from dfdetect.config import ModelParams
    from dfdetect.drift import EMBEDDING_DIMS, embed
    from dfdetect.models import create_model
    from dfdetect.preprocessing import PreprocessConfig

    torch.manual_seed(0)
    model = create_model(ModelParams(name="custom_cnn", pretrained=False))
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    model.train()
    vectors = embed(model, images, PreprocessConfig(32))
    assert model.training  # scored in eval mode, handed back as it came
    assert vectors.shape == (6, EMBEDDING_DIMS) and np.allclose(vectors, embed(model, images, PreprocessConfig(32)))
    two_scales = create_model(ModelParams(name="custom_cnn", pretrained=False, scales=[1, 2]))
    two_scales.load_state_dict(model.state_dict())  # one vector per image: the full-size pass's features
    assert np.allclose(embed(two_scales, images, PreprocessConfig(32)), vectors)
    reference = {
        "rows": [
            {**r, "embedding": list(v)} for r, v in zip(rows(40, 0), np.random.default_rng(1).normal(0, 1, (40, 16)))
        ]
    }
    summary = check_drift(reference, rows(40, 1), 0.5, tmp_path, np.random.default_rng(2).normal(3, 1, (40, 16)))
    assert summary["columns"]["embeddings"]["drifted"] is True
    moved = sum(c["drifted"] for c in summary["columns"].values())
    assert summary["drift_share"] == pytest.approx(moved / 6, abs=1e-6)  # the embeddings are a sixth column


def test_a_patch_models_embeddings_are_its_local_features_averaged_over_the_map():
    import torch

    from dfdetect.config import ModelParams
    from dfdetect.drift import embed
    from dfdetect.models import create_model
    from dfdetect.preprocessing import PreprocessConfig

    torch.manual_seed(0)
    model = create_model(ModelParams(name="efficientnet_lite0", patch_blocks=3)).eval()
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    expected = _projected_input(model, model.net._patch_head._score, images)  # the score map's input, averaged
    assert np.allclose(embed(model, images, PreprocessConfig(32)), expected)


def test_a_residual_branch_models_embeddings_are_the_backbones_and_the_reference_names_its_layer(tmp_path):
    import torch
    from torch import nn

    from dfdetect.config import ModelParams
    from dfdetect.drift import (
        EMBEDDING_DIMS,
        embed,
        feature_layer,
        legacy_feature_layer,
        reference_layer,
        reference_profile,
    )
    from dfdetect.models import create_model
    from dfdetect.preprocessing import PreprocessConfig

    torch.manual_seed(0)
    model = create_model(ModelParams(name="custom_cnn", pretrained=False, residual_branch=True)).eval()
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    backbone_head = [m for m in model.net.modules() if isinstance(m, nn.Linear)][-1]
    assert feature_layer(model) == "net.head.5" and legacy_feature_layer(model) == "branch.fc"
    assert np.allclose(embed(model, images, PreprocessConfig(32)), _projected_input(model, backbone_head, images))
    # references written before the layer was stored were embedded at the branch's head; the monitor reads there
    legacy = embed(model, images, PreprocessConfig(32), layer=legacy_feature_layer(model))
    assert legacy.shape == (5, EMBEDDING_DIMS) and not np.allclose(legacy, embed(model, images, PreprocessConfig(32)))
    with pytest.raises(ValueError, match="no layer 'net.nowhere'"):
        embed(model, images, PreprocessConfig(32), layer="net.nowhere")
    layer = feature_layer(model)
    profile = reference_profile(
        tmp_path, [f"{i}.png" for i in range(5)], images, np.linspace(0, 1, 5), 0.5,
        lambda x: embed(model, x, PreprocessConfig(32), layer=layer), embedding_layer=layer,
    )  # fmt: skip
    assert profile["embedding_layer"] == layer and len(profile["rows"][0]["embedding"]) == EMBEDDING_DIMS
    older = reference_profile(tmp_path, ["a.png"], images[:1], [0.2], 0.5)
    assert "embedding_layer" not in older
    # the monitor embeds a window where its reference was embedded: the stored layer, else the older choice
    assert reference_layer(profile, model) == "net.head.5" and reference_layer(older, model) == "branch.fc"


def test_a_model_whose_backbone_has_no_scoring_layer_is_refused_not_read_at_its_branch():
    from torch import nn

    from dfdetect.drift import feature_layer
    from dfdetect.models.catalog import Detector
    from dfdetect.models.residual import ResidualBranch

    headless = Detector(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), ResidualBranch())
    with pytest.raises(ValueError, match="Sequential has no linear layer"):
        feature_layer(headless)
