"""MixStyle (train.mixstyle): early feature statistics mixed between images in training, never at inference."""

import re

import pytest
import torch
from conftest import small_params
from torch import nn

from dfdetect import checkpoint, runtime
from dfdetect.config import MixStyleParams, ParamsError, parse_params
from dfdetect.mixstyle import MixStyleError, mixing_style, mixstyle_layers
from dfdetect.models import create_model
from dfdetect.train import TrainError, train

ALWAYS = MixStyleParams(prob=1.0, alpha=0.1, layers=r"^body$")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Identity()

    def forward(self, x):
        return self.body(x)


def _styled_batch() -> torch.Tensor:
    """Four images of the same structure, each with its own per-channel brightness and contrast (its style)."""
    torch.manual_seed(0)
    structure = torch.randn(1, 3, 8, 8)
    scale = torch.tensor([0.5, 1.0, 2.0, 4.0]).view(4, 1, 1, 1)
    shift = torch.tensor([-3.0, 0.0, 3.0, 6.0]).view(4, 1, 1, 1)
    return structure * scale + shift


def _normalised(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True)


def test_training_mixes_the_styles_and_keeps_each_images_structure():
    net, x = _Net().train(), _styled_batch()
    torch.manual_seed(1)
    layers = mixstyle_layers(net, ALWAYS)
    with mixing_style(net, layers, ALWAYS):
        out = net(x)
    assert layers == ["body"]
    assert not torch.allclose(out.mean((2, 3)), x.mean((2, 3)), atol=1e-3)  # the statistics moved
    assert torch.allclose(_normalised(out), _normalised(x), atol=1e-3)  # the structure did not


def test_nothing_changes_in_eval_mode_after_the_block_or_with_probability_zero():
    net, x = _Net(), _styled_batch()
    with mixing_style(net.eval(), ["body"], ALWAYS):
        assert torch.equal(net(x), x)
    net.train()
    with mixing_style(net, ["body"], ALWAYS):
        pass
    assert torch.equal(net(x), x) and not net.body._forward_hooks  # the hooks went with the block
    off = MixStyleParams(prob=0.0, layers=r"^body$")
    layers = mixstyle_layers(net, off)
    with mixing_style(net, layers, off):
        assert layers == [] and torch.equal(net(x), x)


def test_the_default_layers_are_the_ends_of_lite0s_second_and_third_stages():
    model = create_model(parse_params({"model": {"name": "efficientnet_lite0", "pretrained": False}}).model)
    assert mixstyle_layers(model, MixStyleParams(prob=0.5)) == ["net._blocks.2", "net._blocks.4"]


def test_a_pattern_matching_no_layer_names_the_field():
    with pytest.raises(MixStyleError, match=re.escape("train.mixstyle.layers='^nope$' matches no module")):
        mixstyle_layers(_Net(), MixStyleParams(prob=0.5, layers="^nope$"))
    with pytest.raises(ParamsError, match=r"train.mixstyle.layers.*not a regular expression"):
        parse_params({"train": {"mixstyle": {"layers": "net.(blocks"}}})


def test_training_refuses_unknown_layers_before_any_work(prepared_small, tmp_path):
    params = small_params(train={"mixstyle": {"prob": 0.5}})  # the Lite0 default names; this is custom_cnn
    with pytest.raises(TrainError, match="train.mixstyle.layers"):
        train(params, prepared_small, tmp_path / "m", track=False)
    assert not (tmp_path / "m" / "last.pt").exists()


def test_a_layer_without_feature_maps_is_named_at_the_first_step():
    net = nn.Sequential(nn.Flatten(), nn.Linear(192, 2)).train()
    linear = MixStyleParams(prob=1.0, layers=r"^1$")
    with mixing_style(net, ["1"], linear), pytest.raises(MixStyleError, match="Linear"):
        net(_styled_batch())


def test_a_one_by_one_feature_map_gives_no_nan():
    net, x = _Net().train(), torch.randn(4, 3, 1, 1)
    with mixing_style(net, ["body"], ALWAYS):
        assert torch.isfinite(net(x)).all()


def test_mixing_changes_what_training_learns(prepared_small, tmp_path):
    """The flag is not ignored: the same seed and data with styles mixed end at other weights. Without dropout,
    a hook that drew its random numbers but left the features alone would end at the same weights."""
    weights = {}
    for prob in (0.0, 1.0):
        params = small_params(
            model={"dropout": 0.0},
            train={"epochs": 1, "mixstyle": {"prob": prob, "layers": r"^net\.features\.[01]$"}},
        )
        runtime.seed_everything(params.seed)
        train(params, prepared_small, tmp_path / str(prob), track=False)
        weights[prob] = checkpoint.load(tmp_path / str(prob) / "last.pt")["state_dict"]
    changed = [k for k in weights[0.0] if not torch.equal(weights[0.0][k], weights[1.0][k])]
    assert "net.head.5.weight" in changed
