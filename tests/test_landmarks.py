"""Dense face landmarks (MediaPipe's face mesh through LiteRT) on a real face photo, and the hull mask."""

import numpy as np
import pytest
from skimage import data as skdata

from dfdetect.faces import build_detector, crop_face, eye_angle
from dfdetect.landmarks import N_POINTS, FaceLandmarker, five_points, hull_mask


@pytest.fixture(scope="module")
def landmarker():
    return FaceLandmarker.load()


@pytest.fixture(scope="module")
def face():
    """The astronaut's face cropped as prepare crops it (box enlarged 1.3x, 256 px), and RetinaFace's 5 points
    in the crop's pixels: an independent model to check the mesh against."""
    from dfdetect.faces import square_box

    photo = skdata.astronaut()
    box = build_detector("retinaface").largest(photo)
    left, top, right, _ = square_box(box, photo.shape[1], photo.shape[0], 1.3)
    scale = 256 / (right - left)
    five = (np.array(box.landmarks) - [left, top]) * scale
    return crop_face(photo, box, 1.3, 256), five


def textures() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    gray = [np.stack([a[:256, :256]] * 3, -1) for a in (skdata.brick(), skdata.grass())]
    return [
        skdata.coffee()[100:356, 200:456],
        *gray,
        rng.integers(0, 255, (256, 256, 3), dtype=np.uint8),
        np.full((200, 300, 3), 120, np.uint8),
    ]


def test_468_points_on_the_face_inside_the_crop(landmarker, face):
    crop, five = face
    points = landmarker.landmarks(crop)
    assert points.shape == (N_POINTS, 2) and points.dtype == np.float32
    assert (points >= 0).all() and (points < 256).all()
    # The mesh's eyes, nose and mouth corners are where RetinaFace puts them (within 15% of the eye distance;
    # feeding 0-255 pixels instead of [0, 1] misses by about 20%, a mesh from a too-small face by 30%).
    eye_distance = np.linalg.norm(five[1] - five[0])
    errors = np.linalg.norm(five_points(points) - five, axis=1) / eye_distance
    assert errors.max() < 0.15, errors


def test_points_follow_a_rolled_face(landmarker, face):
    import cv2

    crop, _ = face
    upright = landmarker.landmarks(crop)
    matrix = cv2.getRotationMatrix2D((128, 128), 30, 1.0)
    turned = landmarker.landmarks(cv2.warpAffine(crop, matrix, (256, 256), borderMode=cv2.BORDER_REFLECT_101))
    expected = upright @ matrix[:, :2].T + matrix[:, 2]
    eye_distance = np.linalg.norm(upright[263] - upright[33])
    assert np.median(np.linalg.norm(turned - expected, axis=1)) < 0.1 * eye_distance
    assert abs(eye_angle(five_points(turned)) - eye_angle(five_points(upright)) + 30) < 5


def test_any_crop_size_and_shape(landmarker, face):
    import cv2

    crop, _ = face
    small = landmarker.landmarks(cv2.resize(crop, (96, 96), interpolation=cv2.INTER_AREA))
    reference = landmarker.landmarks(crop)
    assert np.median(np.linalg.norm(small * (256 / 96) - reference, axis=1)) < 6  # pixels of the 256 crop
    wide = landmarker.landmarks(cv2.copyMakeBorder(crop, 0, 0, 40, 40, cv2.BORDER_REFLECT_101))  # 336 x 256
    assert np.median(np.linalg.norm(wide - [40, 0] - reference, axis=1)) < 6


def test_hull_mask_covers_the_face_and_not_the_corners(landmarker, face):
    crop, five = face
    points = landmarker.landmarks(crop)
    mask = hull_mask(points, 256, 256)
    assert mask.shape == (256, 256) and mask.dtype == np.float32 and set(np.unique(mask)) == {0.0, 1.0}
    for x, y in five:  # eyes, nose, mouth corners
        assert mask[int(y), int(x)] == 1.0
    assert mask[0, 0] == mask[0, -1] == mask[-1, 0] == mask[-1, -1] == 0.0
    assert 0.3 < mask.mean() < 0.7


def test_no_landmarks_without_a_face(landmarker, face):
    for image in textures():
        _, presence = landmarker.mesh(image)
        assert presence < 0.1 and landmarker.landmarks(image) is None
    crop, _ = face
    results = landmarker.landmarks_many([crop, textures()[0], crop])
    assert [r is None for r in results] == [False, True, False] and np.array_equal(results[0], results[2])
