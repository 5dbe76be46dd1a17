"""Self-blended images (Shiohara & Yamasaki, CVPR 2022): pseudo-fakes made from real faces alone.

A face is blended with a slightly altered copy of itself (colour, sharpness, scale, position) inside a soft,
randomly deformed face mask. The result carries the traces every face swap leaves (a blending boundary,
colour and frequency mismatches) without any identity change, so a detector learns those traces instead of
one generator's fingerprint. The mask is the convex hull of the face's dense landmarks (MediaPipe's face mesh,
dfdetect.landmarks), as the paper draws it; where no face mesh is found, an ellipse around the centre of the
crop (`prepare` crops faces centred, and tight crops are centred too). Optionally (`donor_prob`) a share of the
blends take their inside from another real face of the batch, colour-matched (Li et al., Face X-ray, CVPR 2020:
"blended images"), so the pseudo-fakes also carry an identity swap's mismatch.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter


def _wobble(angle: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A smooth random radial factor around 1 (the paper's elastic mask deformation, at low frequency)."""
    return 1 + sum(rng.uniform(-0.08, 0.08) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4))


def _feather(inside: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A hard mask with a blurred edge of random width; values in [0, 1]."""
    w = inside.shape[1]
    mask = Image.fromarray((inside * 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(rng.uniform(0.03, 0.09) * w)
    )
    return np.asarray(mask, dtype=np.float32) / 255


def _soft_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """An ellipse around the centre, deformed by a smooth random warp, with a blurred edge: the mask when no
    landmarks were found."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h * (0.5 + rng.uniform(-0.05, 0.05)), w * (0.5 + rng.uniform(-0.05, 0.05))
    ry, rx = h * rng.uniform(0.28, 0.42), w * rng.uniform(0.24, 0.36)
    inside = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= _wobble(np.arctan2(yy - cy, xx - cx), rng) ** 2
    return _feather(inside, rng)


def landmark_mask(points: np.ndarray, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """The paper's mask: the convex hull of the face landmarks, shrunk or grown per axis and deformed by a
    smooth random warp around its centre, with a blurred edge; values in [0, 1]."""
    from .landmarks import hull_mask

    centre = points.mean(0)
    offset = points - centre
    factor = _wobble(np.arctan2(offset[:, 1], offset[:, 0]), rng)[:, None] * rng.uniform(0.8, 1.05, size=2)
    return _feather(hull_mask(centre + offset * factor, h, w) > 0, rng)


def _shifted(img: np.ndarray, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """`img` rescaled by a few per cent, centred, shifted by a few pixels and cropped or edge-padded to h x w."""
    scale = rng.uniform(0.94, 1.06)
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    img = np.asarray(Image.fromarray(img).resize((sw, sh), Image.BILINEAR))
    out = np.empty((h, w, 3), dtype=np.uint8)
    dy, dx = (sh - h) // 2 + int(rng.integers(-2, 3)), (sw - w) // 2 + int(rng.integers(-2, 3))
    padded = np.pad(img, ((max(0, -dy), max(0, h + dy - sh)), (max(0, -dx), max(0, w + dx - sw)), (0, 0)), mode="edge")
    out[:] = padded[max(0, dy) : max(0, dy) + h, max(0, dx) : max(0, dx) + w]
    return out


def _mild_alteration(face: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colour gain and shift on every channel, then a light Gaussian blur or an unsharp mask."""
    img = face.astype(np.float32) * rng.uniform(0.9, 1.1, size=3) + rng.uniform(-12, 12, size=3)
    img = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    else:
        img = img.filter(ImageFilter.UnsharpMask(radius=2, percent=int(rng.uniform(50, 150))))
    return np.asarray(img)


def _paper_alteration(face: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The paper's source-target augmentation, as its code draws it: a shift of up to 20 levels per channel
    (chance 0.3); hue, saturation and value moved a little and brightness (up to 10 % of full scale, added) and
    contrast (up to 10 %, multiplied) always; then one frequency change: shrunk 2 or 4 times by nearest neighbour
    and enlarged back bilinearly (the aliased, coarse face many swap tools paste), or sharpened (a 3 x 3
    sharpening kernel of lightness 0.5-1 blended in at 20-50 %)."""
    h, w = face.shape[:2]
    img = face.astype(np.float32)
    if rng.random() < 0.3:
        img = img + rng.uniform(-20, 20, size=3)
    hsv = np.asarray(Image.fromarray(img.clip(0, 255).round().astype(np.uint8)).convert("HSV"), dtype=np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-2, 2)) % 256  # hue wraps around
    hsv[..., 1:] = hsv[..., 1:] * rng.uniform(0.95, 1.05, size=2)
    hsv = hsv.round().clip(0, 255).astype(np.uint8)
    img = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"), dtype=np.float32)
    img = img * (1 + rng.uniform(-0.1, 0.1)) + rng.uniform(-0.1, 0.1) * 255
    pil = Image.fromarray(img.round().clip(0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        factor = int(rng.choice([2, 4]))
        small = pil.resize((max(1, w // factor), max(1, h // factor)), Image.NEAREST)
        return np.asarray(small.resize((w, h), Image.BILINEAR))
    lightness = rng.uniform(0.5, 1.0)
    kernel = ImageFilter.Kernel((3, 3), [-1, -1, -1, -1, 8 + lightness, -1, -1, -1, -1], scale=1)
    sharp = np.asarray(pil.filter(kernel), np.float32)
    alpha = rng.uniform(0.2, 0.5)
    return (alpha * sharp + (1 - alpha) * np.asarray(pil, np.float32)).round().clip(0, 255).astype(np.uint8)


def _blend_pair(
    face: np.ndarray, rng: np.random.Generator, alteration: str, donor: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(inside, outside): the copy blended inside the mask and the image around it. The inside copy is always
    rescaled and shifted a little (the paper's affine jitter of the source). mild alters the inside copy; paper,
    as the paper's code does, alters the inside or the outside at random, so which side of the boundary is the
    coarser is no cue; the outside is never shifted (a shifted frame would show edge-padded borders, a cue of
    the pseudo-fakes alone). With a `donor` (another face, see self_blend) the inside is the donor, altered, and
    the outside the face as it is: the two sides already differ in identity and skin."""
    h, w = face.shape[:2]
    if donor is not None:
        return _shifted(ALTERATIONS[alteration](donor, rng), h, w, rng), face
    altered = ALTERATIONS[alteration](face, rng)
    if alteration == "paper" and rng.random() < 0.5:
        return _shifted(face, h, w, rng), altered
    return _shifted(altered, h, w, rng), face


ALTERATIONS = {"mild": _mild_alteration, "paper": _paper_alteration}


def colour_matched(donor: np.ndarray, face: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`donor` (H x W x 3 uint8) with each channel's mean and spread inside `mask` moved to `face`'s there: the
    colour correction Face X-ray gives its donors, so skin tone and lighting are no cue of the blend."""
    inside = mask > 0.5
    if not inside.any():
        inside = np.ones(mask.shape, bool)
    src, ref = donor.astype(np.float32), face.astype(np.float32)
    mean_s, std_s = src[inside].mean(0), src[inside].std(0) + 1e-3
    mean_r, std_r = ref[inside].mean(0), ref[inside].std(0)
    return ((src - mean_s) * (std_r / std_s) + mean_r).round().clip(0, 255).astype(np.uint8)


def aligned_donor(donor: np.ndarray, donor_points: np.ndarray, points: np.ndarray) -> np.ndarray:
    """`donor` warped by the similarity (rotation, scale, shift) that best takes its five landmarks onto the
    face's, so its eyes, nose and mouth land where the face's are; the donor unchanged where no fit is found."""
    import cv2

    from .landmarks import five_points

    matrix, _ = cv2.estimateAffinePartial2D(five_points(donor_points), five_points(points))
    if matrix is None:
        return donor
    h, w = donor.shape[:2]
    return cv2.warpAffine(donor, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def self_blend(
    face: np.ndarray,
    rng: np.random.Generator,
    points: np.ndarray | None = None,
    alteration: str = "mild",
    donor: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A real face (H x W x 3 uint8) -> (its self-blended pseudo-fake, the blending mask H x W in [0, 1]). With
    `points` (face landmarks in the crop's pixels) the mask follows the face's hull, else an ellipse.
    `alteration`: how the two blended images differ (see _blend_pair). `donor`: another real face (the same
    size, already aligned to this one) whose inside is blended in instead of the face's own, after its colours
    are matched to the face's inside the mask, and in full: Face X-ray's blended images, a swap of identity. The mask
    returned is the region's shape, 1 inside and feathered at its edge, before the blend ratio (a quarter to all
    of the copy) scales it: its seam is where the blend's seam is, whatever the ratio (dfdetect.boundary)."""
    h, w = face.shape[:2]
    mask = landmark_mask(points, h, w, rng) if points is not None else _soft_mask(h, w, rng)
    ratio = rng.choice([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])  # blend ratio, mostly full
    if donor is not None:  # another face is blended in whole: a partial blend of two faces shows both (doubled
        ratio = 1.0  # eyes and mouths), a cue no swap tool leaves
        donor = colour_matched(donor, face, mask)
    inside, outside = _blend_pair(face, rng, alteration, donor)
    alpha = (mask * ratio)[..., None]
    blended = alpha * inside.astype(np.float32) + (1 - alpha) * outside.astype(np.float32)
    return blended.round().clip(0, 255).astype(np.uint8), mask


def shape_distance(points: np.ndarray, other: np.ndarray) -> float:
    """How differently two faces are posed and shaped: the Procrustes distance between their five landmarks
    (eye centres, nose tip, mouth corners) once position, scale and in-plane rotation are taken out, which is
    what aligned_donor takes out. 0 for the same shape; a turned head moves its nose off the eyes' middle."""
    from .landmarks import five_points

    a, b = five_points(points).astype(np.float64), five_points(other).astype(np.float64)
    a, b = a - a.mean(0), b - b.mean(0)
    a, b = a / (np.linalg.norm(a) or 1.0), b / (np.linalg.norm(b) or 1.0)
    u, s, vt = np.linalg.svd(a.T @ b)
    if np.linalg.det(u @ vt) < 0:  # a rotation, never a mirror: aligned_donor cannot mirror a donor either
        s[-1] = -s[-1]
    return float(np.sqrt(max(0.0, 2.0 - 2.0 * s.sum())))


class _BatchLandmarks:
    """Each image of a batch's landmarks (None where no face is found), looked up once by `finder` (a
    dfdetect.landmarks.FaceLandmarker) however many blends ask: the face mesh costs a few ms a face."""

    def __init__(self, images: torch.Tensor, finder) -> None:
        self.images, self.finder, self.found = images, finder, {}

    def __call__(self, j: int) -> np.ndarray | None:
        if j not in self.found:
            self.found[j] = self.finder.landmarks(self.images[j].permute(1, 2, 0).numpy())
        return self.found[j]


NEAREST_DONORS = 3  # donor_choice nearest draws among this many closest shapes: Face X-ray's random pick
# among the nearest, scaled from its search over thousands of faces to a batch's dozen reals


def _donor_index(reals: list[int], i: int, rng, choice: str, landmarks: _BatchLandmarks | None) -> int:
    """Which other real of the batch gives image `i` its inside. `random`: any, uniformly. `nearest`: one of the
    NEAREST_DONORS whose five landmarks are shaped most like i's (shape_distance; Face X-ray's choice, so a
    turned head gets a donor turned the same way; faces without landmarks are never its donors, so fewer than
    NEAREST_DONORS may be drawn among); random where i's or every other face's landmarks are missing."""
    points = landmarks(i) if choice == "nearest" and landmarks is not None else None
    if points is not None:
        others = [(shape_distance(points, landmarks(j)), j) for j in reals if j != i and landmarks(j) is not None]
        if others:
            nearest = sorted(others)[:NEAREST_DONORS]
            return nearest[int(rng.integers(len(nearest)))][1]
    j = reals[int(rng.integers(len(reals) - 1))]
    return reals[-1] if j == i else j  # len - 1 draws skip the last index: it stands in for i


def _donor_for(images: torch.Tensor, i: int, j: int, landmarks: _BatchLandmarks | None) -> np.ndarray:
    """Image `j` of the batch as H x W x 3 uint8, aligned onto image `i`'s face where `landmarks` (None: no
    aligner) finds both faces, else as its crop frames it (prepare's crops are centred)."""
    donor = images[j].permute(1, 2, 0).numpy()
    points = landmarks(i) if landmarks is not None else None
    donor_points = landmarks(j) if points is not None else None  # no lookup where the face has none
    return aligned_donor(donor, donor_points, points) if donor_points is not None else donor


def batch_options(sbi) -> dict:
    """sbi_batch's keyword arguments (besides the batch and its generator) for a `train.sbi` section
    (dfdetect.config): the face mesh loaded once, for the masks (`mask: landmarks`) and for aligning donors
    (`donor_prob` > 0, whatever the mask), so that a missing model fails before any work."""
    landmarker = aligner = None
    if sbi.mode != "none" and (sbi.mask == "landmarks" or sbi.donor_prob > 0):
        from .landmarks import FaceLandmarker

        mesh = FaceLandmarker.load()
        landmarker = mesh if sbi.mask == "landmarks" else None
        aligner = mesh if sbi.donor_prob > 0 else None
    return {
        "prob": sbi.prob,
        "landmarker": landmarker,
        "alteration": sbi.alteration,
        "paired": sbi.paired,
        "donor_prob": sbi.donor_prob,
        "aligner": aligner,
        "donor_choice": sbi.donor_choice,
    }


def sbi_batch(*args, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """sbi_batch_with_masks' images and labels alone (the same arguments, the same draws): what training
    needs when no head learns the blends' boundaries."""
    images, labels, _, _ = sbi_batch_with_masks(*args, **options)
    return images, labels


def sbi_batch_with_masks(
    images: torch.Tensor,
    labels: torch.Tensor,
    prob: float,
    gen: torch.Generator,
    landmarker=None,
    alteration: str = "mild",
    paired: bool = False,
    donor_prob: float = 0.0,
    aligner=None,
    donor_choice: str = "random",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn a random share `prob` of the real images of a uint8 N x 3 x H x W CPU batch into self-blended
    fakes (label 1), masked by the face hull where `landmarker` (dfdetect.landmarks) finds the face, else by an
    ellipse. `paired`: the chosen reals stay and their self-blends are appended after the batch, in the same
    order (the same draws as unpaired, so the same self-blends). `donor_prob`: the chance that a self-blend takes
    its inside from another real face of the batch instead of its own (Face X-ray's blended images; see
    self_blend), chosen as `donor_choice` says (see _donor_index) and aligned to the face by `aligner`'s
    landmarks (a FaceLandmarker; None: unaligned); 0 draws nothing more, so the self-blends stay those of a run
    without donors. Seeded from `gen`, so a resumed run makes the same ones. `nearest` looks up the mesh of
    every real face of a batch that makes a donor blend (each once), `random` only those of the blended faces
    and their donors.

    Returns the images, the labels, the blending masks (N x H x W float, zero for reals) and which images' masks
    are known (reals and self-blends; not the given fakes, whose manipulated region is unknown), for
    dfdetect.boundary."""
    if donor_choice not in ("random", "nearest"):
        raise ValueError(f"donor_choice must be 'random' or 'nearest', got {donor_choice!r}")
    if donor_choice == "nearest" and donor_prob > 0 and aligner is None:
        raise ValueError("donor_choice 'nearest' needs an aligner (a FaceLandmarker) to compare the faces' shapes")
    n, h, w = images.shape[0], images.shape[2], images.shape[3]
    chosen = (torch.rand(n, generator=gen) < prob) & (labels == 0)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    masks, known = torch.zeros(n, h, w), labels == 0
    if not chosen.any():
        return images, labels, masks, known
    rng = np.random.default_rng(seed)
    picked = torch.nonzero(chosen).flatten().tolist()
    reals = torch.nonzero(labels == 0).flatten().tolist()
    mask_landmarks = _BatchLandmarks(images, landmarker) if landmarker is not None else None
    if aligner is None:
        align_landmarks = None
    else:  # both faces' points for the alignment come from the aligner, shared with the mask's where one model
        align_landmarks = mask_landmarks if aligner is landmarker else _BatchLandmarks(images, aligner)
    fakes, blend_masks = [], []
    for i in picked:
        face = images[i].permute(1, 2, 0).numpy()
        points = mask_landmarks(i) if mask_landmarks is not None else None
        donor = None
        if donor_prob > 0 and len(reals) > 1 and rng.random() < donor_prob:
            j = _donor_index(reals, i, rng, donor_choice, align_landmarks)
            donor = _donor_for(images, i, j, align_landmarks)
        fake, mask = self_blend(face, rng, points, alteration, donor)
        fakes.append(torch.from_numpy(fake).permute(2, 0, 1))
        blend_masks.append(torch.from_numpy(mask).float())
    if paired:
        images = torch.cat([images, torch.stack(fakes)])
        labels = torch.cat([labels, torch.ones(len(fakes), dtype=labels.dtype)])
        masks = torch.cat([masks, torch.stack(blend_masks)])
        known = torch.cat([known, torch.ones(len(fakes), dtype=torch.bool)])
    else:
        images, labels = images.clone(), labels.clone()
        images[picked] = torch.stack(fakes)
        labels[picked] = 1
        masks[picked] = torch.stack(blend_masks)
    return images, labels, masks, known
