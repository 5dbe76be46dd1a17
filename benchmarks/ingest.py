"""Face ingestion benchmark: how well and how fast the face detectors find faces, and frames per second of
video ingestion (decode + detect + crop) through `dfdetect.ingest`. Writes JSON.

  python benchmarks/ingest.py --faces ../shared/datasets/faceswap128/test --out benchmarks/results/ingest.json

Accuracy: real face crops (--faces: a folder of tight face crops, searched recursively) pasted at a random
place and size into 640x360 frames; a hit is a detected box with IoU >= 0.4 with the pasted face. False
positives: frames made from scikit-image's photos without a face (coffee, chelsea the cat, rocket, coins).
Every registered detector is scored (Haar, RetinaFace), plus the other bundled Haar cascades; ingestion is timed
with each registered detector (--ingest-detectors).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dfdetect.config import FacesParams
from dfdetect.data import ImageFile
from dfdetect.faces import HaarFaceDetector, available_detectors, build_detector, iou
from dfdetect.ingest import extract_faces
from dfdetect.video import read_frames

FRAME = (360, 640)


def background(rng) -> np.ndarray:
    """A smooth random colour field (no structure a detector could mistake for a face)."""
    small = rng.integers(30, 220, size=(4, 6, 3), dtype=np.uint8)
    return np.array(Image.fromarray(small).resize(FRAME[::-1], Image.BILINEAR))


def positives(face_files: list[Path], rng) -> list[tuple[np.ndarray, tuple]]:
    out = []
    for path in face_files:
        side = int(rng.integers(96, 200))
        face = np.asarray(Image.open(path).convert("RGB").resize((side, side), Image.BICUBIC))
        frame = background(rng)
        y, x = int(rng.integers(0, FRAME[0] - side)), int(rng.integers(0, FRAME[1] - side))
        frame[y : y + side, x : x + side] = face
        out.append((frame, (x, y, side, side)))
    return out


def negatives(rng, n: int) -> list[np.ndarray]:
    from skimage import data

    photos = [data.coffee(), data.chelsea(), data.rocket(), np.stack([data.coins()] * 3, -1)]
    out = []
    for i in range(n):
        photo = Image.fromarray(photos[i % len(photos)])
        scale = float(rng.uniform(1.0, 1.6))
        photo = photo.resize((int(FRAME[1] * scale), int(FRAME[0] * scale)))
        x, y = int(rng.integers(0, photo.width - FRAME[1] + 1)), int(rng.integers(0, photo.height - FRAME[0] + 1))
        out.append(np.asarray(photo.crop((x, y, x + FRAME[1], y + FRAME[0]))))
    return out


def score_detector(detector, pos, neg) -> dict:
    hits, ious, started = 0, [], time.perf_counter()
    for frame, truth in pos:
        box = detector.largest(frame)
        overlap = iou((box.x, box.y, box.w, box.h), truth) if box else 0.0
        hits += overlap >= 0.4
        ious.append(overlap)
    false_positives = sum(detector.largest(frame) is not None for frame in neg)
    seconds = time.perf_counter() - started
    return {
        "recall": round(hits / len(pos), 4),
        "mean_iou": round(float(np.mean(ious)), 4),
        "false_positive_frames": round(false_positives / len(neg), 4),
        "ms_per_frame": round(1000 * seconds / (len(pos) + len(neg)), 2),
    }


def write_videos(folder: Path, pos, n_videos: int, frames: int) -> list[ImageFile]:
    import av

    files = []
    for v in range(n_videos):
        path = folder / "test" / "real" / f"clip_{v:03d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame0, (x, y, w, h) = pos[v % len(pos)]
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=25)
            stream.height, stream.width, stream.pix_fmt = FRAME[0], FRAME[1], "yuv420p"
            for i in range(frames):
                frame = np.roll(frame0, shift=(i % 20) - 10, axis=1)  # a face that moves a little
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        files.append(ImageFile(path, path.relative_to(folder).as_posix(), "test", "real"))
    return files


def time_ingestion(files: list[ImageFile], out: Path, params: FacesParams, workers: list[int], sampled: int) -> dict:
    """Sampled frames per second of decode + detect + crop through `extract_faces`, per worker count."""
    timings = {}
    for n in workers:
        started = time.perf_counter()
        results = extract_faces(files, out / f"workers{n}", params, n)
        seconds = time.perf_counter() - started
        timings[f"workers_{n}"] = {
            "frames_per_s": round(sampled / seconds, 2),
            "seconds": round(seconds, 2),
            "frames": sampled,
            "crops": sum(len(r.crops) for r in results),
        }
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--faces", type=Path, required=True, help="folder of tight face crops (jpg/png), searched recursively"
    )
    parser.add_argument("--n", type=int, default=300, help="face frames and as many face-free frames to score")
    parser.add_argument("--videos", type=int, default=8, help="videos to ingest for the frames-per-second figure")
    parser.add_argument("--frames", type=int, default=100, help="frames per video (16 are sampled from each)")
    parser.add_argument("--workers", type=int, default=2, help="ingestion processes")
    parser.add_argument(
        "--ingest-detectors",
        default=",".join(available_detectors()),
        help="comma-separated detectors to time ingestion with (default: every registered one)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ingest.json"))
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    face_files = sorted(p for p in args.faces.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not face_files:
        raise SystemExit(f"{args.faces}: no face images found")
    face_files = [face_files[i] for i in rng.choice(len(face_files), size=min(args.n, len(face_files)), replace=False)]
    pos, neg = positives(face_files, rng), negatives(rng, len(face_files))

    detectors = {name: build_detector(name) for name in available_detectors()}
    for cascade in ("haarcascade_frontalface_default.xml", "haarcascade_frontalface_alt.xml"):
        detectors[f"haar ({cascade})"] = HaarFaceDetector.load(cascade=cascade)
    accuracy = {name: score_detector(d, pos, neg) for name, d in detectors.items()}
    print(json.dumps(accuracy, indent=2))

    params = FacesParams(frames_per_video=16)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_videos(Path(tmp) / "data", pos, args.videos, args.frames)
        started = time.perf_counter()
        sampled = sum(len(read_frames(f.path, params.frames_per_video).frames) for f in files)
        decode_s = time.perf_counter() - started
        ingest = {}
        for name in args.ingest_detectors.split(","):
            timings = time_ingestion(
                files,
                Path(tmp) / name,
                params.model_copy(update={"detector": name}),
                sorted({1, args.workers}),
                sampled,
            )
            if name == FacesParams().detector:
                ingest.update(timings)  # the default detector's figures stay where they always were
            ingest[name] = timings
    result = {
        "machine": {"cpu_count": __import__("os").cpu_count(), "platform": platform.platform()},
        "faces": str(args.faces),
        "n_face_frames": len(pos),
        "n_face_free_frames": len(neg),
        "frame": list(FRAME),
        "accuracy": accuracy,
        "ingest": {
            "videos": len(files),
            "frames_per_video_sampled": params.frames_per_video,
            "decode_only_frames_per_s": round(sampled / decode_s, 2),
            **ingest,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ingest"], indent=2))


if __name__ == "__main__":
    main()
