"""The cross-dataset benchmark adapters (data_prep.adapters) on miniature copies of each dataset's own layout: the
file names, JSON/CSV/TXT label files and folder structure of the download, filled with real face videos and photos
from the shared test media (re-encoded small), plus a corrupt video, a video without a face and a missing label.
Each test goes through `ltm prep NAME` and reads the shards back."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from shared_data import SHARED_DATA

from data_prep import adapters
from data_prep.shards import read_shard
from data_prep.video import read_image, sample_frames, write_video
from ltm.cli import main

CLIP_FRAMES = 6
CLIP_SIDE = 160
FACE_VIDEOS = ["liveportrait__assets_examples_driving_d11", "liveportrait__assets_examples_driving_d12",
               "liveportrait__assets_examples_driving_d18", "liveportrait__assets_examples_driving_d19",
               "liveportrait__assets_examples_driving_d20", "retalking__examples_face_3",
               "retalking__examples_face_5", "retalking__examples_face_2"]
FACE_PHOTOS = ["deepface__tests_unit_dataset_img1.jpg", "deepface__tests_unit_dataset_img2.jpg",
               "deepface__tests_unit_dataset_img3.jpg", "deepface__tests_unit_dataset_img4.jpg"]

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "videos").is_dir(), reason=f"no shared test media at {SHARED_DATA}")


def _small(frame: np.ndarray, side: int) -> np.ndarray:
    return cv2.resize(frame, (side, side), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict:
    """Real face clips (6 frames, 160 px), a clip without a face, a corrupt file, face photos, a two-person clip with
    the mask of its right-hand face, and a clip whose middle frame has no face. Built once for the module."""
    root = tmp_path_factory.mktemp("media")
    clips = []
    for i, name in enumerate(FACE_VIDEOS):
        frames = [_small(f, CLIP_SIDE) for _, f in sample_frames(SHARED_DATA / "videos" / f"{name}.mp4", CLIP_FRAMES)]
        clips.append(write_video(root / f"clip{i}.mp4", frames))
    rng = np.random.default_rng(0)
    flat = [np.full((CLIP_SIDE, CLIP_SIDE, 3), 90 + 10 * k, np.uint8) + rng.integers(0, 8, (CLIP_SIDE, CLIP_SIDE, 3),
                                                                                       dtype=np.uint8)
            for k in range(CLIP_FRAMES)]
    noface = write_video(root / "noface.mp4", flat)
    corrupt = root / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(rng.integers(0, 255, 3000, dtype=np.uint8)))
    photos = []
    for i, name in enumerate(FACE_PHOTOS):
        im = read_image(SHARED_DATA / "faces" / name)
        h, w = im.shape[:2]
        s = 200 / max(h, w)
        p = root / f"photo{i}.png"
        Image.fromarray(cv2.resize(im, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)).save(p)
        photos.append(p)
    # DFD-style scene: a large face on the left (a bystander), a smaller forged face on the right under the mask
    left = [_small(f, 200) for _, f in sample_frames(SHARED_DATA / "videos" / f"{FACE_VIDEOS[3]}.mp4", CLIP_FRAMES)]
    right = [_small(f, 120) for _, f in sample_frames(SHARED_DATA / "videos" / f"{FACE_VIDEOS[4]}.mp4", CLIP_FRAMES)]
    scene, mask = [], []
    for a, b in zip(left, right):
        canvas = np.full((200, 320, 3), 40, np.uint8)
        canvas[:, :200] = a
        canvas[40:160, 200:320] = b
        scene.append(canvas)
        m = np.zeros((200, 320, 3), np.uint8)
        m[50:150, 210:310] = 255
        mask.append(m)
    two = write_video(root / "two_people.mp4", scene)
    two_mask = write_video(root / "two_people_mask.mp4", mask)
    # 9 frames, the face blanked out on frame 4 (the middle one of 3 evenly spaced samples: 0, 4, 8)
    nine = [_small(f, CLIP_SIDE) for _, f in sample_frames(SHARED_DATA / "videos" / f"{FACE_VIDEOS[0]}.mp4", 9)]
    nine[4] = flat[0]
    gap = write_video(root / "gap.mp4", nine)
    return {"clips": clips, "noface": noface, "corrupt": corrupt, "photos": photos, "two": two, "two_mask": two_mask,
            "gap": gap}


def _put(src: Path, dst: Path) -> Path:
    """A miniature layout links to the pooled media (the adapters see the dataset's file names)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dst)
    return dst


def _prep(source: str, root: Path, out: Path, *extra: str, frames: int = 2) -> int:
    return main(["prep", source, "--root", str(root), "--out", str(out), "--frames", str(frames), "--size", "64",
                 "--no-progress", *extra])


def _samples(out: Path, dataset: str, split: str, method: str) -> list[dict]:
    return [s for t in sorted((out / dataset / split / method).glob("*.tar")) for s in read_shard(t)]


def _meta(sample: dict) -> dict:
    return json.loads(sample["json"])


def _manifest(out: Path, dataset: str, split: str) -> dict:
    return json.loads((out / dataset / split / "manifest.json").read_text())


def _videos(out: Path, dataset: str, split: str, method: str) -> dict[str, int]:
    """{video id without the dataset-method prefix: label} over the shards of one method folder."""
    got = {}
    prefix = f"{dataset}-{method}-"
    for s in _samples(out, dataset, split, method):
        m = _meta(s)
        assert s["cls"] == str(m["label"]).encode() and m["method"] == method and m["split"] == split
        got[m["video"][len(prefix):]] = m["label"]
    return got


def _reasons(manifest: dict) -> dict[str, str]:
    return {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}


# ---------------------------------------------------------------- DFDC
def test_dfdc_parts_metadata_and_test_labels(media, tmp_path):
    root = tmp_path / "DFDC"
    c = media["clips"]
    p0, p1 = root / "dfdc_train_part_0", root / "dfdc_train_part_1"
    _put(c[0], p0 / "aaaaaaaaaa.mp4")
    _put(c[1], p0 / "bbbbbbbbbb.mp4")
    _put(c[2], p0 / "cccccccccc.mp4")
    _put(media["corrupt"], p0 / "dddddddddd.mp4")
    _put(c[3], p0 / "eeeeeeeeee.mp4")
    (p0 / "metadata.json").write_text(json.dumps({
        "aaaaaaaaaa.mp4": {"label": "REAL", "split": "train", "original": None},
        "bbbbbbbbbb.mp4": {"label": "FAKE", "split": "train", "original": "aaaaaaaaaa.mp4"},
        "cccccccccc.mp4": {"label": "FAKE", "split": "train", "original": "aaaaaaaaaa.mp4"},
        "dddddddddd.mp4": {"label": "REAL", "split": "train", "original": None},
        "eeeeeeeeee.mp4": {"split": "train"},  # no label
        "ffffffffff.mp4": {"label": "FAKE", "split": "train", "original": "aaaaaaaaaa.mp4"},  # absent
    }))
    _put(c[4], p1 / "gggggggggg.mp4")
    _put(media["noface"], p1 / "hhhhhhhhhh.mp4")
    (p1 / "metadata.json").write_text(json.dumps({
        "gggggggggg.mp4": {"label": "REAL", "split": "train", "original": None},
        "hhhhhhhhhh.mp4": {"label": "FAKE", "split": "train", "original": "gggggggggg.mp4"}}))
    test = root / "test"
    _put(c[5], test / "videos" / "tttttttttt.mp4")
    _put(c[6], test / "videos" / "uuuuuuuuuu.mp4")
    _put(c[7], test / "videos" / "vvvvvvvvvv.mp4")  # on no row of labels.csv
    (test / "labels.csv").write_text("filename,label\ntttttttttt.mp4,1\nuuuuuuuuuu.mp4,0\n")

    name, items, skipped = adapters.dfdc(root)
    assert name == "dfdc"
    got = {(it.split, it.method, it.label, it.video) for it in items}
    assert got == {("train", "real", 0, "aaaaaaaaaa"), ("train", "fake", 1, "bbbbbbbbbb"),
                   ("train", "fake", 1, "cccccccccc"), ("train", "real", 0, "dddddddddd"),
                   ("train", "real", 0, "gggggggggg"), ("train", "fake", 1, "hhhhhhhhhh"),
                   ("test", "fake", 1, "tttttttttt"), ("test", "real", 0, "uuuuuuuuuu")}
    fake = next(it for it in items if it.video == "bbbbbbbbbb")
    assert fake.original == str(p0 / "aaaaaaaaaa.mp4") and fake.extra["original"] == "aaaaaaaaaa"
    reasons = {Path(s["path"]).name: s["reason"] for s in skipped}
    assert "'label'" in reasons["eeeeeeeeee.mp4"] and "metadata.json" in reasons["eeeeeeeeee.mp4"]
    assert "absent" in reasons["ffffffffff.mp4"] and "no label" in reasons["vvvvvvvvvv.mp4"]

    # a SLURM array of two tasks, then the merge; a task run again redoes nothing
    out = tmp_path / "shards"
    assert _prep("dfdc", root, out, "--part", "0/2") == 0
    done = sorted((out / ".prep" / "dfdc" / "items").rglob("meta.json"))
    stamps = [p.stat().st_mtime_ns for p in done]
    assert _prep("dfdc", root, out, "--part", "0/2") == 0
    assert [p.stat().st_mtime_ns for p in done] == stamps
    assert _prep("dfdc", root, out, "--part", "1/2") == 0
    assert main(["prep", "merge", "--out", str(out), "--dataset", "dfdc"]) == 0
    assert _videos(out, "dfdc", "train", "real") == {"aaaaaaaaaa": 0, "gggggggggg": 0}
    assert _videos(out, "dfdc", "train", "fake") == {"bbbbbbbbbb": 1, "cccccccccc": 1}
    assert _videos(out, "dfdc", "test", "fake") == {"tttttttttt": 1}
    assert _videos(out, "dfdc", "test", "real") == {"uuuuuuuuuu": 0}
    assert {_meta(s)["original"] for s in _samples(out, "dfdc", "train", "fake")} == {"aaaaaaaaaa"}
    m = _manifest(out, "dfdc", "train")
    r = _reasons(m)
    assert "cannot open" in r["dddddddddd.mp4"] or "corrupt" in r["dddddddddd.mp4"]
    assert "no face" in r["hhhhhhhhhh.mp4"]
    assert {v["video"]: v["frames"] for v in m["frames"]["short"]} == {"dddddddddd": 0, "hhhhhhhhhh": 0}
    assert m["frames"]["protocol"] == "2 evenly spaced frames per video"


# ---------------------------------------------------------------- DFDC-Preview
def test_dfdc_preview_dataset_json(media, tmp_path):
    root = tmp_path / "dfdc_preview"
    c = media["clips"]
    entries = {
        "method_A/1255229/1255229_A/1255229_A_001.mp4": ({"label": "fake", "set": "train"}, c[0]),
        "method_A/1255229/1255229_A/1255229_A_002.mp4": ({"label": "fake", "set": "test"}, c[1]),
        "method_B/1224068/1224068_C/1224068_C_001.mp4": ({"label": "fake", "set": "train"}, c[2]),
        "original_videos/1255229/1255229_A_001.mp4": ({"label": "real", "set": "train"}, c[3]),
        "original_videos/1224068/1224068_C_001.mp4": ({"label": "real", "set": "test"}, c[4]),
        "original_videos/1224068/1224068_C_002.mp4": ({"set": "test"}, c[5]),  # no label
        "method_B/1224068/1224068_C/1224068_C_009.mp4": ({"label": "real", "set": "test"}, c[6]),  # label vs folder
    }
    for rel, (_, src) in entries.items():
        _put(src, root / rel)
    (root / "dataset.json").write_text(json.dumps({k: v for k, (v, _) in entries.items()}))
    out = tmp_path / "shards"
    assert _prep("dfdcp", root, out) == 0
    assert sorted(p.name for p in (out / "dfdcp").iterdir()) == ["test", "train"]
    assert _videos(out, "dfdcp", "train", "method_A") == {"1255229_1255229_A_1255229_A_001": 1}
    assert _videos(out, "dfdcp", "test", "method_A") == {"1255229_1255229_A_1255229_A_002": 1}
    assert _videos(out, "dfdcp", "train", "method_B") == {"1224068_1224068_C_1224068_C_001": 1}
    assert _videos(out, "dfdcp", "train", "real") == {"1255229_1255229_A_001": 0}
    assert _videos(out, "dfdcp", "test", "real") == {"1224068_1224068_C_001": 0}
    r = _reasons(_manifest(out, "dfdcp", "test"))
    assert "'label'" in r["1224068_C_002.mp4"] and "dataset.json" in r["1224068_C_002.mp4"]
    assert "lies in method_B" in r["1224068_C_009.mp4"]


# ---------------------------------------------------------------- FaceShifter
FFPP_SAMPLE = SHARED_DATA / "ffpp-sample"
FFPP_SPLITS = SHARED_DATA / "ffpp-splits"


def _ffpp_reals(root: Path, compression: str = "c23") -> None:
    for v in ("004", "519", "634"):
        _put(FFPP_SAMPLE / "original_sequences" / "youtube" / "c23" / "videos" / f"{v}.mp4",
             root / "original_sequences" / "youtube" / compression / "videos" / f"{v}.mp4")


def test_faceshifter_ffpp_layout_and_splits(media, tmp_path):
    root = tmp_path / "FaceForensics++"
    _ffpp_reals(root)
    fs = root / "manipulated_sequences" / "FaceShifter" / "c23" / "videos"
    # real FF++ fakes standing in for FaceShifter's (same names, same targets): 519_515 train, 634_660 test
    _put(FFPP_SAMPLE / "manipulated_sequences" / "Deepfakes" / "c23" / "videos" / "519_515.mp4", fs / "519_515.mp4")
    _put(FFPP_SAMPLE / "manipulated_sequences" / "FaceSwap" / "c23" / "videos" / "634_660.mp4", fs / "634_660.mp4")
    _put(media["corrupt"], fs / "004_982.mp4")
    _put(FFPP_SAMPLE / "manipulated_sequences" / "Deepfakes" / "c23" / "videos" / "519_515.mp4",
         root / "manipulated_sequences" / "Deepfakes" / "c23" / "videos" / "519_515.mp4")  # not FaceShifter: ignored
    out = tmp_path / "shards"
    assert main(["prep", "faceshifter", "--root", str(root), "--splits", str(FFPP_SPLITS), "--out", str(out),
                 "--frames", "2", "--size", "64", "--no-progress"]) == 0
    ds = "faceshifter_c23"
    assert sorted(p.name for p in (out / ds / "train").iterdir() if p.is_dir()) == ["FaceShifter", "real"]
    assert _videos(out, ds, "train", "FaceShifter") == {"519_515": 1}
    assert _videos(out, ds, "test", "FaceShifter") == {"634_660": 1}
    assert _videos(out, ds, "train", "real") == {"519": 0}
    assert _videos(out, ds, "val", "real") == {"004": 0}
    assert _videos(out, ds, "test", "real") == {"634": 0}
    assert {_meta(s)["compression"] for s in _samples(out, ds, "test", "FaceShifter")} == {"c23"}
    r = _reasons(_manifest(out, ds, "val"))
    assert "cannot open" in r["004_982.mp4"] or "corrupt" in r["004_982.mp4"]
    assert r["982.mp4"] == "listed in val.json but absent"


# ---------------------------------------------------------------- DeepFakeDetection
def test_dfd_mask_picks_the_forged_face(media, tmp_path):
    root = tmp_path / "FaceForensics++"
    c = media["clips"]
    real = root / "original_sequences" / "actors" / "c23" / "videos"
    fake = root / "manipulated_sequences" / "DeepFakeDetection" / "c23" / "videos"
    masks = root / "manipulated_sequences" / "DeepFakeDetection" / "masks" / "videos"
    _put(c[0], real / "01__kitchen_pan.mp4")
    _put(media["two"], real / "02__meeting_serious.mp4")
    _put(media["two"], fake / "01_02__meeting_serious__YVGY8LOK.mp4")
    _put(media["two_mask"], masks / "01_02__meeting_serious__YVGY8LOK.mp4")
    _put(c[1], fake / "02_01__kitchen_pan__DP3FZSXI.mp4")  # no mask: the largest face, and it says so
    _put(c[2], fake / "kitchen_pan.mp4")  # not a DFD name
    out = tmp_path / "shards"
    assert _prep("dfd", root, out) == 0
    ds = "dfd_c23"
    assert _videos(out, ds, "test", "real") == {"01__kitchen_pan": 0, "02__meeting_serious": 0}
    assert _videos(out, ds, "test", "DeepFakeDetection") == {"01_02__meeting_serious__YVGY8LOK": 1,
                                                             "02_01__kitchen_pan__DP3FZSXI": 1}
    for s in _samples(out, ds, "test", "DeepFakeDetection"):
        m = _meta(s)
        if m["video"].endswith("YVGY8LOK"):
            x0, y0, x1, y1 = m["bbox"]
            assert (x0 + x1) / 2 > 200, f"the mask marks the right-hand face, got box {m['bbox']}"
            assert m["face_rule"] == "mask_overlap" and m["scene"] == "meeting_serious" and m["actors"] == "01_02"
            # its region map is the mask, cut with the forged face's own crop: mostly forged inside that crop
            assert m["region"] == "ffpp_mask"
            region = np.asarray(Image.open(io.BytesIO(s["region.png"])))
            assert region.shape == (64, 64) and (region > 128).mean() > 0.5
        else:
            assert m["face_rule"] == "largest_no_mask"
    for s in _samples(out, ds, "test", "real"):
        m = _meta(s)
        assert m["face_rule"] == "largest_no_mask"
        if m["video"].endswith("meeting_serious"):
            assert (m["bbox"][0] + m["bbox"][2]) / 2 < 200  # no mask on the real: the largest face
    man = _manifest(out, ds, "test")
    assert man["face_rules"] == {"largest_no_mask": 6, "mask_overlap": 2}
    assert "<actor>_<actor>__<scene>__<id>" in _reasons(man)["kitchen_pan.mp4"]


# ---------------------------------------------------------------- DeeperForensics-1.0
def test_deeperforensics_splits_distortions_and_real_class(media, tmp_path):
    root = tmp_path / "DeeperForensics-1.0"
    c = media["clips"]
    mv = root / "manipulated_videos"
    _put(c[0], mv / "end_to_end" / "519_M004.mp4")
    _put(c[1], mv / "end_to_end" / "634_W017.mp4")
    _put(c[2], mv / "end_to_end" / "004_M030.mp4")
    _put(c[3], mv / "end_to_end_random_level" / "519_M004.mp4")
    _put(c[4], mv / "end_to_end" / "777_W101.mp4")  # in no split list
    splits = root / "lists" / "splits"
    splits.mkdir(parents=True)
    (splits / "train.txt").write_text("519_M004.mp4\n")
    (splits / "val.txt").write_text("004_M030.mp4\n")
    (splits / "test.txt").write_text("634_W017.mp4\n")
    dl = root / "lists" / "manipulated_videos_distortions"
    dl.mkdir(parents=True)
    (dl / "end_to_end_random_level.txt").write_text("end_to_end_random_level/519_M004.mp4 GB:3 JPEG:2\n")
    ffpp_root = tmp_path / "FaceForensics++"
    _ffpp_reals(ffpp_root)
    for actor, src in (("M004", c[5]), ("W017", c[6])):
        _put(src, root / "source_videos" / actor / "light_uniform" / "happy" / "camera_front" / f"{actor}_1.mp4")
    out = tmp_path / "shards"
    assert _prep("deeperforensics", root, out, "--ffpp-root", str(ffpp_root)) == 0
    ds = "deeperforensics"
    assert _videos(out, ds, "train", "end_to_end") == {"519_M004": 1}
    assert _videos(out, ds, "test", "end_to_end") == {"634_W017": 1}
    assert _videos(out, ds, "val", "end_to_end") == {"004_M030": 1}
    assert _videos(out, ds, "train", "end_to_end_random_level") == {"519_M004": 1}
    assert {_meta(s)["distortion"] for s in _samples(out, ds, "train", "end_to_end_random_level")} == {"GB:3 JPEG:2"}
    assert all("distortion" not in _meta(s) for s in _samples(out, ds, "train", "end_to_end"))
    assert _videos(out, ds, "train", "real") == {"519": 0}
    assert _videos(out, ds, "test", "real") == {"634": 0}
    assert _videos(out, ds, "val", "real") == {"004": 0}
    assert "not named in" in _reasons(_manifest(out, ds, "train"))["777_W101.mp4"]
    # the documented alternative real class: the dataset's own source recordings of the split's source actors
    _, items, skipped = adapters.deeperforensics(root, real="source_videos")
    reals = {(it.split, it.video) for it in items if it.label == 0}
    assert reals == {("train", "M004_light_uniform_happy_camera_front_M004_1"),
                     ("test", "W017_light_uniform_happy_camera_front_W017_1")}
    assert any("actor M030" in s["reason"] for s in skipped)
    with pytest.raises(adapters.LayoutError, match="--ffpp-root"):
        adapters.deeperforensics(root)


# ---------------------------------------------------------------- Celeb-DF v1
def test_celebdf_v1_own_list_inverted_label(media, tmp_path):
    root = tmp_path / "Celeb-DF"
    c = media["clips"]
    _put(c[0], root / "Celeb-real" / "id0_0000.mp4")
    _put(c[1], root / "Celeb-real" / "id1_0001.mp4")
    _put(c[2], root / "YouTube-real" / "00000.mp4")
    _put(c[3], root / "Celeb-synthesis" / "id0_id1_0000.mp4")
    _put(c[4], root / "Celeb-synthesis" / "id1_id0_0001.mp4")
    _put(media["noface"], root / "Celeb-synthesis" / "id1_id0_0002.mp4")
    # v1's own list, label 1 = real as in v2; one line names a video that is absent
    (root / "List_of_testing_videos.txt").write_text(
        "1 Celeb-real/id0_0000.mp4\n0 Celeb-synthesis/id0_id1_0000.mp4\n0 Celeb-synthesis/id1_id0_0002.mp4\n"
        "1 YouTube-real/00170.mp4\n")
    out = tmp_path / "shards"
    assert _prep("celebdf1", root, out) == 0
    ds = "celebdf_v1"
    assert _videos(out, ds, "test", "real") == {"id0_0000": 0}
    assert _videos(out, ds, "test", "fake") == {"id0_id1_0000": 1}
    assert _videos(out, ds, "train", "real") == {"id1_0001": 0, "00000": 0}
    assert _videos(out, ds, "train", "fake") == {"id1_id0_0001": 1}
    r = _reasons(_manifest(out, ds, "test"))
    assert "absent" in r["00170.mp4"] and "no face" in r["id1_id0_0002.mp4"]
    with pytest.raises(adapters.LayoutError, match="Celeb-DF v1"):
        adapters.celebdf_v1(tmp_path / "nope")


# ---------------------------------------------------------------- UADFV
def test_uadfv_split_rules(media, tmp_path):
    root = tmp_path / "UADFV"
    c = media["clips"]
    for i in range(4):
        _put(c[i], root / "real" / f"{i:04d}.mp4")
        _put(c[4 + i], root / "fake" / f"{i:04d}_fake.mp4")
    (root / "fake" / "readme.txt").write_text("x")
    out = tmp_path / "shards"
    assert _prep("uadfv", root, out) == 0
    assert _videos(out, "uadfv", "test", "real") == {f"{i:04d}": 0 for i in range(4)}
    assert _videos(out, "uadfv", "test", "fake") == {f"{i:04d}_fake": 1 for i in range(4)}
    assert "not a video" in _reasons(_manifest(out, "uadfv", "test"))["readme.txt"]
    _, items, _ = adapters.uadfv(root, "hash")
    by_pair: dict[str, set[str]] = {}
    for it in items:
        by_pair.setdefault(it.extra["pair"], set()).add(it.split)
        assert it.split == adapters.uadfv_split(it.extra["pair"])
    assert all(len(s) == 1 for s in by_pair.values()) and len(by_pair) == 4
    # the rule is fixed, not a random draw: these ids fall where the sha1 byte puts them
    assert [adapters.uadfv_split(f"{i:04d}") for i in range(8)] == [
        ("train" if b < 179 else "val" if b < 218 else "test") for b in
        (hashlib.sha1(f"{i:04d}".encode()).digest()[0] for i in range(8))]


# ---------------------------------------------------------------- DF40
def _df40_frames(folder: Path, photo: Path, n: int = 3) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    im = Image.open(photo).convert("RGB")
    names = []
    for i in range(n):
        p = folder / f"{i:03d}.png"
        im.save(p)
        names.append(p)
    return names


def test_df40_frame_folders_and_json_lists(media, tmp_path):
    root = tmp_path / "DF40"
    ph = media["photos"]
    ff_fake = _df40_frames(root / "simswap" / "ff" / "frames" / "000_003", ph[0])
    cdf_fake = _df40_frames(root / "simswap" / "cdf" / "frames" / "id0_id1_0000", ph[1])
    real = _df40_frames(root / "simswap" / "ff" / "real" / "frames" / "000", ph[2])
    blank = root / "simswap" / "ff" / "frames" / "001_870"
    blank.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((120, 120, 3), 128, np.uint8)).save(blank / f"{i:03d}.png")
    remote = "/Youtu_Pangu_Security/public/deepfake/DF40"  # the list's frame paths are the authors' absolute ones

    def frames(paths):
        return [f"{remote}/{p.relative_to(root)}" for p in paths]

    lists = root / "lists"
    lists.mkdir()
    (lists / "simswap.json").write_text(json.dumps({"simswap": {
        "simswap_Fake": {"train": {"000_003": {"label": "simswap_Fake", "frames": frames(ff_fake)},
                                   "001_870": {"label": "simswap_Fake", "frames": frames(sorted(blank.iterdir()))}},
                         "test": {"id0_id1_0000": {"label": "simswap_Fake", "frames": frames(cdf_fake)}}},
        "FF-real": {"train": {"000": {"label": "FF-real", "frames": frames(real)},
                              "002": {"frames": frames(real)}},  # no label
                    "test": {"999": {"label": "FF-real", "frames": [f"{remote}/simswap/ff/real/frames/999/000.png"]}}},
    }}))
    out = tmp_path / "shards"
    assert _prep("df40", root, out) == 0
    assert _videos(out, "df40", "train", "simswap") == {"ff_000_003": 1}
    assert _videos(out, "df40", "test", "simswap") == {"cdf_id0_id1_0000": 1}
    assert _videos(out, "df40", "train", "real") == {"ff_000": 0}
    assert {_meta(s)["df40_label"] for s in _samples(out, "df40", "train", "simswap")} == {"simswap_Fake"}
    assert "no face" in _reasons(_manifest(out, "df40", "train"))["001_870"]
    assert any("video '002': field 'label' missing" in s["reason"] and s["path"].endswith("simswap.json")
               for s in _manifest(out, "df40", "train")["skipped"])
    assert any("none of its 1 frames" in s["reason"] for s in _manifest(out, "df40", "test")["skipped"])
    # DF40's frames as the crops themselves: no detection, the faceless frames kept too
    out2 = tmp_path / "shards_kept"
    assert _prep("df40", root, out2, "--keep-crops") == 0
    assert _videos(out2, "df40", "train", "simswap") == {"ff_000_003": 1, "ff_001_870": 1}


# ---------------------------------------------------------------- ForgeryNet
def test_forgerynet_image_and_video_lists(media, tmp_path):
    root = tmp_path / "ForgeryNet"
    ph, c = media["photos"], media["clips"]
    tr = root / "Training"
    _put(ph[0], tr / "image" / "train_release" / "1" / "a" / "frame00001.png")
    _put(ph[1], tr / "image" / "train_release" / "7" / "b" / "frame00001.png")
    _put(ph[2], tr / "image" / "train_release" / "0" / "c" / "frame00001.png")
    (tr / "image_list.txt").write_text(
        "train_release/1/a/frame00001.png 1 1 1\n"
        "train_release/7/b/frame00001.png 1 2 7\n"
        "train_release/0/c/frame00001.png 0 0 0\n"
        "train_release/0/d/frame00001.png 0 0 0\n"  # absent
        "train_release/9/e/frame00001.png fake\n")  # malformed
    va = root / "Validation"
    _put(c[0], va / "video" / "val_video_release" / "3" / "x" / "video.mp4")
    _put(c[1], va / "video" / "val_video_release" / "0" / "y" / "video.mp4")
    (va / "video_list.txt").write_text("val_video_release/3/x/video.mp4 1 1 3 0-2\n"
                                       "val_video_release/0/y/video.mp4 0 0 0\n")
    out = tmp_path / "shards"
    assert _prep("forgerynet", root, out) == 0
    ds = "forgerynet"
    assert _videos(out, ds, "train", "type01") == {"train_release_1_a_frame00001": 1}
    assert _videos(out, ds, "train", "type07") == {"train_release_7_b_frame00001": 1}
    assert _videos(out, ds, "train", "real") == {"train_release_0_c_frame00001": 0}
    assert _videos(out, ds, "val", "type03") == {"val_video_release_3_x_video": 1}
    assert _videos(out, ds, "val", "real") == {"val_video_release_0_y_video": 0}
    m = _meta(_samples(out, ds, "val", "type03")[0])
    assert m["class16"] == 3 and m["class3"] == 1 and m["segments"] == ["0-2"]
    assert {_meta(s)["class16"] for s in _samples(out, ds, "train", "type07")} == {7}
    r = _manifest(out, ds, "train")["skipped"]
    assert any("absent" in s["reason"] and "/d/" in s["path"] for s in r)
    assert any("malformed" in s["reason"] and s["path"].endswith("image_list.txt:5") for s in r)


# ---------------------------------------------------------------- frame protocol
def test_frames_without_face_are_counted_or_topped_up(media, tmp_path):
    root = tmp_path / "UADFV"
    _put(media["gap"], root / "real" / "0000.mp4")
    _put(media["clips"][1], root / "fake" / "0000_fake.mp4")
    out = tmp_path / "plain"
    assert _prep("uadfv", root, out, frames=3) == 0
    m = _manifest(out, "uadfv", "test")
    assert m["frames"]["protocol"] == "3 evenly spaced frames per video"
    assert m["frames"]["short"] == [{"video": "0000", "method": "real", "frames": 2, "sampled": 3, "no_face": 1,
                                     "topped_up": 0}]
    assert m["frames"]["videos_by_frames"] == {"2": 1, "3": 1}
    assert sorted(_meta(s)["frame"] for s in _samples(out, "uadfv", "test", "real")) == [0, 8]
    out2 = tmp_path / "topped"
    assert _prep("uadfv", root, out2, "--top-up", "2", frames=3) == 0
    m2 = _manifest(out2, "uadfv", "test")
    assert m2["frames"]["short"] == [] and m2["frames"]["videos_by_frames"] == {"3": 2}
    assert m2["settings"]["top_up"] == 2
    got = {_meta(s)["frame"]: _meta(s).get("topped_up_from") for s in _samples(out2, "uadfv", "test", "real")}
    assert got == {0: None, 3: 4, 8: None}  # the nearest neighbour with a face, the earlier one on a tie


def test_layout_errors_name_what_is_missing(tmp_path):
    with pytest.raises(adapters.LayoutError, match="test/labels.csv"):
        adapters.dfdc(tmp_path)
    (tmp_path / "dfdc_train_part_0").mkdir()
    (tmp_path / "dfdc_train_part_0" / "metadata.json").write_text("{not json")
    with pytest.raises(adapters.LayoutError, match="dfdc_train_part_0/metadata.json"):
        adapters.dfdc(tmp_path)
    with pytest.raises(adapters.LayoutError, match="dataset.json"):
        adapters.dfdc_preview(tmp_path)
    with pytest.raises(adapters.LayoutError, match="lists/splits/train.txt"):
        (tmp_path / "manipulated_videos").mkdir()
        adapters.deeperforensics(tmp_path, ffpp_root=tmp_path)
    with pytest.raises(adapters.LayoutError, match="DeepFakeDetection"):
        (tmp_path / "original_sequences" / "actors" / "c23" / "videos").mkdir(parents=True)
        adapters.dfd(tmp_path)
    with pytest.raises(adapters.LayoutError, match="Training"):
        adapters.forgerynet(tmp_path)
    with pytest.raises(adapters.LayoutError, match="JSON list"):
        adapters.df40(tmp_path / "manipulated_videos")
    assert main(["prep", "dfdcp", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2


def test_every_adapter_has_help(capsys):
    for name in adapters.ADAPTERS:
        with pytest.raises(SystemExit) as exc:
            main(["prep", name, "--help"])
        assert exc.value.code == 0
        assert "--root" in capsys.readouterr().out


def test_submit_prep_array_lists_the_benchmark_before_queueing(media, tmp_path, monkeypatch, capsys, caplog):
    """`ltm submit prep dfdcp ... --array 2 --dry-run`: the login node lists the dataset with its adapter (a root
    without dataset.json is refused, naming the file, before anything is queued)."""
    import logging

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "dfdc_preview"
    _put(media["clips"][0], root / "original_videos" / "1" / "1_A_001.mp4")
    argv = ["submit", "prep", "dfdcp", "--root", str(root), "--out", "shards", "--array", "2", "--dry-run"]
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    assert any("dataset.json does not exist" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "shards").exists()
    (root / "dataset.json").write_text(json.dumps({"original_videos/1/1_A_001.mp4": {"label": "real", "set": "test"}}))
    capsys.readouterr()
    assert main(argv) == 0
    assert "parts=2" in capsys.readouterr().out
