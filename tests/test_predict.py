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
def run_folder(tiny_run) -> Path:
    """A run folder with the tiny-cpu config and a consolidated weights file of its LTM model (conftest.py)."""
    return tiny_run


def test_cli_subprocess(run_folder, tmp_path):
    """The installed command line, once, in its own process."""
    proc = subprocess.run([sys.executable, "-m", "ltm.cli", "predict", str(PHOTO), "--run", str(run_folder),
                           "--weights", str(run_folder / "weights.pt")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(f"{PHOTO}: P(fake) = ") and "mean of 1 frame," in last


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


# ------------------------------------------------------------------------------------ the score equals prep's crop

FACES = [DATA / "faces" / "3ddfa__examples_inputs_JianzhuGuo.jpg", DATA / "faces" / "3ddfa__examples_inputs_emma.jpg"]
CROP = {"size": 96, "scale": 1.6}  # not prep's defaults (224, 1.3): predict must take them from the manifest


def _prep(media: Path, out: Path, **settings) -> None:
    from data_prep import datasets, pipeline

    name, items, skipped = datasets.folder(media, split="train", name="faces")
    result = pipeline.run(name, items, skipped, out, pipeline.Settings(frames=1, **settings),
                          pipeline.Runtime(progress=False))
    assert result["samples"] == len(items), result


def _loader_scores(cfg, folder: str, state: dict) -> dict[str, float]:
    """model.predict on every sample of a shard folder, decoded by the eval loader: video id -> P(fake)."""
    from ltm.data import build_eval_loader

    model = build_model(cfg.model, cfg.data.image_size)
    model.load_state_dict(state)
    model.eval()
    out = {}
    for b in build_eval_loader(cfg, [folder], 0, 1, "cpu", 8):
        out.update(zip(b["videos"], model.predict(b["images"]).tolist()))
    return out


@pytest.fixture(scope="module")
def prepped_run(tmp_path_factory) -> dict:
    """Two face photos prepped with non-default crop settings, and a run trained 4 steps on them (a tag per step)."""
    tmp = tmp_path_factory.mktemp("prepped")
    media = tmp / "media"
    for path, where in zip(FACES, ("real", "fake/Synth")):
        (media / where).mkdir(parents=True)
        (media / where / path.name).write_bytes(path.read_bytes())
    _prep(media, tmp / "shards", **CROP)
    run = tmp / "run"
    overrides = [f"data.root={tmp / 'shards'}", "data.loader=reference", "data.num_threads=0", "data.image_size=64",
                 "data.train=[{path: faces/train/real, weight: 1}, {path: faces/train/Synth, weight: 1}]",
                 "data.val=[]", "model.backbone=mobilenetv3_small_050", "model.vit.dim=32", "model.vit.depth=1",
                 # raw [0, 1] input: 4 steps from random weights then separate the two photos' scores (with the
                 # ImageNet normalisation of an untrained MobileNet they stay within 0.002 of each other)
                 "model.pretrained=null", "model.input_norm=none",
                 # deep mixup keeps 4 steps at lr 0.05 from saturating the scores (tiny-cpu leaves it off)
                 "model.mixup=true",
                 "train.batch_size=2", "train.iters_per_epoch=1", "train.epochs=4",
                 "train.lr=0.05", "train.lr_gamma=1.0", "train.ckpt_every=1", "train.val_every=0",
                 "train.zero_stage=0",
                 f"train.run_dir={run}"]
    from ltm.train.trainer import train  # one rank, in this process, as `ltm train` runs it

    assert train(load_config("tiny-cpu", overrides))["status"] == "completed"
    weights = {tag: torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                               weights_only=False)["module"] for tag in ("step00000003", "step00000004")}
    return {"tmp": tmp, "run": run, "cfg": load_config(run / "config.yaml"), "weights": weights}


def test_predict_scores_the_crop_prep_makes_and_the_tag_asked_for(ltm, prepped_run, tmp_path):
    """`ltm predict PHOTO --tag T` equals model.predict (weights of T) on PHOTO's sample in the prepped shards:
    same detector settings, colour order, margin and crop size (all from the manifest), JPEG and decode."""
    r = prepped_run
    photo = FACES[1]
    got = {}
    for tag in ("step00000003", "step00000004"):
        scores = _loader_scores(r["cfg"], "faces/train", r["weights"][tag])
        (video,) = [v for v in scores if "emma" in v]
        expected = scores[video]
        # not saturated, and the two photos' scores far apart: another crop of the photo would score differently
        assert 0.001 < expected < 0.999 and max(scores.values()) - min(scores.values()) > 0.01, scores
        proc = ltm(str(photo), "--run", str(r["run"]), "--tag", tag, "--json", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got[tag] = json.loads(proc.stdout.strip().splitlines()[-1])["p_fake"]
        assert got[tag] == pytest.approx(expected, abs=1e-5), tag
    assert abs(got["step00000003"] - got["step00000004"]) > 1e-4  # the tags hold different weights


def test_predict_detector_none_scores_the_file_as_a_crop(ltm, prepped_run, tmp_path):
    """`--detector none` on a file that already is a face crop equals prep with `--detector none` of that file."""
    import webdataset as wds

    r = prepped_run
    tar = next((r["tmp"] / "shards" / "faces" / "train" / "real").glob("*.tar"))
    sample = next(iter(wds.WebDataset(str(tar), shardshuffle=False, empty_check=False)))
    media = tmp_path / "media"
    (media / "real").mkdir(parents=True)
    crop = media / "real" / "crop.jpg"
    crop.write_bytes(sample["jpg"])
    _prep(media, tmp_path / "shards", detector="none", **CROP)
    cfg = load_config(r["run"] / "config.yaml", [f"data.root={tmp_path / 'shards'}"])
    (expected,) = _loader_scores(cfg, "faces/train", r["weights"]["step00000004"]).values()
    proc = ltm(str(crop), "--run", str(r["run"]), "--detector", "none", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["p_fake"] == pytest.approx(expected, abs=1e-5)


# ------------------------------------------------------------- a run trained on crops, scoring whole video frames


@pytest.fixture(scope="module")
def crops_run(tmp_path_factory, run_folder) -> Path:
    """A run whose training shards were prepped with `--detector none` (96 px, x1.6), with run_folder's weights."""
    tmp = tmp_path_factory.mktemp("crops-run")
    (tmp / "media" / "real").mkdir(parents=True)
    (tmp / "media" / "real" / "face.jpg").write_bytes(PHOTO.read_bytes())
    _prep(tmp / "media", tmp / "shards", detector="none", **CROP)
    settings = json.loads((tmp / "shards" / "faces" / "train" / "manifest.json").read_text())["settings"]
    assert settings["detector"] == "none" and settings["size"] == CROP["size"], settings
    run = tmp / "run"
    run.mkdir()
    cfg = load_config("tiny-cpu", [f"data.root={tmp / 'shards'}", "data.train=[{path: faces/train/real, weight: 1}]"])
    save_config(cfg, run / "config.yaml")
    return run


def _save_crop(frame: np.ndarray, box: list[int], path: Path) -> Path:
    """The square `box` of `frame` at the crop size, cut and resized as data_prep.faces cuts a face, as PNG."""
    import cv2

    x0, y0, x1, y1 = box
    size = CROP["size"]
    interp = cv2.INTER_AREA if y1 - y0 > size else cv2.INTER_CUBIC
    cut = np.ascontiguousarray(frame[y0:y1, x0:x1])
    Image.fromarray(cv2.resize(cut, (size, size), interpolation=interp)).save(path)
    return path


def test_predict_detects_faces_in_video_frames_when_the_run_was_trained_on_crops(ltm, crops_run, run_folder,
                                                                                 tmp_path):
    """Manifest `none`, whole 700x700 video frames: MTCNN finds the face by default, the cut has the manifest's
    size and enlargement, and each frame's P(fake) is that crop's (the crop saved at 96 px scores the same, taken
    as a crop because of its size)."""
    from data_prep.video import sample_frames

    weights = ("--weights", str(run_folder / "weights.pt"))
    proc = ltm(str(VIDEO), "--run", str(crops_run), *weights, "--frames", "2", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    video = json.loads(proc.stdout.strip().splitlines()[-1])
    assert video["detector"] == "mtcnn" and video["n_frames"] == 2 and video["no_face"] == []
    frames = dict(sample_frames(VIDEO, 2))
    crops = []
    for f in video["frames"]:
        (x0, y0, x1, y1), (fx0, fy0, fx1, fy1) = f["box"], f["face"]
        assert x1 - x0 == y1 - y0 < 700  # a square around the face, not the frame
        assert x1 - x0 == pytest.approx(CROP["scale"] * max(fx1 - fx0, fy1 - fy0), abs=2)
        assert (x0 + x1) / 2 == pytest.approx((fx0 + fx1) / 2, abs=2)
        crops.append(_save_crop(frames[f["frame"]], f["box"], tmp_path / f"crop{f['frame']}.png"))
    proc = ltm(*map(str, crops), "--run", str(crops_run), *weights, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    as_crops = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [c["detector"] for c in as_crops] == ["none", "none"]
    assert [c["p_fake"] for c in as_crops] == pytest.approx([f["p_fake"] for f in video["frames"]], abs=1e-5)
    proc = ltm(str(VIDEO), "--run", str(crops_run), *weights, "--frames", "1", cwd=tmp_path)
    assert proc.returncode == 0 and "detector mtcnn) -> " in proc.stdout.strip().splitlines()[-1], proc.stdout


def test_predict_detector_none_scores_the_whole_frame(ltm, crops_run, run_folder, tmp_path):
    from data_prep.video import sample_frames

    weights = ("--weights", str(run_folder / "weights.pt"))
    proc = ltm(str(VIDEO), "--run", str(crops_run), *weights, "--frames", "1", "--detector", "none", "--json",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    video = json.loads(proc.stdout.strip().splitlines()[-1])
    (frame,) = video["frames"]
    assert video["detector"] == "none" and frame["box"] == [0, 0, 700, 700]
    whole = _save_crop(dict(sample_frames(VIDEO, 1))[frame["frame"]], [0, 0, 700, 700], tmp_path / "whole.png")
    proc = ltm(str(whole), "--run", str(crops_run), *weights, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["p_fake"] == pytest.approx(frame["p_fake"], abs=1e-5)


def test_predict_folder_writes_one_csv_row_per_file(ltm, crops_run, run_folder, tmp_path):
    """`ltm predict DIR`: every video and image under DIR (recursively) gets a row of <run>/predict/DIR.csv; an
    undecodable file gets its error there, named in the log, and the other rows are kept."""
    import csv

    media = tmp_path / "media"
    (media / "clips" / "photos").mkdir(parents=True)
    (media / "clips" / "clip.mp4").write_bytes(VIDEO.read_bytes())
    (media / "clips" / "photos" / "face.jpg").write_bytes(PHOTO.read_bytes())
    (media / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    (media / "notes.txt").write_text("not media")
    weights = ("--weights", str(run_folder / "weights.pt"))
    proc = ltm(str(media), "--run", str(crops_run), *weights, "--frames", "2", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]  # one file failed
    assert "broken.mp4" in proc.stderr
    table = crops_run / "predict" / "media.csv"
    assert proc.stdout.strip().splitlines()[-1] == f"{table}: 3 files, 1 failed"
    with open(table, newline="") as f:
        rows = {Path(r["path"]).relative_to(media).as_posix(): r for r in csv.DictReader(f)}
    assert sorted(rows) == ["broken.mp4", "clips/clip.mp4", "clips/photos/face.jpg"]
    assert rows["broken.mp4"]["p_fake"] == "" and "broken.mp4" in rows["broken.mp4"]["error"]
    for name, n in (("clips/clip.mp4", "2"), ("clips/photos/face.jpg", "1")):
        row = rows[name]
        assert row["frames"] == n and row["detector"] == "mtcnn" and row["error"] == "", row
        assert 0.0 <= float(row["p_fake"]) <= 1.0
    assert sorted(p.name for p in table.parent.iterdir()) == ["media.csv"]  # no temporary file left
    assert sorted(p.name for p in media.iterdir()) == ["broken.mp4", "clips", "notes.txt"]  # the data untouched
