"""Reading videos with PyAV (FFmpeg): uniformly sampled frames and the facts a report needs.

Uploads are hostile input. FFmpeg left to itself picks a demuxer from the file name and follows what the file
names (an HLS or concat playlist reads other files; a MOV reference opens another path), so a file is opened
only as one of a short list of container formats, chosen from its first bytes, through a Python file object
(no FFmpeg protocol at all), with external references off.
"""

from __future__ import annotations

import array
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".webm", ".mkv"}
SUPPORTED_CONTAINERS = "MP4/MOV, Matroska/WebM or AVI"
# ISO base media (MP4, MOV, 3GP): a box size, then one of these box types
_ISO_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot"}
# FFmpeg demuxer per sniffed family, and the demuxer names FFmpeg reports for them once opened
_ALLOWED_DEMUXERS = {
    "mov": {"mov", "mov,mp4,m4a,3gp,3g2,mj2"},
    "matroska": {"matroska", "matroska,webm"},
    "avi": {"avi"},
}
# Options of the demuxers: no external data references; only the file protocol if anything is opened by URL.
_CONTAINER_OPTIONS = {"protocol_whitelist": "file", "enable_drefs": "0", "use_absolute_path": "0"}


class VideoError(ValueError):
    """A file that is not a video this machine can decode."""


@dataclass
class VideoFrames:
    frames: list[np.ndarray]  # H x W x 3 uint8, RGB
    indices: list[int]  # frame numbers in the video
    fps: float
    duration_s: float
    width: int
    height: int
    total_frames: int


def sample_indices(total: int, n: int) -> list[int]:
    """n frame numbers spread evenly over [0, total), first and last included when n > 1."""
    if total <= 0 or n <= 0:
        return []
    if n >= total:
        return list(range(total))
    return sorted({round(i * (total - 1) / (n - 1)) for i in range(n)}) if n > 1 else [total // 2]


def sniff_container(head: bytes) -> str | None:
    """The FFmpeg demuxer for a file that starts with `head` (at least 12 bytes), or None: not a container we
    open. Decided from the content only, never from a name a client chose."""
    if len(head) >= 12 and head[4:8] in _ISO_BOXES:
        return "mov"
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: Matroska and WebM
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    return None


def _reason(exc: BaseException) -> str:
    """Why FFmpeg or the OS refused, without the path it was given (server paths must not reach clients)."""
    text = getattr(exc, "strerror", None) or type(exc).__name__
    return str(text).split(": '/")[0]


def read_frames(
    path: str | Path,
    n_frames: int,
    name: str | None = None,
    max_pixels: int | None = None,
    time_limit_s: float | None = None,
    seek: bool = True,
) -> VideoFrames:
    """Sample `n_frames` frames uniformly. `name` is what errors call the file (never the path when given);
    `max_pixels` refuses frames larger than this (width x height): the header's size before any frame is
    decoded, and each decoded frame's own (a stream may change size midway). `time_limit_s` bounds the work:
    a small file can hold millions of tiny frames, each packet of which is read to number them. With `seek`, each
    sampled frame is decoded from the keyframe before it, so a long video costs its sampled frames' groups of
    pictures, not all its frames; the frames and their numbers are those of decoding from the start (`seek=False`,
    also what a file whose timestamps cannot be trusted gets)."""
    import av

    name = name or str(path)
    try:
        with open(path, "rb") as fh:
            demuxer = sniff_container(fh.read(12))
            if demuxer is None:
                raise VideoError(
                    f"{name}: not a supported video container (expected {SUPPORTED_CONTAINERS}, "
                    "recognised from the content)"
                )
            fh.seek(0)
            with av.open(fh, format=demuxer, container_options=dict(_CONTAINER_OPTIONS)) as container:
                budget = _Budget(name, time_limit_s)
                return _sample(container, n_frames, name, demuxer, max_pixels, budget, seek)
    except VideoError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, IndexError, EOFError) as exc:
        raise VideoError(f"{name}: not a supported video ({type(exc).__name__}: {_reason(exc)})") from None


class _Budget:
    """The time a video may take to read: checked between frames and packets, so one step overruns it by at most
    one frame's decoding (frames are bounded by max_pixels)."""

    def __init__(self, name: str, limit_s: float | None):
        self.name, self.limit_s = name, limit_s
        self.deadline = None if limit_s is None else time.monotonic() + limit_s

    def check(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise VideoError(f"{self.name}: reading the sampled frames took over {self.limit_s:g} s")


def _sample(
    container, n_frames: int, name: str, demuxer: str, max_pixels: int | None, budget: _Budget, seek: bool
) -> VideoFrames:
    if container.format.name not in _ALLOWED_DEMUXERS[demuxer]:
        raise VideoError(f"{name}: container {container.format.name!r} is not allowed ({SUPPORTED_CONTAINERS})")
    if not container.streams.video:
        raise VideoError(f"{name}: no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:  # a codec tag FFmpeg does not know
        raise VideoError(f"{name}: its video codec is not one this machine can decode")
    width, height = stream.codec_context.width, stream.codec_context.height
    _check_frame_size(name, width, height, max_pixels)
    if max_pixels is not None:  # FFmpeg's own limit: a larger frame later in the stream fails before allocation
        stream.codec_context.options = {**stream.codec_context.options, "max_pixels": str(max_pixels)}
    fps = float(stream.average_rate or stream.guessed_rate or 0.0)
    timeline = _timeline(container, stream, budget)
    total = timeline.frames
    wanted = set(sample_indices(total, n_frames))
    got = None
    if seek and timeline.seekable:
        got = _seek_wanted(container, stream, timeline, wanted, name, max_pixels, budget)
    if got is None:  # seeking cannot be trusted for this file: decode from the start
        container.seek(0)
        got = _decode_wanted(container, stream, timeline, wanted, name, max_pixels, budget)
    frames, indices = got
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    else:
        duration = total / fps if fps else 0.0
    if not frames:
        raise VideoError(f"{name}: no decodable frames")
    return VideoFrames(frames, indices, fps, duration, width, height, total)


@dataclass
class _Timeline:
    """What one pass over the packets (no decoding) says: frame count, and where each frame and keyframe is."""

    frames: int
    pts: np.ndarray  # the frames' timestamps in presentation order: frame i is the one with pts[i]
    keyframes: np.ndarray  # sorted timestamps of the keyframes: decoding may start at each

    @property
    def seekable(self) -> bool:
        return len(self.pts) > 0 and len(self.keyframes) > 0 and self.keyframes[0] <= self.pts[0]


def _timeline(container, stream, budget: _Budget) -> _Timeline:
    """Count the frames and collect their timestamps from the packets. Packets an edit list discards (the lead-in
    of a file cut without re-encoding) are decoded but never shown: not frames, though a keyframe among them is
    still where decoding can start. A timeline with a missing or repeated timestamp is not seekable. Timestamps
    are kept in 8-byte arrays: a hostile file may hold millions of tiny packets."""
    frames, pts, keyframes, trusted = 0, array.array("q"), array.array("q"), True
    for seen, packet in enumerate(container.demux(stream), 1):
        if seen % 1000 == 0:
            budget.check()
        if not packet.size:  # the demuxer's end-of-stream marker, not a frame
            continue
        if packet.pts is None:
            trusted = False
        elif trusted and packet.is_keyframe:
            keyframes.append(packet.pts)
        if packet.is_discard:
            continue
        frames += 1
        if trusted:
            pts.append(packet.pts)
    container.seek(0)
    ordered = np.sort(np.frombuffer(pts, dtype=np.int64))
    if not trusted or (len(ordered) > 1 and (np.diff(ordered) == 0).any()):
        return _Timeline(frames, np.empty(0, np.int64), np.empty(0, np.int64))
    return _Timeline(frames, ordered, np.sort(np.frombuffer(keyframes, dtype=np.int64)))


def _seek_wanted(container, stream, timeline: _Timeline, wanted: set[int], name, max_pixels, budget: _Budget):
    """The wanted frames, each decoded from the keyframe before it. From that keyframe on, the decoder must give
    exactly the timeline's frames in order, the first a real keyframe: a container that marks frames it cannot
    start from as keyframes, timestamps out of order, or frames the decoder drops or adds all return None, and
    so does any FFmpeg error here (the caller then decodes from the start, where real damage is reported)."""
    import av

    by_pts = {int(timeline.pts[i]): i for i in wanted}
    groups: dict[int, list[int]] = {}  # keyframe timestamp -> the wanted timestamps decoded from it
    for target in sorted(by_pts):
        key = int(timeline.keyframes[np.searchsorted(timeline.keyframes, target, side="right") - 1])
        groups.setdefault(key, []).append(target)
    found: dict[int, np.ndarray] = {}
    try:
        for key, targets in groups.items():
            container.seek(key, stream=stream, backward=True)
            pending, expected = list(targets), int(np.searchsorted(timeline.pts, key))
            started = False
            for frame in container.decode(stream):
                _check_frame_size(name, frame.width, frame.height, max_pixels)
                budget.check()
                if frame.pts is None:
                    return None
                if not started and frame.pts < key:
                    continue  # an open group of pictures' leading frames, shown before its keyframe
                if not started and frame.pts == key and not frame.key_frame:
                    return None  # the container called it a keyframe; the decoder did not start from it
                started = True
                if expected >= len(timeline.pts) or frame.pts != timeline.pts[expected]:
                    return None  # a frame dropped, added or out of order
                expected += 1
                if frame.pts == pending[0]:
                    found[by_pts[pending.pop(0)]] = frame.to_ndarray(format="rgb24")
                    if not pending:
                        break
            if pending:
                return None
    except av.error.FFmpegError:
        return None
    indices = sorted(found)
    return [found[i] for i in indices], indices


def _decode_wanted(
    container, stream, timeline: _Timeline, wanted: set[int], name: str, max_pixels: int | None, budget: _Budget
):
    """The wanted frames (RGB arrays) and their numbers, decoding from the start up to the last one wanted. With
    trusted timestamps a frame's number is its place in the timeline, as the seeking path numbers it (a frame
    the decoder drops moves no other's number); without, the order in which frames are decoded."""
    found: dict[int, np.ndarray] = {}
    last = max(wanted, default=-1)
    numbered_by_pts = len(timeline.pts) > 0
    with _decoding(name, max_pixels):
        for count, frame in enumerate(container.decode(stream)):
            _check_frame_size(name, frame.width, frame.height, max_pixels)  # also where FFmpeg's limit is ignored
            number = count
            if numbered_by_pts:
                place = int(np.searchsorted(timeline.pts, frame.pts)) if frame.pts is not None else -1
                number = place if 0 <= place < len(timeline.pts) and timeline.pts[place] == frame.pts else -1
            if number in wanted:
                found[number] = frame.to_ndarray(format="rgb24")
            if len(found) == len(wanted) or number >= last:
                break
            budget.check()
    indices = sorted(found)  # timestamps out of order: returned in number order, as the seeking path does
    return [found[i] for i in indices], indices


@contextlib.contextmanager
def _decoding(name: str, max_pixels: int | None):
    """FFmpeg's decoding errors as a VideoError that says what may be wrong."""
    import av

    try:
        yield
    except av.error.FFmpegError as exc:
        limit = f" or over the limit of {max_pixels} pixels" if max_pixels is not None else ""
        raise VideoError(f"{name}: a frame could not be decoded (damaged{limit}; {_reason(exc)})") from None


def _check_frame_size(name: str, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise VideoError(f"{name}: {width}x{height} frames are over the limit of {max_pixels} pixels")
