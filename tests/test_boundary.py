"""Blending-boundary supervision (train.sbi.boundary_weight): the targets, the masks moved with their images,
a head that learns the seam, and a training run whose shipped model carries none of it."""

import numpy as np
import pytest
import torch
from conftest import face_frames, small_params
from torch import nn

from dfdetect import checkpoint
from dfdetect.augment import augment_batch, augment_with_masks
from dfdetect.boundary import BoundaryError, BoundarySupervision, boundary_layer, boundary_map
from dfdetect.config import AugmentParams, ParamsError
from dfdetect.models import create_model
from dfdetect.sbi import sbi_batch, sbi_batch_with_masks, self_blend
from dfdetect.train import Trainer, TrainError, train

STILL = dict(  # geometry only: nothing that changes pixel values
    color_jitter=0.0,
    sharpen_prob=0.0,
    sharpness_match_prob=0.0,
    blur_prob=0.0,
    noise_prob=0.0,
    downscale_prob=0.0,
    erase_prob=0.0,
)


def _disc(n=4, size=32) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    off = torch.arange(n).view(n, 1, 1) * 2  # each disc a little further right: flips show
    return (((yy - size / 2) ** 2 + (xx - size / 2 - off) ** 2) < (size / 4) ** 2).float()


def test_the_boundary_is_the_seam_of_the_mask_and_nothing_inside_or_outside():
    soft = torch.nn.functional.avg_pool2d(_disc(1, 64).unsqueeze(1), 5, 1, 2).squeeze(1)  # a feathered edge
    target = boundary_map(soft, (16, 16))[0]
    assert target[8, 8] == 0 and target[0, 0] == 0  # the middle of the face and the corner: no seam
    assert target.max() > 0.3 and target[8, 4] > 0.1  # the seam, on the disc's edge, 16 px left of its centre
    assert boundary_map(torch.zeros(2, 64, 64), (8, 8)).abs().sum() == 0  # a real face: none


def test_masks_move_with_their_images_and_the_draws_stay_the_same():
    masks = _disc()
    images = masks.unsqueeze(1).repeat(1, 3, 1, 1)  # each image is its own mask
    params = AugmentParams(**STILL, hflip=True, rotation_degrees=30, scale=(0.8, 1.2), aspect=(0.9, 1.1))
    out, moved = augment_with_masks(images, masks, params, torch.Generator().manual_seed(4))
    assert torch.allclose(out[:, 0], moved, atol=1e-6)
    assert not torch.allclose(moved, masks)  # rotated, zoomed, perhaps flipped
    erased = AugmentParams(**{**STILL, "erase_prob": 1.0}, hflip=False, rotation_degrees=0)
    grey, cleared = augment_with_masks(
        torch.full((4, 3, 32, 32), 0.2), torch.ones(4, 32, 32), erased, torch.Generator()
    )
    box = grey[:, 0] == 0.5
    assert box.any() and torch.equal(cleared, (~box).float())  # no seam to draw under cutout's grey box
    alone = augment_batch(images, AugmentParams(), torch.Generator().manual_seed(9))
    with_masks, _ = augment_with_masks(images, masks, AugmentParams(), torch.Generator().manual_seed(9))
    assert torch.equal(alone, with_masks)  # masks draw no random numbers: the same images either way


@pytest.mark.parametrize("paired", [False, True])
def test_self_blends_come_with_their_masks_and_known_fakes_are_marked_unknown(paired):
    images = torch.randint(0, 255, (16, 3, 48, 48), dtype=torch.uint8)
    labels = torch.tensor([0, 1] * 8)
    out, y = sbi_batch(images, labels, 0.5, torch.Generator().manual_seed(3), paired=paired)
    out2, y2, masks, known = sbi_batch_with_masks(images, labels, 0.5, torch.Generator().manual_seed(3), paired=paired)
    assert torch.equal(out, out2) and torch.equal(y, y2)  # the same batch with or without masks
    assert masks.shape == (len(out), 48, 48) and known.shape == (len(out),)
    blended = masks.flatten(1).amax(1) > 0
    assert blended.any() and (y[blended] == 1).all()  # only self-blends have a blending mask
    kept = len(images)
    assert not known[:kept][labels == 1].any()  # the data set's fakes: their manipulated region is unknown
    assert known[:kept][labels == 0].all() and known[kept:].all()  # reals (no seam) and self-blends


def test_the_mask_is_the_blended_region_s_shape_whatever_the_blend_ratio():
    face = face_frames(1, fake=False, seed=1)[0][20:148, 120:248]
    for seed in range(24):  # half the draws blend a quarter to three quarters of the copy
        _, mask = self_blend(face, np.random.default_rng(seed))
        assert mask[60:68, 60:68].min() > 0.9  # the inside is 1 however faint the blend: the seam is at the edge
        seam = boundary_map(torch.from_numpy(mask).float()[None], (16, 16))[0]
        assert seam[7:9, 7:9].max() < 0.25 and seam.max() > 0.8  # a mask scaled by the ratio would put seam inside


def test_the_layer_must_name_exactly_one_feature_map():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten())
    assert boundary_layer(model, r"^2$") == "2"
    with pytest.raises(BoundaryError, match="matches no module"):
        boundary_layer(model, r"^blocks")
    with pytest.raises(BoundaryError, match="matches 2 modules"):
        boundary_layer(model, r"^(0|2)$")
    with pytest.raises(BoundaryError, match=r"needs a feature map"):
        BoundarySupervision(model, r"^3$", 1.0, 16, torch.device("cpu"))


def test_the_head_learns_to_draw_the_seam_of_self_blends():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, stride=2))
    supervision = BoundarySupervision(model, r"^2$", 1.0, 32, torch.device("cpu"))
    masks = torch.nn.functional.avg_pool2d(_disc(8).unsqueeze(1), 3, 1, 1).squeeze(1)
    masks[::2] = 0  # half are reals: no seam
    images = torch.rand(8, 3, 32, 32) * 0.2 + masks.unsqueeze(1) * 0.5  # a brighter pasted region
    known = torch.ones(8, dtype=torch.bool)
    start = torch.sigmoid(supervision.head(torch.randn(2, 8, 16, 16) * 50))
    assert torch.allclose(start, torch.tensor(0.1))  # the constant guess, however large the features: no shock
    optimizer = torch.optim.Adam([*model.parameters(), *supervision.head.parameters()], lr=0.01)
    losses = []
    with supervision.attached(model):
        for _ in range(60):
            model(images)
            loss = supervision.loss(masks, known)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    assert not model[2]._forward_hooks  # detached after the block
    assert losses[-1] < 0.6 * losses[0]
    with supervision.attached(model):  # images whose seam is unknown add nothing
        model(images)
        assert float(supervision.loss(masks, torch.zeros(8, dtype=torch.bool)).detach()) == 0.0


def test_boundary_supervision_is_a_checked_param():
    with pytest.raises(ParamsError, match="boundary_weight"):
        small_params(train={"sbi": {"mode": "none", "boundary_weight": 1.0}})
    with pytest.raises(ParamsError, match="boundary_layer"):
        small_params(train={"sbi": {"mode": "add", "boundary_weight": 1.0, "boundary_layer": "("}})


def test_a_layer_the_model_lacks_fails_before_training(prepared_small, tmp_path):
    params = small_params(train={"sbi": {"mode": "add", "boundary_weight": 1.0, "boundary_layer": "^nothing$"}})
    with pytest.raises(TrainError, match="boundary_layer"):
        Trainer(params, prepared_small, tmp_path / "models", track=False)


def test_training_with_the_seam_ships_a_model_without_the_head_and_resumes(prepared_small, tmp_path):
    params = small_params(
        model={"name": "efficientnet_lite0", "pretrained": True},
        train={"epochs": 2, "sbi": {"mode": "add", "prob": 0.5, "boundary_weight": 1.0}},
    )
    trainer = Trainer(params, prepared_small, tmp_path / "models", track=False)
    assert trainer.boundary.layer == "net._blocks.4"
    head_before = trainer.boundary.head.conv.weight.detach().clone()
    train(params, prepared_small, tmp_path / "models", track=False, stop_after_epochs=1, trainer=trainer)
    last = checkpoint.load(tmp_path / "models" / "last.pt")
    assert not torch.equal(last["boundary_head"]["conv.weight"], head_before)  # the head learnt
    detector = set(create_model(params.model).state_dict())
    assert set(last["state_dict"]) == detector  # the detector's weights hold no head
    assert all(not m._forward_hooks for m in trainer.model.modules())  # the tap is gone after the steps
    again = Trainer(params, prepared_small, tmp_path / "models", track=False)
    again.resume(tmp_path / "models" / "last.pt")
    assert torch.equal(again.boundary.head.conv.weight, last["boundary_head"]["conv.weight"])
    result = train(params, prepared_small, tmp_path / "models", tmp_path / "history.csv", track=False, trainer=again)
    assert result.completed and result.epochs_run == 2
    history = (tmp_path / "history.csv").read_text().splitlines()
    assert history[0].endswith(",train_boundary_loss") and len(history) == 3  # both epochs, the first resumed
    assert all(0 < float(row.split(",")[-1]) < 10 for row in history[1:])  # the unweighted loss of each epoch
    best = checkpoint.load(tmp_path / "models" / "best.pt")
    assert set(best["state_dict"]) == detector  # the detector alone
