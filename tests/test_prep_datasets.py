"""Celeb-DF v2, WildDeepfake, generic folder/CSV adapters on generated trees in their real layouts; bad inputs."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import datasets, pipeline
from data_prep.shards import read_shard
from data_prep.video import VideoError, sample_frames, write_video
from ltm.cli import main

FAST = pipeline.Settings(frames=2, size=64)
QUIET = pipeline.Runtime(progress=False)


def _all(root: Path, dataset: str, split: str, method: str) -> list[dict]:
    return [s for t in sorted((root / dataset / split / method).glob("*.tar")) for s in read_shard(t)]


def _manifest(root: Path, dataset: str, split: str) -> dict:
    return json.loads((root / dataset / split / "manifest.json").read_text())


def _real(sample_root: Path, i: int) -> Path:
    return sample_root / "original_sequences" / "youtube" / "c23" / "videos" / f"{i:03d}.mp4"


def _fake(sample_root: Path, a: int, b: int) -> Path:
    return sample_root / "manipulated_sequences" / "FaceSwap" / "c23" / "videos" / f"{a:03d}_{b:03d}.mp4"


# ---------------------------------------------------------------- Celeb-DF v2
def test_celebdf_list_label_is_inverted(sample_root, tmp_path):
    root = tmp_path / "Celeb-DF-v2"
    for d in ("Celeb-real", "YouTube-real", "Celeb-synthesis"):
        (root / d).mkdir(parents=True)
    shutil.copy(_real(sample_root, 0), root / "Celeb-real" / "id0_0000.mp4")
    shutil.copy(_real(sample_root, 1), root / "Celeb-real" / "id1_0000.mp4")
    shutil.copy(_real(sample_root, 2), root / "YouTube-real" / "00000.mp4")
    shutil.copy(_fake(sample_root, 0, 1), root / "Celeb-synthesis" / "id0_id1_0000.mp4")
    shutil.copy(_fake(sample_root, 1, 0), root / "Celeb-synthesis" / "id1_id0_0000.mp4")
    # the official list: label 1 = REAL, 0 = fake
    (root / "List_of_testing_videos.txt").write_text(
        "1 Celeb-real/id0_0000.mp4\n0 Celeb-synthesis/id0_id1_0000.mp4\n1 YouTube-real/00099.mp4\n")
    name, items, skipped = datasets.celebdf(root)
    assert name == "celebdf_v2"
    got = {(it.split, it.method, it.label, it.video) for it in items}
    assert got == {("test", "real", 0, "id0_0000"), ("test", "fake", 1, "id0_id1_0000"),
                   ("train", "real", 0, "id1_0000"), ("train", "real", 0, "00000"),
                   ("train", "fake", 1, "id1_id0_0000")}
    assert [s["reason"] for s in skipped] == ["listed in List_of_testing_videos.txt but absent"]
    out = tmp_path / "shards"
    res = pipeline.run(name, items, skipped, out, FAST, QUIET)
    assert res["samples"] > 0
    for s in _all(out, "celebdf_v2", "test", "fake"):
        assert s["cls"] == b"1" and json.loads(s["json"])["video"] == "celebdf_v2-fake-id0_id1_0000"
    for s in _all(out, "celebdf_v2", "test", "real"):
        assert s["cls"] == b"0"
    assert _manifest(out, "celebdf_v2", "test")["skipped"][0]["path"].endswith("YouTube-real/00099.mp4")
    assert not (out / "celebdf_v2" / "val").exists()


def test_celebdf_layout_errors_name_the_folder(tmp_path):
    (tmp_path / "Celeb-real").mkdir()
    with pytest.raises(datasets.LayoutError, match="YouTube-real"):
        datasets.celebdf(tmp_path)


# ---------------------------------------------------------------- WildDeepfake
def _png_frames(folder: Path, n: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), np.uint8)).save(folder / f"{i:04d}.png")


def _tar_gz(path: Path, members: list[tuple[str, bytes | None, str]]) -> None:
    """members: (name, data, kind) with kind file | symlink."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_wdf_folders_and_archives_with_escaping_members_refused(tmp_path):
    root = tmp_path / "wdf"
    _png_frames(root / "real_train" / "12" / "3", 5, 0)  # sequence folders, two levels as shipped
    _png_frames(root / "real_train" / "12" / "4", 3, 1)
    _png_frames(root / "fake_test" / "7", 4, 2)
    png = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(png, format="PNG")
    png = png.getvalue()
    (root / "fake_train").mkdir()
    _tar_gz(root / "fake_train" / "31.tar.gz", [("31/1/0001.png", png, "file"), ("31/1/0002.png", png, "file")])
    _tar_gz(root / "fake_train" / "32.tar.gz", [("32/0001.png", png, "file"), ("../../escape.png", png, "file")])
    _tar_gz(root / "fake_train" / "33.tar.gz", [("/tmp/abs_escape.png", png, "file")])
    _tar_gz(root / "fake_train" / "34.tar.gz", [("34/link.png", None, "symlink")])
    out = tmp_path / "shards"
    name, items, skipped = datasets.wdf(root, pipeline.work_dir(out, "wdf"))
    reasons = {Path(s["path"]).name: s["reason"] for s in skipped}
    assert "outside" in reasons["32.tar.gz"] and "absolute" in reasons["33.tar.gz"] and "link" in reasons["34.tar.gz"]
    assert not (tmp_path / "escape.png").exists() and not list(tmp_path.rglob("escape.png"))
    assert not Path("/tmp/abs_escape.png").exists()
    got = {(it.split, it.method, it.label, it.video) for it in items}
    assert got == {("train", "real", 0, "12_3"), ("train", "real", 0, "12_4"), ("test", "fake", 1, "7"),
                   ("train", "fake", 1, "31_31_1")}
    crops = pipeline.Settings(frames=2, size=64, detector="none")  # WildDeepfake frames are face crops already
    res = pipeline.run(name, items, skipped, out, crops, QUIET)
    assert res["samples"] == 2 + 2 + 2 + 2
    train_fake = _all(out, "wdf", "train", "fake")
    assert [json.loads(s["json"])["video"] for s in train_fake] == ["wdf-fake-31_31_1"] * 2
    assert all(Image.open(io.BytesIO(s["jpg"])).size == (64, 64) for s in train_fake)
    m = _manifest(out, "wdf", "train")
    assert {Path(s["path"]).name for s in m["skipped"]} == {"32.tar.gz", "33.tar.gz", "34.tar.gz"}
    assert sorted(p.name for p in (out / "wdf").iterdir()) == ["test", "train"]  # no val split in WildDeepfake


# ---------------------------------------------------------------- generic folder and CSV
def test_folder_tree_and_csv(sample_root, tmp_path):
    root = tmp_path / "mine"
    (root / "real").mkdir(parents=True)
    (root / "fake" / "Deepfakes").mkdir(parents=True)
    shutil.copy(_real(sample_root, 3), root / "real" / "clip one.mp4")
    frame = sample_frames(_real(sample_root, 4), 1)[0][1]
    Image.fromarray(frame).save(root / "real" / "photo.jpg")
    (root / "real" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "real" / "notes.txt").write_text("hello")
    shutil.copy(_fake(sample_root, 3, 2), root / "fake" / "Deepfakes" / "x.mp4")
    out = tmp_path / "shards"
    assert main(["prep", "folder", "--root", str(root), "--out", str(out), "--frames", "2", "--size", "64",
                 "--no-progress"]) == 0
    m = _manifest(out, "mine", "test")
    assert m["totals"]["by_method"].keys() == {"real", "Deepfakes"}
    reasons = {Path(s["path"]).name: s["reason"] for s in m["skipped"]}
    assert "not a video or image" in reasons["notes.txt"] and "unreadable image" in reasons["broken.jpg"]
    videos = {json.loads(s["json"])["video"] for s in _all(out, "mine", "test", "real")}
    assert videos == {"mine-real-clip_one", "mine-real-photo"}  # key-safe ids, with dataset and method

    csv = tmp_path / "list.csv"
    csv.write_text("path,label,method,split\n"
                   f"{_real(sample_root, 5)},0,,train\n"
                   f"{_fake(sample_root, 5, 4)},fake,Swap,train\n"
                   f"{_real(sample_root, 6)},maybe,,train\n"
                   "missing.mp4,1,,train\n")
    name, items, skipped = datasets.csv_list(csv, root=tmp_path)
    assert name == "list"
    assert {(it.split, it.method, it.label) for it in items} == {("train", "real", 0), ("train", "Swap", 1)}
    assert any("'maybe'" in s["reason"] for s in skipped) and any("does not exist" in s["reason"] for s in skipped)


# ---------------------------------------------------------------- bad inputs
def _ffpp_tree(sample_root: Path, root: Path) -> None:
    shutil.copytree(sample_root, root)


def test_ffpp_bad_inputs_are_skipped_and_named(sample_root, tmp_path):
    root = tmp_path / "ffpp"
    _ffpp_tree(sample_root, root)
    test_pairs = json.loads((root / "splits" / "test.json").read_text())
    a, b = test_pairs[0]
    real_dir = root / "original_sequences" / "youtube" / "c23" / "videos"
    (real_dir / f"{a}.mp4").write_bytes(b"\x00garbage" * 100)  # corrupt
    data = (real_dir / f"{b}.mp4").read_bytes()
    (real_dir / f"{b}.mp4").write_bytes(data[: len(data) // 3])  # truncated
    (root / "manipulated_sequences" / "SelfBlend" / "c23" / "videos" / f"{a}_{b}.mp4").unlink()  # absent
    out = tmp_path / "shards"
    name, items, skipped = datasets.ffpp(root, root / "splits", "c23", splits=["test"])
    res = pipeline.run(name, items, skipped, out, FAST, QUIET)
    assert res["samples"] > 0
    m = _manifest(out, "ffpp_c23", "test")
    reasons = {Path(s["path"]).name: s["reason"] for s in m["skipped"]}
    assert "cannot open" in reasons[f"{a}.mp4"] or "corrupt" in reasons[f"{a}.mp4"]
    assert reasons[f"{a}_{b}.mp4"] == "listed in test.json but absent"
    # a truncated file either keeps the frames that decode or is skipped with a reason; it never stops the run
    truncated = [s for s in m["skipped"] if s["path"].endswith(f"/{b}.mp4")]
    kept = {json.loads(s["json"])["video"] for s in _all(out, "ffpp_c23", "test", "real")}
    assert bool(truncated) != (f"ffpp_c23-real-{b}" in kept)
    assert "FaceSwap" in m["totals"]["by_method"]


def test_layout_errors(tmp_path, sample_root):
    with pytest.raises(datasets.LayoutError, match=str(tmp_path / "nope")):
        datasets.ffpp(tmp_path / "nope", tmp_path, "c23")
    (tmp_path / "ff" / "original_sequences").mkdir(parents=True)
    with pytest.raises(datasets.LayoutError, match="original_sequences/youtube/c23/videos"):
        datasets.ffpp(tmp_path / "ff", sample_root / "splits", "c23")
    with pytest.raises(datasets.LayoutError, match="FaceForensics/tree/master/dataset/splits"):
        datasets.ffpp(sample_root, None, "c23")
    with pytest.raises(datasets.LayoutError, match="train.json"):
        datasets.ffpp(sample_root, tmp_path, "c23")
    with pytest.raises(datasets.LayoutError, match="manipulated_sequences/Deepfakes/c23/videos"):
        datasets.ffpp(sample_root, sample_root / "splits", "c23", methods=["Deepfakes"])
    # through the command line: a clear message and a non-zero exit
    assert main(["prep", "celebdf", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2


def test_nothing_usable_exits_non_zero(tmp_path):
    root = tmp_path / "bad"
    (root / "real").mkdir(parents=True)
    (root / "real" / "a.mp4").write_bytes(b"\x00" * 1000)
    (root / "fake").mkdir()
    (root / "fake" / "b.png").write_bytes(b"nope")
    assert main(["prep", "folder", "--root", str(root), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    m = _manifest(tmp_path / "o", "bad", "test")
    assert len(m["skipped"]) == 2 and m["totals"]["samples"] == 0


def test_video_errors_name_the_file(tmp_path):
    bad = tmp_path / "x.mp4"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(VideoError, match="x.mp4"):
        sample_frames(bad, 4)
    with pytest.raises(VideoError, match="no such file"):
        sample_frames(tmp_path / "missing.mp4", 4)


def test_seek_sampling_matches_full_decode(tmp_path):
    """Seeked frames are exactly the frames a full decode gives at those indices (frame index drawn into the
    picture, so an off-by-one seek shows)."""
    frames = []
    for i in range(120):
        f = np.zeros((64, 96, 3), np.uint8)
        f[:, : (i % 96) + 1] = 255 - i
        frames.append(f)
    path = write_video(tmp_path / "v.mp4", frames, fps=25, crf=10)
    full = dict(sample_frames(path, None))
    assert sorted(full) == list(range(120))
    picked = sample_frames(path, 7, seek_gap=4)  # force a seek before every frame
    assert [i for i, _ in picked] == [0, 20, 40, 60, 79, 99, 119]
    for i, arr in picked:
        assert np.array_equal(arr, full[i])


def test_detector_choices_fail_clearly(tmp_path):
    from data_prep.faces import build_detector, square_box

    with pytest.raises(ValueError, match="--detector-model"):
        build_detector("yunet", "cpu")
    with pytest.raises(FileNotFoundError, match="yunet.onnx"):
        build_detector("yunet", "cpu", tmp_path / "yunet.onnx")
    with pytest.raises(ValueError, match="unknown face detector"):
        build_detector("haar", "cpu")
    # the FF++ crop: 1.3x, square, shifted inside the frame, shrunk to the short side when it cannot fit
    assert square_box((100, 100, 200, 220), 1.3, 640, 480) == (72, 82, 228, 238)
    assert square_box((0, 0, 100, 100), 1.3, 640, 480) == (0, 0, 130, 130)
    assert square_box((500, 300, 640, 480), 1.3, 640, 480) == (406, 246, 640, 480)
    assert square_box((0, 0, 600, 470), 1.3, 640, 480) == (60, 0, 540, 480)
