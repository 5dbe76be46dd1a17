"""LP-FT (train.probe_epochs): the new head learns alone on frozen ImageNet features, then every layer."""

import pytest
import torch
from conftest import small_params

from dfdetect import checkpoint
from dfdetect.config import ModelParams, ParamsError
from dfdetect.linear_probe import new_parameter_names, probing
from dfdetect.models import create_model
from dfdetect.train import Trainer, TrainError, freeze_parameters, train
from dfdetect.weight_space import pretrained_weights

LITE0 = ModelParams(name="efficientnet_lite0", pretrained=True)


def test_inside_a_probe_only_the_new_head_learns_and_frozen_statistics_stay():
    model = create_model(LITE0)
    freeze_parameters(model, r"^net\._conv_stem\.")  # a train.freeze that must outlive the probe
    new = new_parameter_names(model, pretrained_weights(LITE0))
    assert new and all(not name.startswith("net._blocks.") for name in new)
    model.train()
    with probing(model, new):
        learning = {name for name, p in model.named_parameters() if p.requires_grad}
        assert learning == new
        batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert batch_norms and not any(m.training for m in batch_norms)
    assert model.net._bn0.training and model.net._blocks[0]._bn1.weight.requires_grad
    assert not model.net._conv_stem.weight.requires_grad  # frozen by train.freeze before and after


def test_a_probe_epoch_changes_only_the_head_then_fine_tuning_changes_the_rest(prepared_small, tmp_path):
    params = small_params(
        model={"name": "efficientnet_lite0", "pretrained": True},
        train={"epochs": 2, "probe_epochs": 1, "ema_decay": 0.0},
    )
    imagenet = pretrained_weights(LITE0)
    after: dict[int, dict] = {}

    def keep(epoch, row):
        weights = checkpoint.load(tmp_path / "models" / "last.pt")["state_dict"]
        after[epoch] = {k: v.clone() for k, v in weights.items()}

    trainer = Trainer(params, prepared_small, tmp_path / "models", track=False)
    initial_head = {k: v.clone() for k, v in trainer.model.state_dict().items() if k.startswith("net._fc")}
    train(params, prepared_small, tmp_path / "models", track=False, on_epoch=keep, trainer=trainer)
    probed, tuned = after[1], after[2]
    shared = [k for k in imagenet if k in probed and imagenet[k].shape == probed[k].shape]
    assert len(shared) > 100
    for name in shared:  # weights and batch-norm statistics are ImageNet's after the probe epoch
        assert torch.equal(probed[name].float(), imagenet[name].float()), name
    assert any(not torch.equal(tuned[name].float(), imagenet[name].float()) for name in shared)
    assert initial_head and all(not torch.equal(probed[k], v) for k, v in initial_head.items())  # the head learnt


def test_a_probe_needs_fine_tuning_epochs_and_imagenet_weights(prepared_small, tmp_path):
    with pytest.raises(ParamsError, match="probe_epochs"):
        small_params(train={"epochs": 2, "probe_epochs": 2})
    params = small_params(model={"name": "efficientnet_lite0", "pretrained": False}, train={"probe_epochs": 1})
    with pytest.raises(TrainError, match="model.pretrained"):
        train(params, prepared_small, tmp_path / "models", track=False)
    assert not (tmp_path / "models" / "last.pt").exists()


def test_a_probe_that_stops_improving_does_not_end_the_run_before_it_fine_tunes(prepared_small, tmp_path):
    # a learning rate too small to move anything: every probe epoch ties the first, which early stopping
    # with patience 1 would count as stale and end the run on, never fine-tuning
    params = small_params(
        model={"name": "efficientnet_lite0", "pretrained": True},
        train={"epochs": 3, "probe_epochs": 2, "early_stopping_patience": 1, "lr": 1e-12},
    )
    rows = []
    train(params, prepared_small, tmp_path / "models", track=False, on_epoch=lambda epoch, row: rows.append(epoch))
    assert rows == [1, 2, 3]


def test_a_probe_with_its_whole_head_frozen_is_refused_before_training(prepared_small, tmp_path):
    params = small_params(
        model={"name": "efficientnet_lite0", "pretrained": True},
        train={"epochs": 2, "probe_epochs": 1, "freeze": r"^net\._fc\."},
    )
    with pytest.raises(TrainError, match="freezes the whole new head"):
        train(params, prepared_small, tmp_path / "models", track=False)


def test_a_probe_of_a_network_given_to_start_from_is_refused(prepared_small, tmp_path):
    params = small_params(model={"name": "efficientnet_lite0", "pretrained": True}, train={"probe_epochs": 1})
    with pytest.raises(TrainError, match="no other starting network"):
        Trainer(params, prepared_small, tmp_path / "models", track=False, initial=create_model(LITE0))
