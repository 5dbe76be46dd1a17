"""Sampled frames are decoded from the keyframe before each, not from the start of the video; the frames and
their numbers must be exactly those of decoding from the start, for every container and codec we open."""

import numpy as np
import pytest
from conftest import write_mjpeg_video, write_video

from dfdetect import video
from dfdetect.video import read_frames


def moving_frames(n: int, size=(48, 64)) -> list[np.ndarray]:
    """Frames that differ from each other (a pattern sliding by a pixel a frame, the frame number in a corner),
    so a wrong frame cannot pass for the right one."""
    base = np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)
    frames = []
    for i in range(n):
        frame = np.roll(base, i, axis=1)
        frame[:8, :8] = (i * 7) % 256
        frames.append(frame)
    return frames


VIDEOS = {  # name: (codec, encoder options): B-frames reorder decoding, open GOPs lead with frames of the last
    "h264_bframes.mp4": ("libx264", {"g": "12", "bf": "3", "preset": "ultrafast"}),
    "h264_open_gop.mp4": ("libx264", {"g": "15", "bf": "2", "x264-params": "open-gop=1"}),
    "h264.mkv": ("libx264", {"g": "10"}),
    "mpeg4.avi": ("mpeg4", {"g": "9"}),
    "vp8.webm": ("libvpx", {"g": "11"}),
}


def nearest(frame: np.ndarray, sources: list[np.ndarray]) -> int:
    return int(np.argmin([np.abs(frame.astype(int) - s).mean() for s in sources]))


def same_frames(a, b) -> bool:
    return a.indices == b.indices and all(np.array_equal(x, y) for x, y in zip(a.frames, b.frames))


@pytest.mark.parametrize("name", sorted(VIDEOS))
def test_seeking_gives_the_frames_of_decoding_from_the_start(tmp_path, name):
    codec, options = VIDEOS[name]
    written = moving_frames(90)
    path = write_video(tmp_path / name, written, fps=25, codec=codec, options=options)
    from_start = read_frames(path, 16, "video", seek=False)
    seeking = read_frames(path, 16, "video")
    assert from_start.total_frames == seeking.total_frames == 90
    assert len(seeking.indices) == 16 and seeking.indices[0] == 0 and seeking.indices[-1] == 89
    assert same_frames(seeking, from_start)
    # and those are the frames written: each is nearest its own source frame
    assert [nearest(f, written) for f in seeking.frames] == seeking.indices


def test_seeking_in_an_mjpeg_video_where_every_frame_is_a_keyframe(tmp_path):
    path = write_mjpeg_video(tmp_path / "mjpeg.avi", [(32, 24)] * 40)
    assert same_frames(read_frames(path, 8, "video"), read_frames(path, 8, "video", seek=False))


def decoded_frame_count(monkeypatch, path, **kwargs) -> int:
    """How many frames read_frames decodes: every decoded frame's size is checked once, the header's once."""
    calls = []
    check = video._check_frame_size
    monkeypatch.setattr(video, "_check_frame_size", lambda *a: (calls.append(a), check(*a))[1])
    read_frames(path, 16, "video", **kwargs)
    monkeypatch.setattr(video, "_check_frame_size", check)
    return len(calls) - 1


def test_a_long_video_costs_its_sampled_groups_of_pictures_not_all_its_frames(tmp_path, monkeypatch):
    path = write_video(
        tmp_path / "long.mp4",
        moving_frames(1200, (24, 32)),
        fps=25,
        codec="libx264",
        options={"g": "20", "bf": "2", "preset": "ultrafast"},
    )
    assert decoded_frame_count(monkeypatch, path, seek=False) == 1200
    assert decoded_frame_count(monkeypatch, path) <= 16 * 20  # at most one group of pictures per sampled frame


def test_timestamps_that_do_not_match_the_decoder_fall_back_to_decoding_from_the_start(tmp_path, monkeypatch):
    path = write_video(tmp_path / "v.mp4", moving_frames(60), fps=25, codec="libx264", options={"g": "10"})
    expected = read_frames(path, 8, "video", seek=False)
    timeline = video._timeline

    def shifted(*args):  # as if the packets' timestamps were one tick off the decoded frames'
        real = timeline(*args)
        return video._Timeline(real.frames, real.pts + 1, real.keyframes)

    monkeypatch.setattr(video, "_timeline", shifted)
    assert same_frames(read_frames(path, 8, "video"), expected)
