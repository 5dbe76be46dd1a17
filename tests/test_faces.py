"""Faces and videos: detection on a real face photo, crop geometry, videos -> face crops in prepare,
per-video splits, video-level metrics."""

import csv
import json

import numpy as np
import pytest
from conftest import face_frames, make_face_videos
from PIL import Image
from skimage import data as skdata

from dfdetect.config import FacesParams, PrepareParams
from dfdetect.data import DatasetError, load_split
from dfdetect.faces import (
    FaceBox,
    FaceError,
    build_detector,
    crop_face,
    eye_angle,
    framing,
    installed_file,
    iou,
    nms,
    square_box,
)
from dfdetect.metrics import video_level
from dfdetect.prepare import prepare

# The astronaut's face in scikit-image's photo (512 x 512), measured by eye: x, y, width, height.
ASTRONAUT_FACE = (180, 70, 90, 90)


@pytest.fixture(scope="module")
def detector():
    return build_detector("haar", min_face=40)


def test_finds_the_face_in_a_real_photo(detector):
    box = detector.largest(skdata.astronaut())
    assert box is not None and iou((box.x, box.y, box.w, box.h), ASTRONAUT_FACE) > 0.6


def test_no_face_in_images_without_one(detector):
    rng = np.random.default_rng(0)
    assert detector.largest(np.full((240, 320, 3), 120, np.uint8)) is None
    assert detector.largest(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)) is None
    assert detector.largest(skdata.coffee()) is None


def test_square_box_enlarges_around_the_centre_and_stays_inside():
    assert square_box(FaceBox(100, 100, 50, 50), 400, 300, 1.3) == (92, 92, 157, 157)  # side 65, same centre
    left, top, right, bottom = square_box(FaceBox(0, 0, 50, 50), 400, 300, 1.3)
    assert (left, top) == (0, 0) and right - left == 65 == bottom - top  # moved inside, not shrunk
    assert square_box(FaceBox(10, 10, 280, 280), 400, 300, 1.3) == (0, 0, 300, 300)  # shrunk to the frame


def test_crop_is_square_at_the_asked_size(detector):
    photo = skdata.astronaut()
    crop = crop_face(photo, detector.largest(photo), 1.3, 64)
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8


def test_unknown_detector_names_the_choices():
    with pytest.raises(FaceError, match="haar"):
        build_detector("retinaface-from-the-internet")


@pytest.fixture(scope="module")
def retina():
    return build_detector("retinaface", min_face=40)


def rotated(rgb: np.ndarray, degrees: float) -> np.ndarray:
    """The photo turned `degrees` counter-clockwise on screen around its centre."""
    import cv2

    h, w = rgb.shape[:2]
    return cv2.warpAffine(rgb, cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0), (w, h))


def test_retinaface_finds_the_face_and_its_landmarks(retina):
    faces = retina.detect(skdata.astronaut())
    assert len(faces) == 1
    box = faces[0]
    assert iou((box.x, box.y, box.w, box.h), ASTRONAUT_FACE) > 0.6 and box.score > 0.9
    assert len(box.landmarks) == 5
    for x, y in box.landmarks:
        assert box.x <= x <= box.x + box.w and box.y <= y <= box.y + box.h
    (rex, rey), (lex, ley), (nx, ny), (rmx, rmy), (lmx, lmy) = box.landmarks
    assert rex < nx < lex and rmx < lmx  # the subject's right eye and mouth corner are on the image's left
    assert max(rey, ley) < ny < min(rmy, lmy)  # eyes above the nose, the nose above the mouth


def test_retinaface_no_face_in_images_without_one(retina):
    rng = np.random.default_rng(0)
    assert retina.detect(np.full((240, 320, 3), 120, np.uint8)) == []
    assert retina.detect(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)) == []
    assert retina.detect(skdata.coffee()) == []
    assert retina.detect(skdata.chelsea()) == []  # a cat's face is not a face


def test_retinaface_maps_boxes_back_from_the_scaled_frame_and_honours_min_face(retina):
    big = np.asarray(Image.fromarray(skdata.astronaut()).resize((1536, 1536), Image.BICUBIC))  # run at 640
    box = retina.largest(big)
    assert iou((box.x, box.y, box.w, box.h), tuple(3 * v for v in ASTRONAUT_FACE)) > 0.6
    assert build_detector("retinaface", min_face=200).largest(skdata.astronaut()) is None  # the face is ~100 px


def test_align_levels_the_eyes_of_a_rolled_face(retina):
    photo = rotated(skdata.astronaut(), 20)
    box = retina.largest(photo)
    assert abs(eye_angle(box.landmarks)) > 10  # the face is rolled (the photo's own tilt is about 3 degrees)
    plain = retina.largest(crop_face(photo, box, 1.3, 256))
    assert abs(eye_angle(plain.landmarks)) > 10  # cropping alone keeps the roll
    aligned = retina.largest(crop_face(photo, box, 1.3, 256, align=True))
    assert aligned is not None and abs(eye_angle(aligned.landmarks)) < 5
    assert aligned.w > 256 / 2  # still the face, filling the crop as the unaligned one does


def test_align_without_landmarks_and_the_default_crop_are_unchanged(detector, retina):
    photo = skdata.astronaut()
    haar = detector.largest(photo)
    assert haar.landmarks is None
    assert np.array_equal(crop_face(photo, haar, 1.3, 64, align=True), crop_face(photo, haar, 1.3, 64))
    box = retina.largest(photo)
    bare = FaceBox(box.x, box.y, box.w, box.h, box.score)
    assert np.array_equal(crop_face(photo, box, 1.3, 64), crop_face(photo, bare, 1.3, 64))  # align is opt-in
    assert not np.array_equal(crop_face(photo, box, 1.3, 64, align=True), crop_face(photo, box, 1.3, 64))


def test_facebox_stays_a_frozen_value():
    box = FaceBox(1, 2, 3, 4)
    assert box.landmarks is None and box.score == 1.0 and hash(box) == hash(FaceBox(1, 2, 3, 4))
    with pytest.raises(AttributeError):
        box.x = 5


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9]], np.float32)
    scores = np.array([0.8, 0.9, 0.7, 0.6], np.float32)
    assert nms(boxes, scores, 0.4) == [1, 2]
    assert nms(boxes, scores, 0.95) == [1, 0, 2, 3]


def test_a_missing_model_package_is_named():
    with pytest.raises(FaceError, match="'no-such-face-models' package is not installed"):
        installed_file("no-such-face-models", "models/face.onnx")


def test_video_level_scores_are_frame_means():
    labels, scores = video_level(
        ["a", "a", "b", "b", "c"], np.array([1, 1, 0, 0, 1]), np.array([0.9, 0.7, 0.2, 0.4, 0.6])
    )
    assert labels.tolist() == [1, 0, 1] and np.allclose(scores, [0.8, 0.3, 0.6])
    with pytest.raises(ValueError, match="both labels"):
        video_level(["a", "a"], np.array([0, 1]), np.array([0.1, 0.9]))


@pytest.fixture(scope="module")
def video_data(tmp_path_factory):
    root = make_face_videos(tmp_path_factory.mktemp("videos") / "data", {"train": 2, "val": 1, "test": 1}, frames=6)
    (root / "train" / "real" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    blank = [np.full((120, 160, 3), 80 + 10 * i, np.uint8) for i in range(4)]
    from conftest import write_video

    write_video(root / "train" / "fake" / "no_face.mp4", blank)
    return root


def params(**faces) -> PrepareParams:
    return PrepareParams(image_size=32, faces=FacesParams(frames_per_video=3, crop_size=48, **faces))


def test_prepare_turns_videos_into_face_crops(video_data, tmp_path):
    report = prepare(video_data, tmp_path / "out", params(), workers=2)
    rows = list(csv.DictReader((tmp_path / "out" / "manifest.csv").open()))
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 2 * (2 + 1 + 1) * 3  # every good video: 3 sampled frames, each with a face
    for r in ok:
        crop = tmp_path / "out" / r["path"]
        assert Image.open(crop).size == (48, 48)
        assert r["source"].endswith(".mp4") and r["video"] == f"{r['class']}/{r['source'].rsplit('/', 1)[1][:-4]}"
        assert int(r["frame"]) in (0, 2, 3, 5)  # 3 of 6 frames, spread evenly
    faces = report["faces"]
    assert any("broken.mp4" in e for e in faces["unreadable"])  # reported by name, skipped
    assert faces["without_face"] == {"train/fake/no_face.mp4": [0, 2, 3]}
    assert faces["no_face_at_all"] == ["train/fake/no_face.mp4"] and faces["frames_without_face"] == 3
    assert "broken.mp4" in (tmp_path / "out" / "report.md").read_text()
    # Frames of one video stay in one split, and the split knows each image's video.
    test = load_split(tmp_path / "out", "test")
    assert len(set(test.groups)) == 2 and len(test.groups) == 6
    splits_of = {}
    for r in ok:
        splits_of.setdefault(r["video"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits_of.values())
    assert report["splits"]["train"]["videos"] == 4


def test_the_same_video_in_two_splits_is_refused(video_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(video_data, data)
    shutil.copy(data / "train" / "fake" / "fake_train_000.mp4", data / "test" / "fake" / "fake_train_000.mp4")
    with pytest.raises(DatasetError, match=r"fake/fake_train_000.*\['train', 'test'\]"):
        prepare(data, tmp_path / "out", params())
    assert not (tmp_path / "out").exists()


def test_group_pattern_keeps_the_frames_of_an_image_video_together(tmp_path, sample_root):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(sample_root, data)
    for split in ("train", "test"):  # frames 1 and 2 of video 7, one in train and one in test
        frame = next((data / split / "fake").iterdir())
        frame.rename(frame.with_name(f"vid007_{split}frame.jpg"))
    pattern = r"^(?P<video>vid\d+)_\w+$"
    with pytest.raises(DatasetError, match="fake/vid007"):
        prepare(data, tmp_path / "out", PrepareParams(image_size=32, group_pattern=pattern))
    report = prepare(data, tmp_path / "out", PrepareParams(image_size=32))  # without the pattern: images alone
    assert report["files_used"] > 0


def test_crop_images_crops_faces_of_photos_too(tmp_path):
    data = tmp_path / "data"
    for split in ("train", "val"):
        for class_name in ("real", "fake"):
            folder = data / split / class_name
            folder.mkdir(parents=True)
            for i, frame in enumerate(face_frames(2, class_name == "fake", seed=len(split))):
                Image.fromarray(frame).save(folder / f"{class_name}_{i}.jpg")
    report = prepare(data, tmp_path / "out", params(crop_images=True))
    assert report["faces"]["crops"] == 8 and report["faces"]["videos"] == 0
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert all(rel.startswith("faces/") for rel in meta["splits"]["train"]["relpaths"])


def test_serving_crops_faces_with_the_training_code():
    """serving.face_crop uses prepare's settings and code: the same crop as a training face, or None."""
    from dfdetect.faces import FaceCropper
    from dfdetect.ingest import _get_detector
    from dfdetect.responses import face_json

    faces = FacesParams(crop_size=64)
    cropper = FaceCropper(faces)
    frame = face_frames(1, fake=False, seed=3)[0]
    crop, box = cropper(frame)
    expected = crop_face(frame, _get_detector(faces).largest(frame), faces.margin, faces.crop_size)
    assert np.array_equal(crop, expected) and crop.shape == (64, 64, 3)
    assert set(face_json(box)) == {"x", "y", "width", "height"}
    assert cropper(np.full((120, 160, 3), 90, np.uint8)) is None


def test_framing_measures_the_margin_a_crop_was_made_with(retina):
    photo = skdata.astronaut()
    box = retina.largest(photo)
    for margin in (0.85, 1.0, 1.5):
        crop = crop_face(photo, box, margin, 128)
        (measured,) = framing([crop], retina)
        assert margin <= measured < 1.15 * margin  # a face found in a crop comes out a little smaller
    assert framing([skdata.coffee()[:200, :200]], retina) == []


def test_prepare_frames_every_crop_as_the_data_s_own_stills_with_margin_auto(tmp_path, retina):
    """Tight face stills (0.9 x the box) plus videos: auto measures 0.9, crops the videos so, records it."""
    from conftest import write_video

    from dfdetect.data import load_meta, preprocess_config

    photo = skdata.astronaut()
    box = retina.largest(photo)
    root = tmp_path / "data"
    for k, split in enumerate(("train", "val")):
        for label in ("real", "fake"):
            (root / split / label).mkdir(parents=True)
            for i in range(3):
                crop = crop_face(photo[i + 3 * k :], box, 0.9, 96)  # shifted: no two files alike
                Image.fromarray(crop if label == "real" else crop[:, ::-1]).save(
                    root / split / label / f"{label}_{i}.jpg"
                )
            write_video(
                root / split / label / f"{label}_{split}_clip.mp4", face_frames(4, label == "fake", seed=len(split))
            )
    params = PrepareParams(
        image_size=32, faces=FacesParams(detector="retinaface", margin="auto", frames_per_video=2, crop_size=64)
    )
    report = prepare(root, tmp_path / "out", params)
    assert 0.85 < report["face_margin"] < 1.05 and any("margin auto" in n for n in report["notes"])
    assert preprocess_config(tmp_path / "out").face_margin == report["face_margin"]
    crops = [p for p in (tmp_path / "out" / "faces").rglob("*.jpg")]
    assert crops and load_meta(tmp_path / "out")["preprocess"]["face_margin"] == report["face_margin"]
    (ratio,) = framing([np.asarray(Image.open(crops[0]))], retina)  # the video's crops are framed like the stills
    assert abs(ratio - report["face_margin"]) < 0.15


def test_margin_auto_resolves_to_the_model_s_framing():
    auto = FacesParams(margin="auto")
    assert auto.with_margin(0.87).margin == 0.87 and auto.with_margin(None).margin == 1.3
    assert FacesParams(margin=1.1).with_margin(0.87).margin == 0.87  # the model's own framing wins
    assert FacesParams(margin=1.1).with_margin(None).margin == 1.1
    with pytest.raises(ValueError):
        FacesParams(margin=0.2)
