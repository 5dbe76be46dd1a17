"""benchmarks/error_analysis.py: the per-video breakdown that the README's quality analysis quotes."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "error_analysis.py"


def _run(csv: Path, *args):
    return subprocess.run([sys.executable, str(SCRIPT), str(csv), *args], capture_output=True, text=True, timeout=120)


def _write(path, videos):
    rows = [
        {"path": f"{video}_{i}.jpg", "video": video, "label": label, "fake_probability": score}
        for video, label, scores in videos
        for i, score in enumerate(scores)
    ]
    pd.DataFrame(rows).to_csv(path, index=False)


def test_separates_within_video_noise_from_misranked_videos(tmp_path):
    # every video's mean is on its side, but frames overlap: r1's 0.6 outranks f1's 0.4
    _write(
        tmp_path / "noisy.csv",
        [("r1", 0, [0.1, 0.6]), ("r2", 0, [0.2, 0.3]), ("f1", 1, [0.9, 0.4]), ("f2", 1, [0.8, 0.7])],
    )
    result = _run(tmp_path / "noisy.csv", "--worst", "1", "--out", str(tmp_path / "report.json"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["frames"] == 8 and report["videos"] == 4
    assert report["frame_roc_auc"] == 0.9375  # 15 of 16 (fake, real) frame pairs ranked right
    assert report["video_roc_auc"] == 1.0 and report["frame_roc_auc_with_video_means"] == 1.0
    assert report["fake_videos_scored_lowest"] == [{"video": "f1", "mean": 0.65, "frames": 2}]
    assert report["real_videos_scored_highest"] == [{"video": "r1", "mean": 0.35, "frames": 2}]
    # a whole fake video scored as real: averaging frames cannot mend it
    _write(tmp_path / "misranked.csv", [("r1", 0, [0.3, 0.4]), ("f1", 1, [0.9, 0.8]), ("f2", 1, [0.1, 0.2])])
    report = json.loads(_run(tmp_path / "misranked.csv").stdout)
    assert report["frame_roc_auc_with_video_means"] == 0.5 and report["video_roc_auc"] == 0.5
    assert report["fake_videos_scored_lowest"][0]["video"] == "f2"
    # still images: every "video" is one frame, and the report stays valid JSON
    _write(tmp_path / "stills.csv", [("a", 0, [0.2]), ("b", 1, [0.7])])
    report = json.loads(_run(tmp_path / "stills.csv").stdout)
    assert report["frame_roc_auc"] == 1.0 and report["mean_within_video_std"] is None


def test_names_missing_columns_and_files(tmp_path):
    pd.DataFrame({"path": ["a.jpg"], "label": [0], "fake_probability": [0.2]}).to_csv(tmp_path / "p.csv", index=False)
    result = _run(tmp_path / "p.csv")
    assert (
        result.returncode != 0
        and "p.csv: predictions need the columns" in result.stderr
        and "missing ['video']" in result.stderr
    )
    assert "Traceback" not in result.stderr
    result = _run(tmp_path / "nope.csv")
    assert result.returncode != 0 and "nope.csv: no such file" in result.stderr
