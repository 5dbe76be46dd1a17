"""Consistency regularisation (train.consistency): each image augmented twice, the two views' scores made to
agree, so what the augmentations change (compression, sharpness, colour) carries less of the decision."""

import pytest
import torch
from conftest import small_params

from dfdetect import runtime
from dfdetect import train as train_module
from dfdetect.config import ParamsError, parse_params
from dfdetect.train import consistency_loss, train, train_step


def test_the_loss_is_the_symmetric_kl_divergence_of_the_two_scores():
    a, b = torch.tensor([2.0, -1.0, 0.3]), torch.tensor([-0.5, -1.0, 1.7])

    def kl(p, q):  # Bernoulli KL, written out
        return p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()

    p, q = torch.sigmoid(a), torch.sigmoid(b)
    assert consistency_loss(a, b) == pytest.approx(float(((kl(p, q) + kl(q, p)) / 2).mean()), rel=1e-5)
    assert consistency_loss(a, a) == 0
    assert consistency_loss(a, b) == pytest.approx(float(consistency_loss(b, a)))


def _step(x, second=None, consistency=0.0):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 1), torch.nn.Flatten(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    y = torch.tensor([0.0, 1.0, 0.0, 1.0])
    rt = runtime.resolve("cpu", "fp32", False)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    train_step(model, opt, scaler, rt, x, y, second_view=second, consistency=consistency)
    return model[1].weight.detach().clone()


def test_two_equal_views_step_as_one_and_the_weight_moves_the_step_when_views_differ():
    x = torch.arange(48, dtype=torch.float32).reshape(4, 3, 2, 2) / 48
    other = x.flip(0) * 0.5
    assert torch.allclose(_step(x), _step(x, x, consistency=5.0), atol=1e-6)
    assert not torch.allclose(_step(x, other, consistency=0.0), _step(x, other, consistency=5.0))
    assert not torch.allclose(_step(x), _step(x, other))  # the second view's labels count too


def test_training_scores_a_second_augmented_view_only_when_asked(prepared_small, tmp_path, monkeypatch):
    seen = []
    step = train_module.train_step

    def recording(model, optimizer, scaler, rt, x, y, *args):
        second, weight = args[3], args[4]
        seen.append((second is not None and second.shape == x.shape and not torch.equal(second, x), weight))
        return step(model, optimizer, scaler, rt, x, y, *args)

    monkeypatch.setattr(train_module, "train_step", recording)
    for weight in (0.0, 1.0):
        seen.clear()
        train(
            small_params(train={"epochs": 1, "consistency": weight}),
            prepared_small,
            tmp_path / str(weight),
            track=False,
        )
        assert seen and all(s == (weight > 0, weight) for s in seen), seen[:3]


def test_a_negative_weight_is_refused_by_name():
    with pytest.raises(ParamsError, match="train.consistency"):
        parse_params({"train": {"consistency": -1}})


def test_the_consistency_term_pulls_the_two_views_scores_together():
    """A step with a large weight leaves the two views' scores closer than a step on the labels alone (a term
    with the wrong sign would push them apart)."""
    x = torch.arange(48, dtype=torch.float32).reshape(4, 3, 2, 2) / 48
    other = x.flip(0) * 0.5

    def gap(weight):
        w = _step(x, other, consistency=weight)
        return float(((x.flatten(1) - other.flatten(1)) @ w.T).abs().mean())

    assert gap(20.0) < gap(0.0)


def test_each_view_gets_its_own_soft_targets():
    from dfdetect.config import DistillParams

    x = torch.arange(48, dtype=torch.float32).reshape(4, 3, 2, 2) / 48
    y = torch.tensor([0.0, 1.0, 0.0, 1.0])
    rt = runtime.resolve("cpu", "fp32", False)

    def step(soft):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 1), torch.nn.Flatten(0))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        train_step(model, opt, scaler, rt, x, y, soft, DistillParams(alpha=1.0), second_view=x.flip(0), consistency=1.0)
        return model[1].weight.detach().clone()

    first = torch.tensor([0.1, 0.9, 0.2, 0.8])
    assert not torch.allclose(step(torch.cat([first, first])), step(torch.cat([first, 1 - first])))
