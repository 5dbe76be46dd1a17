"""WiSE-FT (train.wise_alpha): the fine-tuned weights mixed with the ImageNet weights they started from."""

import json

import pytest
import torch
from conftest import small_params

from dfdetect import checkpoint
from dfdetect.artifact import TrainedModel
from dfdetect.config import ModelParams
from dfdetect.models import create_model
from dfdetect.preprocessing import PreprocessConfig
from dfdetect.train import TrainError, train
from dfdetect.weight_space import mix_with_pretrained, pretrained_weights

LITE0 = ModelParams(name="efficientnet_lite0", pretrained=True)
CALIBRATION = ("temperature", "logit_shift")


def _fine_tuned() -> TrainedModel:
    """Lite0 from ImageNet with every parameter and batch-norm statistic moved, as training would move them."""
    module = create_model(LITE0)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.1 + 0.5)
        module.temperature.fill_(2.0)
    return TrainedModel(module, PreprocessConfig(image_size=48), spec=LITE0)


def test_each_pretrained_tensor_moves_to_its_share_and_the_new_head_stays():
    tuned = _fine_tuned()
    before = {k: v.clone() for k, v in tuned.module.state_dict().items()}
    imagenet = pretrained_weights(LITE0)
    mixed = mix_with_pretrained(tuned, imagenet, 0.75)
    after = mixed.module.state_dict()
    counterparts = 0
    for name, value in after.items():
        source = imagenet.get(name)
        if source is not None and source.shape == value.shape and value.is_floating_point():
            counterparts += 1
            assert torch.allclose(value, 0.75 * before[name] + 0.25 * source, atol=1e-5), name
        else:
            assert torch.equal(value, before[name]), name
    # the 1-logit head, the temperature and the batch-norm counters have no ImageNet counterpart
    assert torch.equal(after["net._fc.weight"], before["net._fc.weight"]) and float(mixed.module.temperature) == 2.0
    assert not torch.equal(after["net._bn0.running_mean"], before["net._bn0.running_mean"])  # statistics mix too
    expected = [
        k for k, v in before.items() if k.startswith("net.") and not k.startswith("net._fc") and v.is_floating_point()
    ]
    assert counterparts == len(expected) and mixed.lineage["wise_ft"] == {"alpha": 0.75, "tensors_mixed": len(expected)}
    for name, value in tuned.module.state_dict().items():  # the model mixed from is left as it was
        assert torch.equal(value, before[name]), name


def test_a_model_is_mixed_once_and_only_with_a_share_in_range():
    tuned = _fine_tuned()
    imagenet = pretrained_weights(LITE0)
    mixed = mix_with_pretrained(tuned, imagenet, 0.5)
    with pytest.raises(ValueError, match="already mixed"):
        mix_with_pretrained(mixed, imagenet, 0.5)
    for alpha in (0.0, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            mix_with_pretrained(tuned, imagenet, alpha)
    with pytest.raises(ValueError, match="no tensor"):
        mix_with_pretrained(tuned, {}, 0.5)


def test_training_ships_the_mix_of_its_best_weights_calibrated_anew(prepared_small, tmp_path):
    params = small_params(
        model={"name": "efficientnet_lite0", "pretrained": True}, train={"epochs": 1, "wise_alpha": 0.5}
    )
    models = tmp_path / "models"
    result = train(params, prepared_small, models, metrics_path=tmp_path / "metrics.json", track=False)
    shipped = TrainedModel.load(models / "best.pt")
    assert shipped.lineage["wise_ft"]["alpha"] == 0.5
    # one epoch: last.pt holds the best epoch's weights as trained; the shipped ones are their mix
    expected = mix_with_pretrained(TrainedModel.load(models / "last.pt"), pretrained_weights(LITE0), 0.5)
    got, want = shipped.module.state_dict(), expected.module.state_dict()
    for name in want:
        if name not in CALIBRATION:  # fitted again on the mixed model
            assert torch.allclose(got[name], want[name], atol=1e-6), name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["mixed_val_auc"] == shipped.calibration["val_roc_auc"] and 0.0 <= metrics["mixed_val_auc"] <= 1.0
    # what a search ranks the run by is the shipped (mixed) model's figure, not the best epoch's before the mix
    assert result.model_val_auc == result.shipped_val_auc == metrics["mixed_val_auc"]
    assert result.best_val_auc == metrics["val_auc"]

    # finishing again (a resume after the last epoch) does not mix the mixed model a second time
    train(params, prepared_small, models, resume=models / "last.pt", track=False)
    again = TrainedModel.load(models / "best.pt").module.state_dict()
    for name in got:
        if name not in CALIBRATION:
            assert torch.equal(again[name], got[name]), name
    assert checkpoint.load(models / "best.pt")["lineage"]["wise_ft"]["alpha"] == 0.5


@pytest.mark.parametrize(
    "sections, named",
    [
        ({"model": {"name": "efficientnet_lite0", "pretrained": False}}, "model.pretrained"),
        (
            {"model": {"name": "efficientnet_lite0", "pretrained": True}, "train": {"calibrate": False}},
            "train.calibrate",
        ),
    ],
)
def test_a_run_that_cannot_be_mixed_fails_before_training(prepared_small, tmp_path, sections, named):
    raw = {**sections, "train": {"wise_alpha": 0.5, **sections.get("train", {})}}
    with pytest.raises(TrainError, match=named):
        train(small_params(**raw), prepared_small, tmp_path / "models", track=False)
    assert not (tmp_path / "models" / "last.pt").exists()
