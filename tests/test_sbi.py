"""Self-blended images: changes stay inside the soft face mask, are reproducible, and train a model from
real faces alone."""

import numpy as np
import pytest
import torch
from conftest import face_frames, small_params

from dfdetect.sbi import sbi_batch, self_blend


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


def test_paired_sbi_keeps_each_chosen_real_and_appends_the_same_self_blend_after_the_batch():
    images = torch.randint(0, 255, (32, 3, 48, 48), dtype=torch.uint8)
    labels = torch.tensor([0, 1] * 16)
    replaced, y = sbi_batch(images, labels, 0.5, torch.Generator().manual_seed(3))
    paired, y_paired = sbi_batch(images, labels, 0.5, torch.Generator().manual_seed(3), paired=True)
    chosen = torch.nonzero(y != labels).flatten()
    assert 0 < len(chosen) < 16  # some reals, not all
    assert torch.equal(paired[:32], images) and torch.equal(y_paired[:32], labels)  # the batch as it came
    assert len(paired) == 32 + len(chosen) and y_paired[32:].tolist() == [1] * len(chosen)
    assert torch.equal(paired[32:], replaced[chosen])  # the same self-blends, in the chosen reals' order
    none, y_none = sbi_batch(images, labels, 0.0, torch.Generator().manual_seed(3), paired=True)
    assert torch.equal(none, images) and torch.equal(y_none, labels)


def test_training_with_paired_self_blends_trains_on_the_grown_batches(prepared_small, tmp_path, monkeypatch):
    from dfdetect import train as training

    sizes = []

    def recorded(images, labels, *args, **kwargs):
        out, y = sbi_batch(images, labels, *args, **kwargs)
        sizes.append((len(images), len(out), int((labels == 0).sum()), int((y == 0).sum())))
        return out, y

    monkeypatch.setattr(training, "sbi_batch", recorded)
    params = small_params(train={"sbi": {"mode": "add", "prob": 0.5, "paired": True}, "epochs": 1})
    result = training.train(params, prepared_small, tmp_path / "models", tmp_path / "history.csv", track=False)
    assert result.completed and 0.0 <= result.best_val_auc <= 1.0
    assert any(after > before for before, after, _, _ in sizes)  # self-blends added beside the batch
    assert all(reals_before == reals_after for _, _, reals_before, reals_after in sizes)  # no real replaced


def test_training_with_real_faces_only(prepared_small, tmp_path):
    from dfdetect.train import train

    params = small_params(train={"sbi": {"mode": "only", "prob": 0.5}, "epochs": 2})
    result = train(params, prepared_small, tmp_path / "models", tmp_path / "history.csv", track=False)
    assert result.completed and 0.0 <= result.best_val_auc <= 1.0  # validated on the known fakes it never saw


def test_landmark_masks_follow_the_face_hull():
    from PIL import Image
    from skimage import data

    from dfdetect.landmarks import FaceLandmarker, hull_mask
    from dfdetect.sbi import landmark_mask

    face = np.asarray(Image.fromarray(data.astronaut()[30:250, 120:340]).resize((128, 128), Image.BILINEAR))
    landmarker = FaceLandmarker.load()
    points = landmarker.landmarks(face)
    assert points is not None
    hull = hull_mask(points, 128, 128)
    masks = [landmark_mask(points, 128, 128, np.random.default_rng(s)) for s in range(8)]
    for mask in masks:  # a deformed, feathered copy of the hull: mostly inside it, never far outside
        assert np.corrcoef(mask.ravel(), hull.ravel())[0, 1] > 0.7
        assert mask[hull == 0].mean() < 0.1 and mask[hull == 1].mean() > 0.5
    assert not np.array_equal(masks[0], masks[1])  # each draw deforms it differently
    fake, used = self_blend(face, np.random.default_rng(0), points)
    diff = np.abs(fake.astype(int) - face.astype(int)).max(axis=2)
    assert diff[used < 0.01].max() <= 1 and diff[used > 0.5].mean() > 2


def test_sbi_batch_uses_landmarks_and_falls_back_to_an_ellipse_without_a_face():
    class Found:
        calls = 0

        def landmarks(self, face):
            Found.calls += 1
            h, w = face.shape[:2]  # a small square "face" in one corner: the mask must go there
            return np.array([[2, 2], [20, 2], [20, 20], [2, 20]], np.float32)

    class NotFound:
        def landmarks(self, face):
            return None

    images = torch.full((4, 3, 48, 48), 100, dtype=torch.uint8)
    labels = torch.zeros(4, dtype=torch.long)
    corner, _ = sbi_batch(images, labels, 1.0, torch.Generator().manual_seed(0), Found())
    assert Found.calls == 4
    changed = (corner.int() - images.int()).abs().amax(1) > 0
    assert changed[:, :24, :24].float().mean() > changed[:, 30:, 30:].float().mean()
    ellipse, y = sbi_batch(images, labels, 1.0, torch.Generator().manual_seed(0), NotFound())
    assert y.tolist() == [1] * 4 and (ellipse.int() - images.int()).abs().amax(1)[:, 20:28, 20:28].float().mean() > 0


def test_training_with_landmark_masks(prepared_small, tmp_path):
    from dfdetect.train import train

    params = small_params(train={"sbi": {"mode": "add", "prob": 0.5, "mask": "landmarks"}, "epochs": 1})
    result = train(params, prepared_small, tmp_path / "models", track=False)
    assert result.completed and (tmp_path / "models" / "best.pt").exists()


def test_paper_alteration_coarsens_or_sharpens_and_blends_on_either_side_of_the_mask():
    from dfdetect.sbi import _paper_alteration

    face = face_frames(1, fake=False, seed=1)[0][20:148, 120:248]
    detail = lambda img: np.abs(np.diff(img.astype(float), axis=1)).mean()  # noqa: E731 (mean horizontal step)
    altered = [_paper_alteration(face, np.random.default_rng(seed)) for seed in range(40)]
    assert all(a.shape == face.shape and a.dtype == np.uint8 for a in altered)
    # shrunk 2 or 4 times by nearest neighbour and enlarged back: the coarse copies have less fine detail,
    # the sharpened ones more; both kinds are drawn
    assert min(map(detail, altered)) < 0.8 * detail(face) and max(map(detail, altered)) > 1.1 * detail(face)
    sides = {"inside": 0, "outside": 0}
    for seed in range(20):
        fake, mask = self_blend(face, np.random.default_rng(seed), alteration="paper")
        outside = np.abs(fake.astype(int) - face.astype(int)).max(axis=2)[mask < 0.01]
        sides["inside" if outside.max() <= 1 else "outside"] += 1
    assert sides["inside"] >= 3 and sides["outside"] >= 3  # the altered copy inside the mask, or around it
    again, _ = self_blend(face, np.random.default_rng(5), alteration="paper")
    assert np.array_equal(again, self_blend(face, np.random.default_rng(5), alteration="paper")[0])


def test_sbi_alteration_is_a_checked_param():
    import pytest
    from pydantic import ValidationError

    from dfdetect.config import SbiParams

    assert SbiParams(alteration="paper").alteration == "paper" and SbiParams().alteration == "mild"
    with pytest.raises(ValidationError, match="alteration"):
        SbiParams(alteration="strong")


def test_paper_blends_shift_only_the_inside_copy(monkeypatch):
    """Whichever side is altered, the image around the mask is never rescaled or shifted: a shifted frame
    would carry edge-padded borders, a cue only the pseudo-fakes have."""
    from dfdetect import sbi

    face = face_frames(1, fake=False, seed=2)[0][20:148, 120:248]
    monkeypatch.setitem(sbi.ALTERATIONS, "paper", lambda img, rng: (img.astype(int) + 40).clip(0, 255).astype(np.uint8))
    brighter = (face.astype(int) + 40).clip(0, 255)
    outsides = set()
    for seed in range(12):
        inside, outside = sbi._blend_pair(face, np.random.default_rng(seed), "paper")
        if np.array_equal(outside, face):
            outsides.add("face")
            assert np.abs(inside.astype(int) - brighter).mean() < np.abs(inside.astype(int) - face).mean()
        else:
            assert np.array_equal(outside.astype(int), brighter)  # altered, in place: not shifted
            outsides.add("altered")
    assert outsides == {"face", "altered"}


def _stripes(vertical: bool, size: int = 96) -> np.ndarray:
    """A grey face-sized image of stripes 4 px wide, one way or the other (the same colours, another pattern)."""
    line = (np.arange(size) // 4 % 2 * 120 + 60).astype(np.uint8)
    img = np.broadcast_to(line[None, :] if vertical else line[:, None], (size, size))
    return np.repeat(img[..., None], 3, axis=2).copy()


def _pattern_share(img: np.ndarray) -> float:
    """How much of the centre's variation runs across columns (vertical stripes) rather than rows."""
    centre = img[32:64, 32:64, 0].astype(float)
    return float(np.abs(np.diff(centre, axis=1)).mean() / (np.abs(np.diff(centre, axis=0)).mean() + 1e-6))


def test_donor_blends_take_the_inside_from_another_real_face_of_the_batch():
    diagonal = (np.indices((96, 96)).sum(0) // 4 % 2 * 120 + 60).astype(np.uint8)  # diagonal: both ways at once
    fake = np.repeat(diagonal[..., None], 3, axis=2)
    images = torch.from_numpy(np.stack([_stripes(False), _stripes(True), fake])).permute(0, 3, 1, 2)
    labels = torch.tensor([0, 0, 1])  # two reals, one known fake (never a donor: its pattern would show both ways)
    own, _ = sbi_batch(images, labels, 1.0, torch.Generator().manual_seed(0), donor_prob=0.0)
    out, y = sbi_batch(images, labels, 1.0, torch.Generator().manual_seed(0), donor_prob=1.0)
    assert y.tolist() == [1, 1, 1] and torch.equal(out[2], images[2])
    first, second = (out[k].permute(1, 2, 0).numpy() for k in (0, 1))
    assert _pattern_share(own[0].permute(1, 2, 0).numpy()) < 0.3  # its own inside: still horizontal stripes
    assert _pattern_share(first) > 3  # the other real's vertical stripes inside
    assert _pattern_share(second) < 0.3  # and the other way round
    again, _ = sbi_batch(images, labels, 1.0, torch.Generator().manual_seed(0), donor_prob=1.0)
    assert torch.equal(out, again)  # seeded: a resumed run makes the same ones


def test_a_zero_donor_share_draws_nothing_more():
    """The self-blends of a run without donors, drawn as they were before donors existed: which reals from the
    batch generator, then one seed for the blends, each blend its own draws from it."""
    images = torch.randint(0, 255, (16, 3, 48, 48), dtype=torch.uint8)
    labels = torch.tensor([0, 1] * 8)
    gen = torch.Generator().manual_seed(5)
    chosen = (torch.rand(16, generator=gen) < 0.5) & (labels == 0)
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    expected = images.clone()
    for i in torch.nonzero(chosen).flatten().tolist():
        expected[i] = torch.from_numpy(self_blend(images[i].permute(1, 2, 0).numpy(), rng)[0]).permute(2, 0, 1)
    zero_gen = torch.Generator().manual_seed(5)
    zero, _ = sbi_batch(images, labels, 0.5, zero_gen, donor_prob=0.0, aligner=object())  # never asked
    assert torch.equal(zero, expected) and torch.equal(zero_gen.get_state(), gen.get_state())
    some, _ = sbi_batch(images, labels, 0.5, torch.Generator().manual_seed(5), donor_prob=0.5)
    assert not torch.equal(some, expected)


def test_a_donor_gets_the_faces_colours_inside_the_mask():
    from dfdetect.sbi import colour_matched

    rng = np.random.default_rng(0)
    face = (rng.normal([150, 110, 90], [20, 15, 10], (64, 64, 3))).clip(0, 255).astype(np.uint8)
    donor = (rng.normal([80, 90, 140], [5, 30, 12], (64, 64, 3))).clip(0, 255).astype(np.uint8)
    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 16:48] = 1
    matched = colour_matched(donor, face, mask).astype(float)
    inside = mask > 0.5
    assert np.allclose(matched[inside].mean(0), face[inside].mean(0), atol=1.5)
    assert np.allclose(matched[inside].std(0), face[inside].std(0), rtol=0.1)


def test_a_donor_is_aligned_by_its_landmarks_onto_the_face():
    from dfdetect.landmarks import five_points
    from dfdetect.sbi import aligned_donor

    points = np.random.default_rng(1).uniform(30, 90, (478, 2)).astype(np.float32)
    donor = np.zeros((128, 128, 3), np.uint8)
    nose = five_points(points)[2]
    donor[int(nose[1]) + 6, int(nose[0]) + 9] = 255  # the donor's nose tip, 9 px right and 6 down of the face's
    aligned = aligned_donor(donor, points + np.float32([9, 6]), points)
    y, x = np.unravel_index(aligned[..., 0].argmax(), aligned.shape[:2])
    assert abs(x - int(nose[0])) <= 1 and abs(y - int(nose[1])) <= 1


def test_training_with_donor_blends_aligns_the_donors_by_their_landmarks(prepared_small, tmp_path, monkeypatch):
    from dfdetect import sbi
    from dfdetect import train as training
    from dfdetect.landmarks import FaceLandmarker

    aligners, aligned = [], []

    def recorded(images, labels, *args, **kwargs):
        aligners.append(kwargs.get("aligner"))
        return sbi_batch(images, labels, *args, **kwargs)

    original = sbi.aligned_donor
    monkeypatch.setattr(sbi, "aligned_donor", lambda *args: aligned.append(1) or original(*args))
    monkeypatch.setattr(training, "sbi_batch", recorded)
    params = small_params(train={"sbi": {"mode": "add", "prob": 0.5, "donor_prob": 1.0}, "epochs": 1})
    result = training.train(params, prepared_small, tmp_path / "models", track=False)
    assert result.completed and aligners and all(isinstance(a, FaceLandmarker) for a in aligners)
    assert aligned  # the ellipse mask needs no landmarks: the donors were aligned by the model loaded for them


def _shape(yaw: float, scale: float = 1.0, angle: float = 0.0, shift=(0.0, 0.0)) -> np.ndarray:
    """A 468-point stand-in for a face mesh whose five landmarks are a face turned by `yaw` (the nose moved
    toward one eye), then scaled, rotated in-plane and shifted: only yaw changes its shape."""
    from dfdetect.landmarks import EYE_CORNERS, MOUTH_CORNERS, NOSE_TIP

    five = np.array([[-20, -10], [20, -10], [30 * yaw, 8], [-14, 22], [14, 22]], np.float64)
    c, s = np.cos(angle), np.sin(angle)
    five = five @ np.array([[c, s], [-s, c]]) * scale + np.array(shift) + 64
    points = np.full((468, 2), 64.0)
    for k, pair in enumerate(EYE_CORNERS):
        points[list(pair)] = five[k]
    points[NOSE_TIP] = five[2]
    points[list(MOUTH_CORNERS)] = five[3:]
    return points.astype(np.float32)


def test_the_shape_distance_ignores_position_scale_and_rotation_and_sees_a_turned_head():
    from dfdetect.sbi import shape_distance

    front = _shape(0.0)
    assert shape_distance(front, _shape(0.0, scale=1.4, angle=0.3, shift=(7, -5))) < 1e-6
    slightly, strongly = shape_distance(front, _shape(0.2)), shape_distance(front, _shape(0.6))
    assert 0 < slightly < strongly
    assert shape_distance(_shape(0.4), _shape(-0.4)) > strongly  # turned the other way
    mirrored = front.copy()
    mirrored[:, 0] = 128 - mirrored[:, 0]  # each eye, mouth corner on the other side, its label kept
    assert shape_distance(front, mirrored) > 1  # a mirror is no rotation: no donor could be aligned so
    assert shape_distance(_shape(0.2), front) == pytest.approx(slightly)


class _ShapesByImage:
    """A landmarker whose faces are told apart by their first pixel: image k has the shape `shapes[k]`. Counts
    its lookups."""

    def __init__(self, shapes):
        self.shapes, self.calls = shapes, 0

    def landmarks(self, face):
        self.calls += 1
        return self.shapes[int(face[0, 0, 0])]


def test_nearest_donors_are_shaped_like_the_face_and_each_mesh_is_looked_up_once(monkeypatch):
    from dfdetect import sbi

    yaws = [0.0, 0.05, -0.6, 0.6, 0.55, -0.55, 0.1, -0.1]  # face 0's three nearest: 1, 6, 7
    images = torch.zeros(8, 3, 32, 32, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(8, dtype=torch.uint8)
    labels = torch.zeros(8, dtype=torch.long)
    finder = _ShapesByImage([_shape(y) for y in yaws])
    donors = []
    monkeypatch.setattr(
        sbi, "_donor_for", lambda images, i, j, *rest: donors.append(j) or images[j].permute(1, 2, 0).numpy()
    )
    for seed in range(6):
        donors.clear()
        finder.calls = 0
        sbi.sbi_batch(
            images,
            labels,
            1.0,
            torch.Generator().manual_seed(seed),
            donor_prob=1.0,
            aligner=finder,
            donor_choice="nearest",
        )
        assert donors[0] in {1, 6, 7}  # face 0 (frontal) never gets a head turned far either way
        assert donors[3] in {4, 1, 6}  # face 3 (turned 0.6) gets 0.55 first
        assert finder.calls == 8  # every face's mesh once, however many blends asked for it
    finder.calls = 0
    sbi.sbi_batch(images, labels, 1.0, torch.Generator().manual_seed(0), finder, donor_prob=1.0, aligner=finder)
    assert finder.calls == 8  # the mask's landmarker as the aligner: one lookup serves both
    with pytest.raises(ValueError, match="nearest"):
        sbi.sbi_batch(images, labels, 1.0, torch.Generator(), donor_prob=1.0, donor_choice="nearest")
    random_donors = set()
    for seed in range(12):
        donors.clear()
        sbi.sbi_batch(images, labels, 1.0, torch.Generator().manual_seed(seed), donor_prob=1.0, aligner=finder)
        random_donors.add(donors[0])
    assert {2, 3, 4, 5} & random_donors  # random: turned heads too


def test_nearest_donors_fall_back_to_random_where_no_face_is_found():
    images = torch.randint(0, 255, (6, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 0, 0, 1, 0, 0])

    class NoFace:
        def landmarks(self, face):
            return None

    out, y = sbi_batch(
        images, labels, 1.0, torch.Generator().manual_seed(2), donor_prob=1.0, aligner=NoFace(), donor_choice="nearest"
    )
    again, _ = sbi_batch(images, labels, 1.0, torch.Generator().manual_seed(2), donor_prob=1.0, aligner=NoFace())
    assert y.tolist() == [1, 1, 1, 1, 1, 1] and torch.equal(out, again)  # the random choice's draws exactly
