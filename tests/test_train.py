import csv
import json
import re

import pytest
import torch
from conftest import small_params

from dfdetect import checkpoint, runtime
from dfdetect.checkpoint import CheckpointError
from dfdetect.config import ParamsError, parse_params
from dfdetect.models import create_model
from dfdetect.train import TrainError, _better, train


def _history(path):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(open(path))]


def test_training_writes_checkpoints_history_and_metrics(prepared_small, tmp_path):
    result = train(
        small_params(),
        prepared_small,
        tmp_path / "models",
        tmp_path / "history.csv",
        tmp_path / "metrics.json",
        track=False,
    )
    assert result.completed and result.epochs_run == 3 and 1 <= result.best_epoch <= 3
    rows = _history(tmp_path / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    best_epoch, best_auc, best_loss = 0, -1.0, float("inf")  # the history replayed: the best is the one chosen
    for r in rows:
        if _better(float(r["val_auc"]), float(r["val_loss"]), best_auc, best_loss):
            best_epoch, best_auc, best_loss = int(r["epoch"]), float(r["val_auc"]), float(r["val_loss"])
    assert result.best_epoch == best_epoch
    assert json.loads((tmp_path / "metrics.json").read_text())["best_epoch"] == result.best_epoch
    best = checkpoint.load(tmp_path / "models" / "best.pt")
    assert best["label_map"] == {"real": 0, "fake": 1}
    assert best["preprocess"]["image_size"] == 48 and best["epoch"] == result.best_epoch
    assert 0.0 <= best["threshold"] <= 1.0
    summary = json.loads((tmp_path / "models" / "summary.json").read_text())
    assert summary["best_epoch"] == result.best_epoch and summary["model"] == "custom_cnn"
    assert not list((tmp_path / "models").glob("*.tmp")) and not list((tmp_path / "models").glob(".*"))


def test_the_best_epoch_is_the_higher_val_auc_and_on_a_tie_the_lower_val_loss():
    assert _better(0.95, 0.9, 0.94, 0.1)  # a higher ROC-AUC wins whatever the loss
    assert not _better(0.93, 0.05, 0.94, 0.1)  # a lower one loses whatever the loss
    assert _better(1.0, 0.05, 1.0, 0.2)  # saturated at 1.0: the more confident epoch ships
    assert not _better(1.0, 0.3, 1.0, 0.2)
    assert _better(0.5, 0.7, -1.0, float("inf"))  # the first epoch is always a best


@pytest.mark.parametrize(
    "recipe", [{"optimizer": "sgd", "scheduler": "step", "step_size": 1}, {"optimizer": "adam", "scheduler": "cosine"}]
)
def test_resume_gives_the_same_weights_and_metrics(prepared_small, tmp_path, recipe):
    params = small_params(train=recipe)
    straight = train(params, prepared_small, tmp_path / "a", tmp_path / "a.csv", track=False)

    first = train(params, prepared_small, tmp_path / "b", tmp_path / "b.csv", stop_after_epochs=1, track=False)
    assert not first.completed and first.epochs_run == 1
    assert not (tmp_path / "b" / "summary.json").exists()
    resumed = train(
        params, prepared_small, tmp_path / "b", tmp_path / "b.csv", resume=tmp_path / "b" / "last.pt", track=False
    )

    assert resumed.completed and resumed.epochs_run == 3
    assert (resumed.best_epoch, resumed.best_val_auc, resumed.threshold) == (
        straight.best_epoch,
        straight.best_val_auc,
        straight.threshold,
    )
    assert _history(tmp_path / "a.csv") == _history(tmp_path / "b.csv")
    for name in ("last.pt", "best.pt"):
        a, b = checkpoint.load(tmp_path / "a" / name), checkpoint.load(tmp_path / "b" / name)
        assert a["state_dict"].keys() == b["state_dict"].keys()
        for key in a["state_dict"]:
            assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key


def test_resume_with_changed_params_is_refused(prepared_small, tmp_path):
    train(small_params(), prepared_small, tmp_path / "m", stop_after_epochs=1, track=False)
    with pytest.raises(TrainError, match=r"params differ.*\n  train.lr: checkpoint 0.002, now 0.01"):
        train(
            small_params(train={"lr": 0.01}),
            prepared_small,
            tmp_path / "m",
            resume=tmp_path / "m" / "last.pt",
            track=False,
        )


def test_a_checkpoint_older_than_a_parameter_resumes_while_that_parameter_keeps_its_default(prepared_small, tmp_path):
    """A checkpoint written before train.sbi.paired existed has no such key: resuming is what the older code
    did while the parameter is at its default, and is refused when it is not."""
    from dfdetect import checkpoint

    train(small_params(), prepared_small, tmp_path / "m", stop_after_epochs=1, track=False)
    last = tmp_path / "m" / "last.pt"
    older = torch.load(last, weights_only=False)
    del older["params"]["train"]["sbi"]["paired"]
    torch.save(older, last)
    assert "paired" not in checkpoint.load(last)["params"]["train"]["sbi"]
    with pytest.raises(TrainError, match=r"train.sbi.paired: checkpoint None, now True"):
        train(small_params(train={"sbi": {"paired": True}}), prepared_small, tmp_path / "m", resume=last, track=False)
    result = train(small_params(), prepared_small, tmp_path / "m", resume=last, track=False)
    assert result.completed


def test_early_stopping_stops_when_val_auc_stalls(prepared_small, tmp_path):
    params = small_params(train={"epochs": 30, "early_stopping_patience": 1, "lr": 1e-9})
    result = train(params, prepared_small, tmp_path / "m", track=False)
    assert result.stopped_early and result.completed and result.epochs_run < 30


def test_corrupt_or_foreign_checkpoints_are_refused(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: not a loadable checkpoint"):
        checkpoint.load(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="foreign.pt: not a dfdetect-checkpoint/1 checkpoint"):
        checkpoint.load(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        checkpoint.load(tmp_path / "absent.pt")


def test_inverted_label_map_is_refused(tmp_path):
    checkpoint.save(tmp_path / "old.pt", {"model": {}, "state_dict": {}, "preprocess": {}})
    state = torch.load(tmp_path / "old.pt", weights_only=True)
    state["label_map"] = {"fake": 0, "real": 1}  # the original service's alphabetical map
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="differs from dfdetect's"):
        checkpoint.load(tmp_path / "old.pt")


def test_pickled_code_is_never_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": "dfdetect-checkpoint/1", "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        checkpoint.load(tmp_path / "evil.pt")


def test_weight_average_follows_the_weights_with_a_warming_decay():
    from dfdetect.ema import WeightAverage

    model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.BatchNorm1d(1))
    average = WeightAverage(model, decay=0.9)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    keep = average.effective_decay()
    assert keep == pytest.approx(1 / 10)  # warm-up: the first averages follow the weights closely
    average.update(model)
    assert torch.allclose(average.module[0].weight, start * keep + (start + 1) * (1 - keep))
    for _ in range(200):
        average.update(model)
    assert average.effective_decay() == 0.9 and torch.allclose(average.module[0].weight, start + 1, atol=1e-6)
    assert not any(p.requires_grad for p in average.module.parameters())


def test_weight_averaged_training_ships_the_average_and_resumes_exactly(prepared_small, tmp_path):
    params = small_params(train={"ema_decay": 0.9})
    straight = train(params, prepared_small, tmp_path / "a", tmp_path / "a.csv", track=False)
    train(params, prepared_small, tmp_path / "b", tmp_path / "b.csv", stop_after_epochs=1, track=False)
    resumed = train(
        params, prepared_small, tmp_path / "b", tmp_path / "b.csv", resume=tmp_path / "b" / "last.pt", track=False
    )
    assert (resumed.best_epoch, resumed.best_val_auc) == (straight.best_epoch, straight.best_val_auc)
    a, b = checkpoint.load(tmp_path / "a" / "last.pt"), checkpoint.load(tmp_path / "b" / "last.pt")
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    # what is shipped is the average, not the last step's weights
    assert any(
        not torch.equal(a["state_dict"][k], a["train_state_dict"][k])
        for k in a["state_dict"]
        if a["state_dict"][k].dtype.is_floating_point
    )


def test_frozen_layers_keep_their_initial_values_and_the_rest_trains(prepared_small, tmp_path):
    params = small_params(train={"freeze": r"^net\.features\.[01]\.", "epochs": 1})
    runtime.seed_everything(params.seed)  # as train() does before it builds the model
    initial = create_model(params.model).state_dict()
    train(params, prepared_small, tmp_path / "m", track=False)
    trained = checkpoint.load(tmp_path / "m" / "last.pt")["state_dict"]
    frozen = [
        k for k in initial if k.startswith(("net.features.0.", "net.features.1.")) and k.endswith(("weight", "bias"))
    ]
    assert frozen and all(torch.equal(initial[k], trained[k]) for k in frozen)
    assert not torch.equal(initial["net.features.2.0.weight"], trained["net.features.2.0.weight"])
    assert not torch.equal(initial["net.head.5.weight"], trained["net.head.5.weight"])


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("^backbone\\.", "matches no parameter of this model; its names start with net."),
        (".", "matches every parameter"),
    ],
)
def test_freeze_patterns_that_freeze_nothing_or_everything_are_refused(prepared_small, tmp_path, pattern, message):
    with pytest.raises(TrainError, match=re.escape(message)):
        train(small_params(train={"freeze": pattern}), prepared_small, tmp_path / "m", track=False)
    assert not (tmp_path / "m" / "last.pt").exists()


def test_freeze_must_be_a_regular_expression():
    with pytest.raises(ParamsError, match=r"train.freeze.*not a regular expression"):
        parse_params({"train": {"freeze": "net.(features"}})


# --- hardening (issue 14): kills during a checkpoint write, metrics across a kill and resume ---------------


def test_stale_checkpoint_temporaries_are_removed_when_training_starts(prepared_small, tmp_path, caplog):
    import logging

    models = tmp_path / "models"
    models.mkdir()
    stale = [models / ".last.pt.k2j3h4.tmp", models / ".best.pt.x_9.tmp", models / ".summary.json.abc.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    (models / "notes.tmp").write_text("not ours")
    caplog.set_level(logging.INFO, logger="dfdetect.train")
    train(small_params(train={"epochs": 1}), prepared_small, models, track=False)
    assert not any(p.exists() for p in stale) and (models / "notes.tmp").exists()
    assert ".last.pt.k2j3h4.tmp" in caplog.text and "removed" in caplog.text


def test_each_epoch_is_logged_once_in_mlflow_across_a_kill_and_resume(prepared_small, tmp_path, monkeypatch):
    """Killed after an epoch's metrics reached MLflow but before its checkpoint did: the resumed run repeats
    that epoch and must not log it again; and steps MLflow lacks are logged from the checkpoint's history."""
    import shutil

    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = small_params(mlflow={"tracking_uri": uri})
    models = tmp_path / "models"
    first = train(params, prepared_small, models, stop_after_epochs=1)
    shutil.copy(models / "last.pt", tmp_path / "after-epoch-1.pt")
    train(params, prepared_small, models, resume=models / "last.pt", stop_after_epochs=1)  # logs epoch 2 ...
    # ... and "is killed" before its checkpoint: resume from the epoch-1 checkpoint, as a real kill leaves it
    done = train(params, prepared_small, models, resume=tmp_path / "after-epoch-1.pt")
    assert done.completed and done.run_id == first.run_id
    client = MlflowClient(tracking_uri=uri)
    for key in ("train_loss", "val_auc", "val_loss", "lr"):
        steps = sorted(m.step for m in client.get_metric_history(first.run_id, key))
        assert steps == [1, 2, 3], (key, steps)


def test_steps_missing_from_mlflow_are_logged_on_resume(prepared_small, tmp_path, monkeypatch):
    """A checkpoint whose epochs never reached the run (e.g. MLflow was down and the run started anew)."""
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = small_params(mlflow={"tracking_uri": uri})
    models = tmp_path / "models"
    first = train(params, prepared_small, models, stop_after_epochs=2)
    client = MlflowClient(tracking_uri=uri)
    fresh = client.create_run(client.get_run(first.run_id).info.experiment_id).info.run_id
    state = torch.load(models / "last.pt", weights_only=True)
    state["run_id"] = fresh  # the checkpoint now names a run that has none of its epochs
    torch.save(state, models / "last.pt")
    train(params, prepared_small, models, resume=models / "last.pt")
    assert sorted(m.step for m in client.get_metric_history(fresh, "val_auc")) == [1, 2, 3]


def test_a_grey_model_stores_its_colour_and_its_input_is_luma_alone(prepared_small, tmp_path):
    import numpy as np

    from dfdetect.artifact import TrainedModel
    from dfdetect.data import load_split
    from dfdetect.inference import Predictor
    from dfdetect.preprocessing import LUMA, to_model_input

    train(small_params(model={"colour": "grey"}, train={"epochs": 1}), prepared_small, tmp_path / "m", track=False)
    trained = TrainedModel.load(tmp_path / "m" / "best.pt")
    assert trained.preprocess.colour == "grey" and Predictor.from_trained(trained, "m").pre.colour == "grey"
    images = load_split(prepared_small, "test").images[:8]
    grey = np.repeat((images.astype(np.float64) @ np.array(LUMA)).round().astype(np.uint8)[..., None], 3, -1)
    as_grey = to_model_input(list(grey), trained.preprocess)
    assert torch.allclose(to_model_input(list(images), trained.preprocess), as_grey, atol=0.02)
    assert torch.allclose(as_grey[:, 0], as_grey[:, 1] * 0.224 / 0.229 + (0.456 - 0.485) / 0.229, atol=1e-4)
    # an rgb model's input does carry colour (so the check above can fail)
    rgb = trained.preprocess.__class__(**{**trained.preprocess.to_dict(), "colour": "rgb"})
    assert not torch.allclose(to_model_input(list(images), rgb), to_model_input(list(grey), rgb), atol=0.02)


def test_balanced_classes_weigh_half_each_whatever_their_counts():
    """Three fakes to one real (self-blends in mode add): with balance_classes the real's loss weighs as much as
    the three fakes' together; a batch of one class is left as it is."""
    import torch.nn.functional as F

    from dfdetect.train import class_balanced_weights

    y = torch.tensor([1.0, 1.0, 1.0, 0.0])
    w = class_balanced_weights(y)
    assert w.mean() == pytest.approx(1.0)
    assert w[y == 0].sum() == pytest.approx(w[y == 1].sum())
    assert torch.equal(class_balanced_weights(torch.ones(5)), torch.ones(5))
    logits = torch.tensor([2.0, 1.0, 0.5, 1.5])
    per_image = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    balanced = F.binary_cross_entropy_with_logits(logits, y, weight=w)
    assert balanced == pytest.approx((per_image[:3].mean() + per_image[3]) / 2)


def test_balance_classes_changes_the_step_only_where_the_classes_are_uneven():
    """train_step with balance: the same update as without on an even batch, another on an uneven one."""
    from dfdetect.train import train_step

    rt = runtime.resolve("cpu", "fp32", False)

    def step(y, balance):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 1), torch.nn.Flatten(0))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.arange(48, dtype=torch.float32).reshape(4, 3, 2, 2) / 48
        train_step(model, opt, torch.amp.GradScaler("cuda", enabled=False), rt, x, y, balance=balance)
        return model[1].weight.detach().clone()

    even, uneven = torch.tensor([0.0, 1.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert torch.allclose(step(even, True), step(even, False))
    assert not torch.allclose(step(uneven, True), step(uneven, False))


def test_a_patch_model_trains_evaluates_and_serves_from_its_checkpoint(prepared_small, tmp_path, monkeypatch):
    """The whole path of a model whose head is a 1 x 1 convolution (model.patch_blocks): training, evaluation
    (which reads embeddings for the drift reference at the head's input) and the predictor rebuilt from the
    checkpoint alone."""
    from PIL import Image

    from dfdetect.data import load_split
    from dfdetect.evaluate import evaluate
    from dfdetect.inference import Predictor

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = small_params(
        model={"name": "efficientnet_lite0", "pretrained": True, "patch_blocks": 3},
        train={"epochs": 1},
        mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    )
    train(params, prepared_small, tmp_path / "m", tmp_path / "history.csv")
    metrics = evaluate(
        params, prepared_small, tmp_path / "m", tmp_path / "eval", tmp_path / "eval" / "m.json", tmp_path / "p"
    )
    assert 0.0 <= metrics["roc_auc"] <= 1.0
    profile = json.loads((tmp_path / "eval" / "reference_profile.json").read_text())
    assert profile["embedding_layer"] == "net._patch_head._score" and "embedding" in profile["rows"][0]
    predictor = Predictor.from_checkpoint(tmp_path / "m" / "best.pt")
    assert len(predictor.model.net._blocks) == 3
    images = load_split(prepared_small, "test").images[:4]
    scores = predictor.score([Image.fromarray(a) for a in images])
    assert scores.shape == (4,) and ((scores >= 0) & (scores <= 1)).all()
