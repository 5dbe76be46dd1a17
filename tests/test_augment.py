import pytest
import torch

from dfdetect.augment import augment_batch
from dfdetect.config import AugmentParams


def batch():
    x = torch.zeros(8, 3, 16, 16)
    x[:, :, :, :8] = 1.0  # left half white: a flip is visible
    return x


def test_same_generator_state_gives_same_augmentation():
    p = AugmentParams()
    a = augment_batch(batch(), p, torch.Generator().manual_seed(1))
    b = augment_batch(batch(), p, torch.Generator().manual_seed(1))
    c = augment_batch(batch(), p, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (8, 3, 16, 16) and a.min() >= 0 and a.max() <= 1


def test_flip_only_flips_some_images_whole():
    out = augment_batch(
        batch(), AugmentParams(hflip=True, rotation_degrees=0, color_jitter=0), torch.Generator().manual_seed(0)
    )
    flipped = [bool(torch.equal(img, batch()[0].flip(-1))) for img in out]
    kept = [bool(torch.equal(img, batch()[0])) for img in out]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_disabled_augmentation_is_identity():
    out = augment_batch(
        batch(), AugmentParams(hflip=False, rotation_degrees=0, color_jitter=0), torch.Generator().manual_seed(0)
    )
    assert torch.equal(out, batch())


def test_rotation_is_bounded_and_per_image():
    x = torch.rand(4, 3, 32, 32)
    out = augment_batch(
        x, AugmentParams(hflip=False, rotation_degrees=10, color_jitter=0), torch.Generator().manual_seed(0)
    )
    centre_diff = (out[:, :, 12:20, 12:20] - x[:, :, 12:20, 12:20]).abs().mean()
    assert 0 < centre_diff < 0.3  # a small rotation moves pixels a little, not a scramble
    assert not torch.equal(out[0] - x[0], out[1] - x[1])


def test_colour_jitter_matches_torchvision_v2_formulas():
    from torchvision.transforms.v2 import functional as TF

    x = torch.rand(3, 3, 24, 24)
    params = AugmentParams(hflip=False, rotation_degrees=0, color_jitter=0.3)
    out = augment_batch(x.clone(), params, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    torch.rand(3, generator=gen), torch.rand(3, generator=gen)  # the flip and angle draws
    b, c, s = (torch.rand(3, generator=gen) * 0.6 + 0.7 for _ in range(3))
    for i in range(3):
        ref = TF.adjust_saturation(
            TF.adjust_contrast(TF.adjust_brightness(x[i], b[i].item()), c[i].item()), s[i].item()
        )
        assert torch.allclose(out[i], ref, atol=1e-5)


def test_degradations_touch_only_their_share_and_stay_in_range():
    from dfdetect.augment import degrade

    x = torch.rand(64, 3, 32, 32)
    for kind in ("blur", "sharpen", "noise", "downscale"):
        params = AugmentParams(**{f"{kind}_prob": 0.5})
        out = degrade(x, params, torch.Generator().manual_seed(0))
        changed = [(o - i).abs().max().item() > 1e-4 for o, i in zip(out, x)]
        assert 10 < sum(changed) < 54, (kind, sum(changed))  # about half, per image
        assert out.min() >= 0 and out.max() <= 1
    blurred = degrade(x, AugmentParams(blur_prob=1.0, blur_sigma=2.0), torch.Generator().manual_seed(0))
    assert blurred.diff(dim=-1).abs().mean() < x.diff(dim=-1).abs().mean()  # smoother
    assert torch.equal(degrade(x, AugmentParams(), torch.Generator().manual_seed(0)), x)


def test_sharpening_mirrors_blur_and_never_meets_it_on_one_image():
    from dfdetect.augment import degrade

    smooth = degrade(
        torch.rand(32, 3, 32, 32), AugmentParams(blur_prob=1.0, blur_sigma=1.5), torch.Generator().manual_seed(1)
    )
    detail = lambda t: t.diff(dim=-1).abs().mean(dim=(1, 2, 3))  # noqa: E731
    sharpened = degrade(smooth, AugmentParams(sharpen_prob=1.0, sharpen_amount=2.0), torch.Generator().manual_seed(2))
    assert (detail(sharpened) >= detail(smooth) - 1e-6).all() and detail(sharpened).mean() > 1.2 * detail(smooth).mean()
    # with both on, each image is blurred or sharpened, never both: the draws do not depend on params, so the
    # blurred ones equal a blur-only run and the rest a sharpen-only run
    x, seed = torch.rand(32, 3, 32, 32), 3
    run = lambda **kw: degrade(x, AugmentParams(**kw), torch.Generator().manual_seed(seed))  # noqa: E731
    both = run(blur_prob=0.5, blur_sigma=1.5, sharpen_prob=1.0, sharpen_amount=2.0)
    blur_only, sharpen_only = run(blur_prob=0.5, blur_sigma=1.5), run(sharpen_prob=1.0, sharpen_amount=2.0)
    as_blurred = torch.tensor([torch.equal(o, b) for o, b in zip(both, blur_only)])
    as_sharpened = torch.tensor([torch.equal(o, s) for o, s in zip(both, sharpen_only)])
    assert (as_blurred ^ as_sharpened).all()  # each image exactly one of the two
    assert 5 < int(as_blurred.sum()) < 27


def test_jpeg_recompression_is_lossy_per_image_and_reproducible():
    from dfdetect.augment import recompress

    x = (torch.rand(16, 3, 32, 32) * 255).to(torch.uint8)
    params = AugmentParams(jpeg_prob=0.5, jpeg_quality=(30, 60))
    a = recompress(x, params, torch.Generator().manual_seed(3))
    b = recompress(x, params, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.uint8
    changed = sum(not torch.equal(o, i) for o, i in zip(a, x))
    assert 2 < changed < 14
    assert torch.equal(recompress(x, AugmentParams(), torch.Generator().manual_seed(3)), x)


def _block_edges(images: torch.Tensor, period: int) -> tuple[float, float]:
    """Mean jump across columns at multiples of `period` and half-way between them."""
    jump = (images[..., 1:].float() - images[..., :-1].float()).abs().mean(dim=(0, 1, 2))  # jump[x]: x -> x + 1
    edges = torch.arange(period - 1, images.shape[-1] - 1, period)
    return float(jump[edges].mean()), float(jump[edges - period // 2].mean())


def test_jpeg_at_another_scale_puts_the_blocks_off_the_images_grid():
    from dfdetect.augment import recompress

    # smooth grey images (no chroma blocks), so that what jumps is JPEG's 8 x 8 luma block edges at quality 10
    smooth = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    grey = torch.nn.functional.interpolate(smooth, size=(64, 64), mode="bicubic").clamp(0, 1)
    x = (grey.expand(8, 3, 64, 64) * 255).to(torch.uint8).contiguous()
    at_own_size = recompress(x, AugmentParams(jpeg_prob=1.0, jpeg_quality=(10, 10)), torch.Generator())
    on_grid, between = _block_edges(at_own_size, 8)
    assert on_grid > 2 * between  # compressed at its own size: an edge every 8 pixels
    every_16, half_way = _block_edges(at_own_size, 16)
    assert every_16 < 1.15 * half_way  # ... at 8 as at 16
    halved = recompress(
        x, AugmentParams(jpeg_prob=1.0, jpeg_quality=(10, 10), jpeg_scale=(0.5, 0.5)), torch.Generator()
    )
    assert halved.shape == x.shape and halved.dtype == torch.uint8
    every_16, half_way = _block_edges(halved, 16)  # the half-size image's blocks, magnified twice
    assert every_16 > 1.35 * half_way


def test_jpeg_scale_left_at_one_draws_what_earlier_versions_drew():
    from dfdetect.augment import recompress

    x = (torch.rand(16, 3, 32, 32) * 255).to(torch.uint8)
    gen = torch.Generator().manual_seed(5)
    recompress(x, AugmentParams(jpeg_prob=0.5), gen)
    reference = torch.Generator().manual_seed(5)
    torch.rand(2, 16, generator=reference)  # the chosen images and their qualities: nothing more
    assert torch.equal(gen.get_state(), reference.get_state())
    with pytest.raises(ValueError, match="jpeg_scale"):
        AugmentParams(jpeg_scale=(0.1, 1.0))


def test_erase_greys_one_rectangle_of_the_configured_area_in_a_share_of_images():
    from dfdetect.augment import erase

    x = torch.rand(64, 3, 40, 40) * 0.4  # never 0.5 exactly: the grey is recognisable
    params = AugmentParams(erase_prob=0.5, erase_area=(0.05, 0.2))
    out = erase(x, params, torch.Generator().manual_seed(0))
    grey = (out == 0.5).all(dim=1)  # pixels greyed in all 3 channels
    erased = [g for g in grey if g.any()]
    assert 10 < len(erased) < 54
    for g in erased:
        rows, cols = g.any(dim=1).nonzero().flatten(), g.any(dim=0).nonzero().flatten()
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert g.sum() == h * w  # one solid rectangle
        assert 0.05 * 1600 * 0.6 <= h * w <= 0.2 * 1600 * 1.4  # rounding and clipping at the border
    untouched = [bool(torch.equal(o, i)) for o, i in zip(out, x)]
    assert sum(untouched) == 64 - len(erased)
    assert torch.equal(erase(x, AugmentParams(), torch.Generator().manual_seed(0)), x)


def test_erase_draws_the_same_random_numbers_on_or_off():
    """Switching cutout on must not shift the augmentations drawn after it (resumable, comparable runs)."""
    from dfdetect.augment import erase

    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    erase(torch.rand(8, 3, 16, 16), AugmentParams(), a)
    erase(torch.rand(8, 3, 16, 16), AugmentParams(erase_prob=1.0), b)
    assert torch.equal(a.get_state(), b.get_state())


def _textures(n: int, seed: int) -> torch.Tensor:
    """Smooth random textures (noise at a quarter of the size, upscaled), a stand-in for face crops."""
    small = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(small, size=(128, 128), mode="bicubic", align_corners=False).clamp(0, 1)


def test_sharpness_matching_takes_sharpness_away_as_a_label_cue():
    from dfdetect.augment import _separable_blur, match_sharpness, sharpness
    from dfdetect.metrics import roc_auc

    n = 64
    images = _textures(n, 0)
    labels = torch.arange(n) % 2  # fakes: the blurrier class, as faceswap128's swaps are
    fakes = labels == 1
    images[fakes] = _separable_blur(images[fakes], torch.full((int(fakes.sum()),), 1.2), 4)
    before = roc_auc(labels.numpy(), (-sharpness(images)).numpy(), 0.5)
    matched = match_sharpness(images, 1.0, torch.Generator().manual_seed(3))
    after = roc_auc(labels.numpy(), (-sharpness(matched)).numpy(), 0.5)
    assert before > 0.95
    assert abs(after - 0.5) < 0.15, after
    assert matched.shape == images.shape and matched.min() >= 0 and matched.max() <= 1
    assert not torch.equal(matched, images)


def test_sharpness_matching_off_is_identity_and_draws_nothing():
    from dfdetect.augment import match_sharpness

    images, gen = _textures(8, 1), torch.Generator().manual_seed(5)
    state = gen.get_state()
    assert match_sharpness(images, 0.0, gen) is images
    assert torch.equal(gen.get_state(), state)
    # a share: the images not drawn are untouched (the first draw is who is matched)
    out = match_sharpness(images, 0.5, torch.Generator().manual_seed(5))
    chosen = torch.rand(8, generator=torch.Generator().manual_seed(5)) < 0.5
    assert 0 < int(chosen.sum()) < 8
    assert torch.equal(out[~chosen], images[~chosen])


def test_grayscale_turns_a_share_grey_and_draws_nothing_when_off():
    from dfdetect.augment import to_grey
    from dfdetect.preprocessing import LUMA

    images, gen = _textures(16, 2), torch.Generator().manual_seed(7)
    state = gen.get_state()
    assert to_grey(images, 0.0, gen) is images
    assert torch.equal(gen.get_state(), state)
    out = to_grey(images, 0.5, torch.Generator().manual_seed(7))
    chosen = torch.rand(16, generator=torch.Generator().manual_seed(7)) < 0.5
    assert 0 < int(chosen.sum()) < 16
    luma = (images * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1)
    for i in range(16):
        if chosen[i]:
            assert all(torch.allclose(out[i, c], luma[i], atol=1e-6) for c in range(3))
        else:
            assert torch.equal(out[i], images[i])


def _square(size=64, side=16):
    """A white square centred on black: its extent after a zoom or stretch is easy to read."""
    x = torch.zeros(1, 3, size, size)
    lo = (size - side) // 2
    x[..., lo : lo + side, lo : lo + side] = 1.0
    return x


def _extent(image: torch.Tensor) -> tuple[float, float]:
    """Width and height of what is lit (pixels over half), read along the centre row and column."""
    lit = image[0] > 0.5
    centre = image.shape[-1] // 2
    return float(lit[centre, :].sum()), float(lit[:, centre].sum())


def test_zoom_and_stretch_reshape_the_face_about_its_centre():
    still = {"hflip": False, "rotation_degrees": 0, "color_jitter": 0}
    zoomed = augment_batch(_square(), AugmentParams(**still, scale=(2, 2)), torch.Generator().manual_seed(0))
    assert _extent(zoomed[0]) == (32.0, 32.0)  # twice the side, centred
    assert zoomed[0, :, 32, 32].min() == 1 and zoomed[0, :, 8, 8].max() == 0
    wide = augment_batch(_square(side=24), AugmentParams(**still, aspect=(2, 2)), torch.Generator().manual_seed(0))
    width, height = _extent(wide[0])
    assert abs(width / height - 2) < 0.2 and abs(width * height / (24 * 24) - 1) < 0.1  # twice as wide, same area


def test_zoom_is_drawn_per_image_within_its_range_and_not_at_all_when_off():
    from dfdetect.augment import _log_uniform

    x = _square().repeat(32, 1, 1, 1)
    out = augment_batch(
        x,
        AugmentParams(hflip=False, rotation_degrees=0, color_jitter=0, scale=(0.75, 1.5)),
        torch.Generator().manual_seed(0),
    )
    sides = sorted({_extent(img)[0] for img in out})
    assert len(sides) > 3 and 11 <= sides[0] and sides[-1] <= 25  # 16 px times 0.75 to 1.5, each image its own
    draws = _log_uniform(torch.Generator().manual_seed(0), 10_000, 0.5, 2.0)
    assert abs(float((draws < 1).float().mean()) - 0.5) < 0.02  # as likely to shrink as to grow
    with pytest.raises(ValueError, match="aspect"):
        AugmentParams(aspect=(1.2, 1.1))


def test_zoom_and_stretch_left_at_one_draw_nothing(monkeypatch):
    """The recipes measured before zoom and stretch existed must draw the same random numbers."""
    from dfdetect import augment

    def no_draw(*_args):
        raise AssertionError("drew zoom or stretch factors")

    monkeypatch.setattr(augment, "_log_uniform", no_draw)
    augment_batch(_square(), AugmentParams(), torch.Generator().manual_seed(3))  # the defaults: nothing drawn
    with pytest.raises(AssertionError, match="drew"):  # ... and the check can fail
        augment_batch(_square(), AugmentParams(aspect=(0.9, 1.1)), torch.Generator().manual_seed(3))
