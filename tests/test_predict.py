"""ltm predict on real face videos and photos: faces found by MTCNN, one P(fake) per frame, heatmaps, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shared_data import SHARED_DATA

from ltm.cli import main
from ltm.config import load_config, save_config
from ltm.models import build_model

REPO = Path(__file__).resolve().parents[1]
DATA = SHARED_DATA
VIDEO = DATA / "videos" / "retalking__examples_face_1.mp4"
PHOTO = DATA / "faces" / "3ddfa__examples_inputs_JianzhuGuo.jpg"


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A run folder with the tiny-cpu config and a consolidated weights file of its LTM model."""
    run = tmp_path_factory.mktemp("predict-run")
    cfg = load_config("tiny-cpu", ["data.root=" + str(run / "no-shards")])  # no manifest: prep's default crops
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    torch.save(build_model(cfg.model, cfg.data.image_size).state_dict(), run / "weights.pt")
    return run


def test_cli_subprocess(run_folder, tmp_path):
    """The installed command line, once, in its own process."""
    proc = subprocess.run([sys.executable, "-m", "ltm.cli", "predict", str(PHOTO), "--run", str(run_folder),
                           "--weights", str(run_folder / "weights.pt")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(f"{PHOTO}: P(fake) = ") and "mean of 1 frames" in last


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def ltm(capsys, caplog):
    """`ltm predict ...` in this process (the model and detector imports are paid once per test session)."""

    def call(*args: str, cwd: Path) -> Result:
        capsys.readouterr()
        caplog.clear()
        code = main(["predict", *args])
        out = capsys.readouterr()
        return Result(code, out.out, out.err + caplog.text)

    return call


def test_predict_video_gives_probability_per_frame(ltm, run_folder, tmp_path):
    heatmaps = tmp_path / "heatmaps"
    proc = ltm(str(VIDEO), str(PHOTO), "--run", str(run_folder), "--weights", str(run_folder / "weights.pt"),
               "--frames", "4", "--heatmap", str(heatmaps), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    video, photo = (json.loads(line) for line in proc.stdout.strip().splitlines())
    assert video["file"] == str(VIDEO) and video["n_frames"] == 4 and video["no_face"] == []
    probs = [f["p_fake"] for f in video["frames"]]
    assert all(0.0 <= p <= 1.0 for p in probs)
    assert video["p_fake"] == pytest.approx(float(np.mean(probs)))
    assert len({f["frame"] for f in video["frames"]}) == 4
    for f in video["frames"]:  # a face box inside the 700x700 frame, not the whole frame
        x0, y0, x1, y1 = f["box"]
        assert 0 <= x0 < x1 <= 700 and 0 <= y0 < y1 <= 700 and (x1 - x0) < 700
    assert photo["n_frames"] == 1
    assert len(video["pictures"]) == 4 and len(photo["pictures"]) == 1
    for p in video["pictures"] + photo["pictures"]:
        with Image.open(p) as im:
            im.verify()
            assert im.format == "PNG"


def test_predict_errors(ltm, run_folder, tmp_path):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((200, 200, 3), 127, np.uint8)).save(blank)
    args = ("--run", str(run_folder), "--weights", str(run_folder / "weights.pt"))
    proc = ltm(str(blank), *args, cwd=tmp_path)
    assert proc.returncode == 2 and "blank.png: no face found" in proc.stderr
    proc = ltm(str(tmp_path / "missing.mp4"), *args, cwd=tmp_path)
    assert proc.returncode == 2 and "missing.mp4: no such file" in proc.stderr
    proc = ltm(str(PHOTO), "--run", str(tmp_path / "no-run"), cwd=tmp_path)
    assert proc.returncode == 2 and "no-run" in proc.stderr
