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


def write_tweaked(path, frames, codec, options, tweak):
    """A video whose packets `tweak(i, packet)` may change before they are written (i: the encoder's order)."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=25, options=options)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        count = 0

        def mux(packets):
            nonlocal count
            for packet in packets:
                tweak(count, packet)
                count += 1
                out.mux(packet)

        for array in frames:
            mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        mux(stream.encode())
    return path


def path_taken(monkeypatch, path, n) -> str:
    """Which way read_frames got its frames: "seek" or "from the start"."""
    taken = []
    seek = video._seek_wanted
    monkeypatch.setattr(video, "_seek_wanted", lambda *a: taken.append(seek(*a)) or taken[-1])
    read_frames(path, n, "video")
    monkeypatch.setattr(video, "_seek_wanted", seek)
    return "seek" if taken and taken[0] is not None else "from the start"


@pytest.mark.parametrize("name", sorted(VIDEOS))
def test_well_formed_videos_take_the_seeking_path(tmp_path, monkeypatch, name):
    codec, options = VIDEOS[name]
    path = write_video(tmp_path / name, moving_frames(90), fps=25, codec=codec, options=options)
    assert path_taken(monkeypatch, path, 16) == "seek"


def test_every_frame_of_an_open_gop_video_including_the_leading_ones(tmp_path, monkeypatch):
    codec, options = VIDEOS["h264_open_gop.mp4"]
    written = moving_frames(90)
    path = write_video(tmp_path / "open.mp4", written, fps=25, codec=codec, options=options)
    every = read_frames(path, 90, "video")
    assert every.indices == list(range(90)) and same_frames(every, read_frames(path, 90, "video", seek=False))
    assert [nearest(f, written) for f in every.frames] == every.indices
    assert path_taken(monkeypatch, path, 90) == "seek"


def test_an_mp4_that_calls_every_frame_a_keyframe_is_read_from_the_start(tmp_path, monkeypatch):
    """Without its sync-sample box (stss) an MP4 marks every frame a keyframe; MPEG-4 Part 2 then decodes a
    P-frame against grey instead of failing, so the decoder's own keyframe flag must be checked."""
    written = moving_frames(90)
    path = write_video(tmp_path / "v.mp4", written, fps=25, codec="mpeg4", options={"g": "30"})
    data = path.read_bytes()
    assert data.count(b"stss") == 1
    path.write_bytes(data.replace(b"stss", b"free"))
    got = read_frames(path, 16, "video")
    assert same_frames(got, read_frames(path, 16, "video", seek=False))
    assert [nearest(f, written) for f in got.frames] == got.indices
    assert path_taken(monkeypatch, path, 16) == "from the start"


@pytest.mark.parametrize("suffix", ["mp4", "mkv"])
def test_timestamps_out_of_the_decoders_order_are_read_from_the_start(tmp_path, monkeypatch, suffix):
    def swap_11_and_12(i, packet):
        packet.dts -= 1
        packet.pts += {11: 1, 12: -1}.get(i, 0)

    path = write_tweaked(tmp_path / f"v.{suffix}", moving_frames(90), "libx264", {"g": "30", "bf": "0"}, swap_11_and_12)
    assert same_frames(read_frames(path, 90, "video"), read_frames(path, 90, "video", seek=False))
    assert path_taken(monkeypatch, path, 90) == "from the start"


def test_frames_an_edit_list_cuts_are_not_counted(tmp_path, monkeypatch):
    """A file cut without re-encoding keeps the lead-in its first kept frame needs, marked discarded: decoded,
    never shown. They are neither counted nor sampled, and decoding still starts at their keyframe."""

    def lead_in(i, packet):
        packet.pts -= 7
        packet.dts -= 7

    written = moving_frames(90)
    path = write_tweaked(tmp_path / "cut.mp4", written, "libx264", {"g": "30", "bf": "2"}, lead_in)
    got = read_frames(path, 16, "video")
    assert got.total_frames == 83 and got.indices[-1] == 82
    assert same_frames(got, read_frames(path, 16, "video", seek=False))
    assert [nearest(f, written) - 7 for f in got.frames] == got.indices
    assert path_taken(monkeypatch, path, 16) == "seek"


def test_a_packet_the_decoder_shows_no_frame_for_moves_no_other_frames_number(tmp_path):
    """MPEG-4's not-coded frames (as Xvid writes them) are packets without a picture: counted in the timeline,
    never decoded. Both ways number the other frames by their timestamps, so both agree."""
    from fractions import Fraction

    import av

    not_coded = bytes([0, 0, 1, 0xB6, 0x50, 0x4F])  # a VOP header with vop_coded = 0
    path = tmp_path / "nvop.avi"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=25, options={"g": "30"})
        stream.height, stream.width, stream.pix_fmt = 48, 64, "yuv420p"
        stream.time_base = Fraction(1, 50)
        count = 0

        def mux(packets):  # frame i at 2i; the not-coded packet between frames 20 and 21
            nonlocal count
            for packet in packets:
                packet.time_base, packet.pts, packet.dts = Fraction(1, 50), 2 * count, 2 * count
                out.mux(packet)
                if count == 20:
                    extra = av.Packet(not_coded)
                    extra.stream, extra.time_base, extra.pts, extra.dts = stream, Fraction(1, 50), 41, 41
                    out.mux(extra)
                count += 1

        for array in moving_frames(40):
            mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        mux(stream.encode())
    got = read_frames(path, 41, "video")
    assert got.total_frames == 41
    assert same_frames(got, read_frames(path, 41, "video", seek=False))
    assert 21 not in got.indices and got.indices[:21] == list(range(21)) and got.indices[-1] == 40


def test_seeking_refuses_a_timeline_that_lists_a_frame_the_decoder_never_returns(tmp_path):
    """From each keyframe the decoder must return exactly the timeline's next frames. A timeline with one extra
    timestamp between two real frames (not a wanted one, so every wanted frame is still found by its timestamp)
    would number every later frame one too high: the seeking path refuses it (None: decode from the start)."""
    import av

    written = moving_frames(60)
    path = write_video(tmp_path / "g30.mp4", written, fps=25, codec="libx264", options={"g": "30"})
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        timeline = video._timeline(container, stream, video._Budget(path.name, None))
        assert np.searchsorted(timeline.pts, timeline.keyframes).tolist() == [0, 30]  # no scene-cut keyframe
        wanted = {40, 50}  # both after frame 35 and decoded from the keyframe at frame 30
        args = (path.name, None, video._Budget(path.name, None))
        frames, indices = video._seek_wanted(container, stream, timeline, wanted, *args)
        assert indices == [40, 50] and [nearest(f, written) for f in frames] == [40, 50]
        pts = timeline.pts
        assert pts[36] - pts[35] > 1  # room for a timestamp between them
        extra = np.insert(pts, 36, (pts[35] + pts[36]) // 2)  # a frame between 35 and 36 the file does not hold
        listed = video._Timeline(timeline.frames + 1, extra, timeline.keyframes)
        assert video._seek_wanted(container, stream, listed, {41, 51}, *args) is None
