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
    done_before = {p.parent for p in work.glob("*/*/*/meta.json")}
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
