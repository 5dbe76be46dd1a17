"""Video reading benchmark: the cost of sampling a video's frames when each is decoded from the keyframe before
it (`read_frames`, the default of prepare and serving) against decoding from the start (`seek=False`, how
videos were read before), on videos of growing length. Writes JSON.

  python benchmarks/video_decode.py --out benchmarks/results/video_decode.json

The videos are written first (H.264 from PyAV's bundled libx264, a keyframe every --gop frames as x264 places
them by default; x264's veryfast preset, with B-frames): a moving textured picture, so frames cost what camera footage of
that size costs to decode. Both ways must return the same frames; the benchmark stops if they do not.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
from PIL import Image

from dfdetect import video
from dfdetect.io_utils import atomic_write_json
from dfdetect.video import read_frames


def write_h264(path: Path, frames: int, size: tuple[int, int], fps: int, gop: int) -> None:
    width, height = size
    rng = np.random.default_rng(0)  # a smooth random picture: no noise to inflate the bit rate
    coarse = rng.integers(0, 255, (height // 16, width // 8, 3), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(coarse).resize((width * 2, height), Image.BICUBIC))
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"g": str(gop), "preset": "veryfast", "crf": "23"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            shift = (i * 3) % width
            picture = np.ascontiguousarray(texture[:, shift : shift + width])
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def seek_path_taken(path: Path, frames: int) -> bool:
    """Whether read_frames got its frames by seeking (a silent fallback would time the old way twice)."""
    results, seek = [], video._seek_wanted
    video._seek_wanted = lambda *a: results.append(seek(*a)) or results[-1]
    try:
        read_frames(path, frames)
    finally:
        video._seek_wanted = seek
    return bool(results) and results[0] is not None


def best_of(repeats: int, fn) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, nargs="+", default=[10, 60, 600], help="video lengths to time")
    parser.add_argument("--size", type=int, nargs=2, default=[854, 480], metavar=("W", "H"), help="frame size")
    parser.add_argument("--fps", type=int, default=25, help="frames per second of the videos")
    parser.add_argument("--gop", type=int, default=250, help="frames between keyframes (x264's default: 250)")
    parser.add_argument("--frames", type=int, default=16, help="frames sampled per video (serving.video_frames)")
    parser.add_argument("--repeats", type=int, default=2, help="timings per way; the best is kept")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/video_decode.json"))
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seconds in args.seconds:
            path = Path(tmp) / f"{seconds}s.mp4"
            write_h264(path, seconds * args.fps, tuple(args.size), args.fps, args.gop)
            from_start_s, from_start = best_of(args.repeats, lambda: read_frames(path, args.frames, seek=False))
            seeking_s, seeking = best_of(args.repeats, lambda: read_frames(path, args.frames))
            if not seek_path_taken(path, args.frames):
                raise SystemExit(f"{seconds} s video: read_frames fell back to decoding from the start")
            same = seeking.indices == from_start.indices and all(
                np.array_equal(a, b) for a, b in zip(seeking.frames, from_start.frames)
            )
            if not same:
                raise SystemExit(f"{seconds} s video: seeking returned other frames than decoding from the start")
            row = {
                "seconds": seconds,
                "frames": seeking.total_frames,
                "megabytes": round(path.stat().st_size / 1e6, 2),
                "from_start_s": round(from_start_s, 3),
                "seeking_s": round(seeking_s, 3),
                "speedup": round(from_start_s / seeking_s, 1),
            }
            rows.append(row)
            print(row)
    result = {
        "benchmark": "video_decode",
        "command": "python " + " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "pyav": av.__version__,
        "video": {"codec": "h264", "size": args.size, "fps": args.fps, "gop": args.gop, "sampled": args.frames},
        "rows": rows,
    }
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
