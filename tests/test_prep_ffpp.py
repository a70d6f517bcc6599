"""FF++ prep: the sample dataset and real FF++ c23 videos into shards; resume after kill -9; parts + merge."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shared_data import SHARED_DATA

from data_prep import datasets, pipeline
from data_prep.shards import read_shard

REPO = Path(__file__).resolve().parents[1]
FFPP_SAMPLE = SHARED_DATA / "ffpp-sample"
FFPP_SPLITS = SHARED_DATA / "ffpp-splits"


def _shard_hashes(root: Path) -> dict[str, str]:
    out = {}
    for m in sorted((root / "ffpp_c23").glob("*/manifest.json")):
        for s in json.loads(m.read_text())["shards"]:
            out[f"{m.parent.name}/{s['name']}"] = s["sha256"]
    return out


def _samples(root: Path, split: str, method: str) -> list[dict]:
    return [s for t in sorted((root / "ffpp_c23" / split / method).glob("*.tar")) for s in read_shard(t)]


def test_sample_shards_labels_methods_and_splits(sample_root, sample_shards):
    splits = {s: json.loads((sample_root / "splits" / f"{s}.json").read_text()) for s in ("train", "val", "test")}
    for split, pairs in splits.items():
        ids = {v for p in pairs for v in p}
        fakes = {f"{a}_{b}" for a, b in pairs} | {f"{b}_{a}" for a, b in pairs}
        assert sorted(p.name for p in (sample_shards / "ffpp_c23" / split).iterdir() if p.is_dir()) == [
            "FaceSwap", "SelfBlend", "real"]
        for method in ("real", "SelfBlend", "FaceSwap"):
            samples = _samples(sample_shards, split, method)
            assert samples, f"{split}/{method} is empty"
            keys = [s["__key__"] for s in samples]
            assert len(set(keys)) == len(keys)
            for s in samples:
                meta = json.loads(s["json"])
                label = 0 if method == "real" else 1
                assert s["cls"] == str(label).encode() and meta["label"] == label and meta["method"] == method
                assert meta["split"] == split and meta["dataset"] == "ffpp_c23" and meta["compression"] == "c23"
                assert s["__key__"] == f"{meta['video']}-{meta['frame']:06d}"
                # one id per video across methods (FF++ reuses `<target>_<source>`); its name gives the split
                prefix = f"ffpp_c23-{method}-"
                assert meta["video"].startswith(prefix)
                assert meta["video"][len(prefix):] in (ids if method == "real" else fakes)
                assert len(meta["bbox"]) == 4
            # shuffled across videos: consecutive samples are not grouped by video
            videos = [json.loads(s["json"])["video"] for s in samples]
            if len(set(videos)) > 2:
                runs = sum(1 for a, b in zip(videos, videos[1:]) if a != b)
                assert runs > len(set(videos))


def test_real_ffpp_videos(tmp_path):
    """The real FaceForensics++ c23 files with the official split files: per-method folders and faces in the crops."""
    if not FFPP_SAMPLE.is_dir() or not FFPP_SPLITS.is_dir():
        pytest.skip(f"real FF++ sample not present at {FFPP_SAMPLE}")
    name, items, skipped = datasets.ffpp(FFPP_SAMPLE, FFPP_SPLITS, "c23")
    assert name == "ffpp_c23"
    assert {(it.split, it.method, it.video) for it in items} == {
        ("train", "real", "519"), ("train", "Deepfakes", "519_515"), ("train", "Face2Face", "750_743"),
        ("val", "real", "004"), ("val", "NeuralTextures", "004_982"),
        ("test", "real", "634"), ("test", "FaceSwap", "634_660")}
    # every other video named by the official splits is reported absent, with its split file
    assert len(skipped) == (1000 - 3) + 4 * (1000 - 1)  # 1000 reals and 1000 fakes per method, minus present ones
    assert all("absent" in s["reason"] for s in skipped)
    out = tmp_path / "shards"
    settings = pipeline.Settings(frames=2, size=224)
    res = pipeline.run(name, items, skipped, out, settings, pipeline.Runtime(progress=False))
    assert res["samples"] == 14
    from data_prep.faces import build_detector

    det = build_detector("mtcnn", "cpu")
    crops = []
    for split, method in [("train", "Deepfakes"), ("train", "Face2Face"), ("val", "NeuralTextures"),
                          ("test", "FaceSwap"), ("test", "real")]:
        samples = _samples(out, split, method)
        assert len(samples) == 2
        crops += [np.asarray(Image.open(io.BytesIO(s["jpg"]))) for s in samples]
    assert all(c.shape == (224, 224, 3) for c in crops)
    found = det.detect(crops)
    # a 1.3x crop holds the face, centred and large
    for boxes in found:
        assert len(boxes) >= 1
        x0, y0, x1, y1, _ = max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
        assert x1 - x0 > 224 / 2.5 and abs((x0 + x1) / 2 - 112) < 40
    m = json.loads((out / "ffpp_c23" / "train" / "manifest.json").read_text())
    assert m["totals"]["by_method"] == {"Deepfakes": 2, "Face2Face": 2, "real": 2}
    assert any(s["path"].endswith("manipulated_sequences/Deepfakes/c23/videos/515_519.mp4") for s in m["skipped"])


def _fixture_settings(shards: Path) -> pipeline.Settings:
    """The settings the sample_shards fixture was made with (read back from its manifest)."""
    return pipeline.Settings(**json.loads((shards / "ffpp_c23" / "test" / "manifest.json").read_text())["settings"])


def _cli(out: Path, root: Path, settings: pipeline.Settings, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ltm.cli", "prep", "ffpp", "--root", str(root), "--splits", str(root / "splits"),
            "--out", str(out), "--frames", str(settings.frames), "--size", str(settings.size), "--no-progress", *extra]


def test_resume_after_kill_9_gives_the_same_shards(sample_root, sample_shards, tmp_path):
    out = tmp_path / "shards"
    st = _fixture_settings(sample_shards)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(_cli(out, sample_root, st, "--workers", "2"), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    work = out / ".prep" / "ffpp_c23" / "items"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(work.glob("*/*/*/meta.json"))) < 6 and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers, mid-way
    proc.wait()
    # a killed worker's temp folder (<video>.tmp<pid>/) may hold a meta.json too: the resumed run removes it
    done_before = {p.parent for p in work.glob("*/*/*/meta.json") if ".tmp" not in p.parent.name}
    assert done_before, "the run was killed before any video finished"
    assert not (out / "ffpp_c23" / "train" / "manifest.json").exists()
    mtimes = {p: (p / "meta.json").stat().st_mtime_ns for p in done_before}
    res = subprocess.run(_cli(out, sample_root, st, "--workers", "2", "--keep-work"), env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "already done, resuming" in res.stderr
    for p, t in mtimes.items():  # finished videos were not redone
        assert (p / "meta.json").stat().st_mtime_ns == t
    assert not list(work.glob("*/*/*.tmp*"))
    assert _shard_hashes(out) == _shard_hashes(sample_shards)  # byte-identical to the uninterrupted run
    # a third run finds everything complete and leaves it alone
    again = subprocess.run(_cli(out, sample_root, st), env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "nothing to do" in again.stderr
    assert _shard_hashes(out) == _shard_hashes(sample_shards)


def test_parts_and_merge_equal_a_single_run(sample_root, sample_shards, tmp_path):
    out = tmp_path / "shards"
    name, items, skipped = datasets.ffpp(sample_root, sample_root / "splits", "c23")
    settings = _fixture_settings(sample_shards)
    r0 = pipeline.run(name, items, skipped, out, settings, pipeline.Runtime(part=(0, 2), progress=False))
    assert r0["samples"] > 0 and not list(out.glob("ffpp_c23/*/manifest.json"))
    with pytest.raises(RuntimeError, match=r"unfinished part\(s\) 1/2"):
        pipeline.merge(out, name)
    pipeline.run(name, items, skipped, out, settings, pipeline.Runtime(part=(1, 2), progress=False))
    from ltm.cli import main

    assert main(["prep", "merge", "--out", str(out), "--dataset", name]) == 0
    assert _shard_hashes(out) == _shard_hashes(sample_shards)
    assert not (out / ".prep").exists()  # work folder removed after the merge
    m = json.loads((out / "ffpp_c23" / "test" / "manifest.json").read_text())
    assert m["parts"] == 2


def test_other_settings_do_not_mix_into_an_output(sample_root, sample_shards):
    name, items, skipped = datasets.ffpp(sample_root, sample_root / "splits", "c23")
    with pytest.raises(ValueError, match="other settings"):
        other = pipeline.Settings(frames=2, size=_fixture_settings(sample_shards).size)
        pipeline.run(name, items, skipped, sample_shards, other, pipeline.Runtime(progress=False))


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def test_a_killed_worker_is_replaced_and_the_run_completes(sample_root, sample_shards, tmp_path):
    out = tmp_path / "shards"
    st = _fixture_settings(sample_shards)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(_cli(out, sample_root, st, "--workers", "2"), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    work = out / ".prep" / "ffpp_c23" / "items"
    deadline = time.time() + 120
    while time.time() < deadline and not list(work.glob("*/*/*/meta.json")) and proc.poll() is None:
        time.sleep(0.2)
    # the pool's workers are the grandchildren that import torch; kill one of them
    workers = [k for c in _children(proc.pid) for k in [c, *_children(c)]
               if "spawn_main" in Path(f"/proc/{k}/cmdline").read_text(errors="ignore")]
    assert workers, "no worker processes found"
    os.kill(workers[-1], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "a prep worker died; restarting the pool" in err
    assert _shard_hashes(out) == _shard_hashes(sample_shards)


# ---------------------------------------------------------------- region maps of the fakes (region.png)
def _region_samples(root: Path) -> list[tuple[dict, dict, np.ndarray, np.ndarray | None]]:
    """(sample, json, crop, region or None) of every sample under a shard root."""
    out = []
    for t in sorted(root.glob("*/*/*/*.tar")):
        for s in read_shard(t):
            crop = np.asarray(Image.open(io.BytesIO(s["jpg"])))
            region = None
            if "region.png" in s:
                im = Image.open(io.BytesIO(s["region.png"]))
                assert im.mode == "L"  # 8-bit single channel
                region = np.asarray(im)
            out.append((s, json.loads(s["json"]), crop, region))
    return out


def _original_crop(original: Path, meta: dict, scale: float, size: int) -> np.ndarray:
    """The original video's frame at the sample's index, cut with the sample's crop box and resize."""
    from data_prep.faces import cut_and_resize, square_box
    from data_prep.video import frames_at, probe

    info = probe(original)
    box = square_box(meta["bbox"], scale, info.width, info.height)
    return cut_and_resize(frames_at(original, [meta["frame"]])[meta["frame"]], box, size)


def _inside_outside(diff: np.ndarray, region: np.ndarray) -> float:
    """Mean |fake - original| weighted by the region over the same weighted by its complement."""
    w = region.astype(np.float64) / 255
    return float((diff * w).sum() / w.sum() / ((diff * (1 - w)).sum() / (1 - w).sum()))


def _check_region_sits_on_the_difference(crop: np.ndarray, original: np.ndarray, region: np.ndarray) -> float:
    diff = np.abs(crop.astype(np.float64) - original.astype(np.float64)).mean(2)
    ratio = _inside_outside(diff, region)
    # per frame the ratio spreads (2.3-10 over machines: encodes, detector boxes); the median is checked below
    assert ratio > 1.5, f"the region barely differs more from the original than outside it ({ratio:.2f})"
    # the map as stored beats itself moved against the image: flipped either way, shifted by an eighth of the crop
    q = region.shape[0] // 8
    for name, moved in (("mirrored", region[:, ::-1]), ("upside down", region[::-1]),
                        ("shifted right", np.roll(region, q, 1)), ("shifted up", np.roll(region, -q, 0))):
        assert ratio > _inside_outside(diff, moved), f"the region {name} fits the difference better"
    return ratio


def test_sample_fakes_carry_the_pair_difference_region(sample_root, sample_shards):
    """`ltm prep sample` fakes keep their target's camera and noise: each has its original, so each gets a
    `pair_difference` region.png of the jpg's size that lies where the fake differs from the original."""
    st = _fixture_settings(sample_shards)
    assert st.regions == "auto"
    samples = _region_samples(sample_shards)
    fakes = [x for x in samples if x[1]["label"] == 1]
    assert fakes and all(r is not None and m["region"] == "pair_difference" for _, m, _, r in fakes)
    for s, m, crop, region in samples:
        if m["label"] == 0:
            assert region is None and "region" not in m and "region.png" not in s
        else:
            assert region.shape == crop.shape[:2] and region.dtype == np.uint8
    ratios = []
    for _, m, crop, region in fakes[::5]:
        target = m["video"].rsplit("-", 1)[1].split("_")[0]
        original = sample_root / "original_sequences" / "youtube" / "c23" / "videos" / f"{target}.mp4"
        ratios.append(_check_region_sits_on_the_difference(crop, _original_crop(original, m, st.scale, st.size),
                                                           region))
    assert np.median(ratios) > 3.0, f"the regions barely sit on the difference: inside/outside ratios {ratios}"
    test = json.loads((sample_shards / "ffpp_c23" / "test" / "manifest.json").read_text())
    assert test["totals"]["regions_by_method"] == {
        "FaceSwap": {"pair_difference": test["totals"]["by_method"]["FaceSwap"]},
        "SelfBlend": {"pair_difference": test["totals"]["by_method"]["SelfBlend"]}}


def test_regions_none_and_a_changed_regions_setting_is_refused(sample_root, sample_shards, tmp_path):
    name, items, skipped = datasets.ffpp(sample_root, sample_root / "splits", "c23", splits=["test"])
    other = pipeline.Settings(**{**json.loads((sample_shards / "ffpp_c23" / "test" / "manifest.json").read_text())[
        "settings"], "regions": "none"})
    with pytest.raises(ValueError, match="other settings .*regions: auto -> none"):
        pipeline.run(name, items, skipped, sample_shards, other, pipeline.Runtime(progress=False))
    out = tmp_path / "shards"
    pipeline.run(name, items, skipped, out, other, pipeline.Runtime(progress=False))
    samples = _region_samples(out)
    assert samples and all(r is None and "region" not in m for _, m, _, r in samples)
    assert json.loads((out / "ffpp_c23" / "test" / "manifest.json").read_text())["settings"]["regions"] == "none"


def _mask_frame(i: int, h: int, w: int) -> np.ndarray:
    """A written mask: an ellipse off to the right of the frame's centre, jumping with the frame index (a mask
    read at another frame, mirrored or shifted does not match it)."""
    import cv2

    m = np.zeros((h, w, 3), np.uint8)
    cx = w // 2 + (w // 10 if i % 2 else w // 20)
    cv2.ellipse(m, (cx, h // 2 - h // 12), (w // 14, h // 7), 20 + 40 * (i % 3), 0, 360, (255, 255, 255), -1)
    return m


def test_real_ffpp_regions_from_masks_and_originals(tmp_path):
    """FF++ c23 (real files, symlinked): Deepfakes 519_515 gets the pair difference to 519.mp4; the same video as
    NeuralTextures with a mask video written here gets that mask (preferred over the original); as FaceSwap
    515_519 (original 515 absent, no mask) it gets none; the real video never."""
    if not FFPP_SAMPLE.is_dir():
        pytest.skip(f"real FF++ sample not present at {FFPP_SAMPLE}")
    from data_prep.faces import cut_and_resize, square_box
    from data_prep.video import probe, write_video

    src = FFPP_SAMPLE / "manipulated_sequences" / "Deepfakes" / "c23" / "videos" / "519_515.mp4"
    original = FFPP_SAMPLE / "original_sequences" / "youtube" / "c23" / "videos" / "519.mp4"
    root = tmp_path / "ffpp"
    for rel, target in (("original_sequences/youtube/c23/videos/519.mp4", original),
                        ("manipulated_sequences/Deepfakes/c23/videos/519_515.mp4", src),
                        ("manipulated_sequences/NeuralTextures/c23/videos/519_515.mp4", src),
                        ("manipulated_sequences/FaceSwap/c23/videos/515_519.mp4", src)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(target)
    info = probe(src)
    write_video(root / "manipulated_sequences" / "NeuralTextures" / "masks" / "videos" / "519_515.mp4",
                (_mask_frame(i, info.height, info.width) for i in range(info.frames)), preset="ultrafast")
    splits = tmp_path / "splits"
    splits.mkdir()
    for split, pairs in (("train", [["519", "515"]]), ("val", []), ("test", [])):
        (splits / f"{split}.json").write_text(json.dumps(pairs))
    name, items, skipped = datasets.ffpp(root, splits, "c23")
    settings = pipeline.Settings(frames=2, size=160)
    pipeline.run(name, items, skipped, tmp_path / "shards", settings, pipeline.Runtime(progress=False))
    samples = _region_samples(tmp_path / "shards")
    by = {}
    for _, m, crop, region in samples:
        by.setdefault(m["method"], []).append((m, crop, region))
    assert sorted(by) == ["Deepfakes", "FaceSwap", "NeuralTextures", "real"]
    assert all(r is None for _, _, r in by["real"] + by["FaceSwap"])
    assert all(m["region"] == "pair_difference" for m, _, _ in by["Deepfakes"])
    assert all(m["region"] == "ffpp_mask" for m, _, _ in by["NeuralTextures"])
    for m, crop, region in by["Deepfakes"]:
        assert region.shape == crop.shape[:2]
        _check_region_sits_on_the_difference(crop, _original_crop(original, m, settings.scale, settings.size),
                                             region)
    for m, crop, region in by["NeuralTextures"]:
        assert region.shape == crop.shape[:2]
        box = square_box(m["bbox"], settings.scale, info.width, info.height)
        written = cut_and_resize(_mask_frame(m["frame"], info.height, info.width)[..., 0], box, settings.size)
        err = np.abs(region.astype(int) - written).mean()
        inter, union = ((region > 127) & (written > 127)).sum(), ((region > 127) | (written > 127)).sum()
        assert written.max() == 255 and err < 4 and inter / union > 0.9, (m["frame"], err, inter / union)
        other = cut_and_resize(_mask_frame(m["frame"] + 1, info.height, info.width)[..., 0], box, settings.size)
        for moved in (written[:, ::-1], other):  # the checks tell a mirrored or a neighbouring frame's mask apart
            assert np.abs(region.astype(int) - moved).mean() > 4 or (
                ((region > 127) & (moved > 127)).sum() / ((region > 127) | (moved > 127)).sum() < 0.9)
    train = json.loads((tmp_path / "shards" / "ffpp_c23" / "train" / "manifest.json").read_text())
    assert train["totals"]["regions_by_method"] == {"Deepfakes": {"pair_difference": 2},
                                                    "NeuralTextures": {"ffpp_mask": 2}}


def test_frames_at_a_later_keyframe_first_matches_a_full_decode():
    """FF++'s encodes carry their parameter sets with the first keyframe only: a first seek straight to a later
    keyframe must still give that frame, not grey garbage."""
    path = FFPP_SAMPLE / "original_sequences" / "youtube" / "c23" / "videos" / "519.mp4"
    if not path.is_file():
        pytest.skip(f"real FF++ sample not present at {FFPP_SAMPLE}")
    import av

    from data_prep.video import frames_at

    full = {}
    with av.open(str(path)) as container:  # a plain decode from the start, no seeking
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            i = round(float(frame.pts * stream.time_base * stream.average_rate))
            full[i] = frame.to_ndarray(format="rgb24") if i in (250, 300) else None
            if i >= 300:
                break
    for i in (250, 300):
        got = frames_at(path, [i])
        assert list(got) == [i] and np.abs(got[i].astype(int) - full[i]).mean() < 0.5
