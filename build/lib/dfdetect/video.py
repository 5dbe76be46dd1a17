"""Reading videos with PyAV (FFmpeg): uniformly sampled frames and the facts a report needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".webm", ".mkv"}


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


def read_frames(path: str | Path, n_frames: int, name: str | None = None) -> VideoFrames:
    import av

    name = name or str(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{name}: no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0.0)
            total = stream.frames
            if total <= 0:  # the container does not say: count by decoding once
                total = sum(1 for _ in container.decode(stream))
                container.seek(0)
            wanted = set(sample_indices(total, n_frames))
            frames, indices = [], []
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    indices.append(i)
                if len(indices) == len(wanted):
                    break
            width, height = stream.codec_context.width, stream.codec_context.height
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            else:
                duration = total / fps if fps else 0.0
    except VideoError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as exc:
        raise VideoError(f"{name}: not a supported video ({type(exc).__name__}: {exc})") from None
    if not frames:
        raise VideoError(f"{name}: no decodable frames")
    return VideoFrames(frames, indices, fps, duration, width, height, total)
