"""Self-blended images: changes stay inside the soft face mask, are reproducible, and train a model from
real faces alone."""

import numpy as np
import torch

from dfdetect.sbi import sbi_batch, self_blend
from conftest import face_frames, small_params


def test_blend_changes_the_face_region_only():
    face = face_frames(1, fake=False, seed=1)[0][20:148, 120:248]  # a 128 px face crop
    rng = np.random.default_rng(0)
    fake, mask = self_blend(face, rng)
    assert fake.shape == face.shape and fake.dtype == np.uint8
    assert 0.0 <= mask.min() and mask.max() <= 1.0 and 0 < mask.mean() < 0.6
    diff = np.abs(fake.astype(int) - face.astype(int)).max(axis=2)
    assert diff[mask < 0.01].max() <= 1  # outside the mask: the real face, untouched (rounding aside)
    assert diff[mask > 0.5].mean() > 2  # inside: visibly altered
    assert 0.2 < mask[54:74, 54:74].mean() and mask[:5, :5].max() < 0.01  # centred on the face, not the corners
    again, _ = self_blend(face, np.random.default_rng(0))
    assert np.array_equal(fake, again)


def test_sbi_batch_turns_only_real_images_into_fakes():
    images = torch.randint(0, 255, (32, 3, 48, 48), dtype=torch.uint8)
    labels = torch.tensor([0, 1] * 16)
    out, y = sbi_batch(images, labels, 1.0, torch.Generator().manual_seed(0))
    assert y.tolist() == [1] * 32  # every real became a (self-blended) fake
    assert torch.equal(out[1::2], images[1::2]) and not torch.equal(out[0::2], images[0::2])
    same, y2 = sbi_batch(images, labels, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(same, images) and torch.equal(y2, labels)


def test_training_with_real_faces_only(prepared_small, tmp_path):
    from dfdetect.train import train

    params = small_params(train={"sbi": {"mode": "only", "prob": 0.5}, "epochs": 2})
    result = train(params, prepared_small, tmp_path / "models", tmp_path / "history.csv", track=False)
    assert result.completed and 0.0 <= result.best_val_auc <= 1.0  # validated on the known fakes it never saw
