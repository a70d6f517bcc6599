"""Prep is a function of its inputs, seed and settings: the sample's videos (bytes and decoded frames) and the
shards' contents, order and manifest repeat run after run, whatever `--workers`, a CPU hog beside the run, or a
kill -9 and resume in between (docs/determinism.md).

The kill points are exact, not timed: the killed run is a subprocess that SIGKILLs itself after its N-th video, or
in the middle of writing a shard (a temp tar half-written), so the test does not depend on the machine's speed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_prep import datasets, pipeline
from data_prep.sample import build_sample
from data_prep.shards import content_digest
from data_prep.video import sample_frames

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


# ---------------------------------------------------------------- digests
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sample_files(root: Path) -> dict[str, str]:
    """sha256 of every file of a sample dataset: videos, splits and SOURCES.json (which holds no timestamp)."""
    return {p.relative_to(root).as_posix(): _sha(p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def _decoded(root: Path, video: str) -> list[np.ndarray]:
    return [f for _, f in sample_frames(root / video, None)]


def _frames_apart(a: Path, b: Path, videos: list[str]) -> dict[str, int]:
    """Videos whose decoded frames differ, with the largest difference in grey levels."""
    out = {}
    for v in videos:
        fa, fb = _decoded(a, v), _decoded(b, v)
        if len(fa) != len(fb) or any(not np.array_equal(x, y) for x, y in zip(fa, fb)):
            out[v] = max((int(np.abs(x.astype(int) - y.astype(int)).max()) for x, y in zip(fa, fb)), default=-1)
    return out


def _shard_tree(root: Path, dataset: str = "ffpp_c23") -> dict[str, str]:
    """sha256 of every file of a dataset's shard tree (tars, indexes, stray temp files); manifests without the
    time they were written."""
    out = {}
    for p in sorted((root / dataset).rglob("*")):
        if not p.is_file():
            continue
        data = p.read_bytes()
        if p.name == "manifest.json":
            manifest = json.loads(data)
            manifest.pop("created")
            data = json.dumps(manifest, sort_keys=True).encode()
        out[p.relative_to(root).as_posix()] = _sha(data)
    return out


def _digests(root: Path, dataset: str = "ffpp_c23") -> dict[str, str]:
    manifests = {m.parent.name: json.loads(m.read_text()) for m in sorted((root / dataset).glob("*/manifest.json"))}
    for split, m in manifests.items():  # the recorded digest is the digest of the split's shard records
        assert m["digest"] == content_digest(m["shards"]), split
    return {split: m["digest"] for split, m in manifests.items()}


def _settings_of(sample_root: Path) -> dict:
    s = json.loads((sample_root / "SOURCES.json").read_text())
    return {"n_identities": s["identities_count"], "length": s["length"], "frame_size": s["frame_size"],
            "seed": s["seed"], "crf": s["crf"]}


def _prep_settings(shards: Path) -> pipeline.Settings:
    """The settings the sample_shards fixture was made with (read back from its manifest)."""
    return pipeline.Settings(**json.loads((shards / "ffpp_c23" / "test" / "manifest.json").read_text())["settings"])


# ---------------------------------------------------------------- the sample dataset
def test_sample_built_twice_gives_the_same_videos_and_frames(sample_root, tmp_path):
    """A second build of the session's sample (here with OpenCV on one thread: its loops split by core count)
    gives the same bytes, hence the same decoded frames, and the digest SOURCES.json records."""
    again = tmp_path / "sample"
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        result = build_sample(again, **_settings_of(sample_root))
    finally:
        cv2.setNumThreads(threads)
    first, second = _sample_files(sample_root), _sample_files(again)
    assert sorted(first) == sorted(second)
    videos = [v for v in first if v.endswith(".mp4")]
    assert len(videos) == result["videos"] > 13
    differ = [v for v in first if first[v] != second[v]]
    assert not differ, (f"{len(differ)} of {len(first)} files differ; decoded frames apart by (grey levels): "
                        f"{_frames_apart(sample_root, again, [v for v in differ if v.endswith('.mp4')])}")
    recorded = json.loads((sample_root / "SOURCES.json").read_text())["digest"]
    assert result["digest"] == recorded
    # the frames themselves, as prep decodes them: equal arrays, not merely equal files
    assert not _frames_apart(sample_root, again, videos)


_KILL_SAMPLE_AFTER = """
import os, signal, sys
import data_prep.sample as sample

real, done, after = sample.write_video, [], int(sys.argv[2])

def write_then_die(*args, **kwargs):
    out = real(*args, **kwargs)
    done.append(out)
    if len(done) == after:
        os.kill(os.getpid(), signal.SIGKILL)
    return out

sample.write_video = write_then_die
sample.build_sample(sys.argv[1], **{k: int(v) for k, v in (a.split("=") for a in sys.argv[3:])})
"""


def test_sample_killed_halfway_and_resumed_equals_one_built_straight(sample_root, tmp_path):
    out = tmp_path / "sample"
    settings = _settings_of(sample_root)
    argv = [f"{k}={v}" for k, v in settings.items()]
    killed = subprocess.run([sys.executable, "-c", _KILL_SAMPLE_AFTER, str(out), "13", *argv], env=ENV, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert len(list(out.rglob("*.mp4"))) == 13
    assert "digest" not in json.loads((out / "SOURCES.json").read_text())  # the run did not finish
    result = build_sample(out, **settings)
    assert result["videos_written"] == result["videos"] - 13  # finished videos were kept, not redone
    assert _sample_files(out) == _sample_files(sample_root)


def test_sample_refuses_a_folder_built_with_other_settings(sample_root, tmp_path):
    (tmp_path / "SOURCES.json").write_bytes((sample_root / "SOURCES.json").read_bytes())
    settings = _settings_of(sample_root)
    n = settings["length"]
    with pytest.raises(ValueError, match=rf"built with other settings \(length: {n} -> {n + 1}\)"):
        build_sample(tmp_path, **{**settings, "length": n + 1})
    assert list(tmp_path.iterdir()) == [tmp_path / "SOURCES.json"]  # nothing written


# ---------------------------------------------------------------- shards
@pytest.fixture(scope="module")
def second_prep(sample_root, sample_shards, tmp_path_factory) -> Path:
    """The sample prepared again, with two workers (whose videos finish in another order) and a process spinning on
    a core beside them; sample_shards is the one-worker run of the same videos and settings."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        name, items, skipped = datasets.ffpp(sample_root, sample_root / "splits", "c23")
        out = tmp_path_factory.mktemp("second_prep")
        pipeline.run(name, items, skipped, out, _prep_settings(sample_shards),
                     pipeline.Runtime(workers=2, progress=False))
    finally:
        hog.kill()
        hog.wait()
    return out


def test_prep_with_two_workers_beside_a_cpu_hog_equals_one_worker(sample_shards, second_prep):
    """Two workers beside a CPU hog write the same shard files, manifests and digests as one worker."""
    assert _digests(second_prep) == _digests(sample_shards)
    assert _shard_tree(second_prep) == _shard_tree(sample_shards)


def _train_on(shards: Path, run_dir: Path) -> dict:
    """The demo's model and loader (tiny-cpu: ImageNet EfficientNet-Lite0, DALI on the CPU) for 3 steps at 64 px, in
    this process (both runs alike, so at the same thread count)."""
    from ltm.config import load_config
    from ltm.train.trainer import train

    overrides = [f"data.root={shards}", f"train.run_dir={run_dir}", "train.iters_per_epoch=3", "train.epochs=1",
                 "train.batch_size=8", "data.image_size=64", "data.val=[]", "train.ckpt_every=3", "train.log_every=1"]
    return train(load_config("tiny-cpu", overrides))


def test_two_preps_of_the_same_videos_train_to_the_same_losses_and_name_their_data(sample_shards, second_prep,
                                                                                      tmp_path):
    """A training on each prep logs the same losses step by step; each run's data.json names the splits it read by
    their content digests, the same for both, and the eval report names the digest of the split it scored."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for shards, run in zip((sample_shards, second_prep), runs):
        assert _train_on(shards, run)["status"] == "completed"
    losses = [[(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if r["type"] == "train"] for run in runs]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    recorded = [json.loads((run / "data.json").read_text())["digests"] for run in runs]
    for shards, digests in zip((sample_shards, second_prep), recorded):
        assert digests["train"] == {str(shards / "ffpp_c23" / "train"): _digests(shards)["train"]}
        assert digests["test"] == {str(shards / "ffpp_c23" / "test"): _digests(shards)["test"]}
    names = [{role: list(d.values()) for role, d in r.items()} for r in recorded]
    assert names[0] == names[1]  # the same data under two folders

    from ltm.eval.evaluate import evaluate

    report = evaluate(runs[0], [str(sample_shards / "ffpp_c23" / "test")])[0]
    assert report["data_digest"] == _digests(sample_shards)["test"]


_KILL_PREP_AT = """
import os, signal, sys
from data_prep import datasets, pipeline

root, out, frames, size, point, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], \
    int(sys.argv[6])
count = []

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "items":  # after the n-th video's crops are complete
    real_item = pipeline.process_item

    def item_then_die(*args, **kwargs):
        meta = real_item(*args, **kwargs)
        count.append(1)
        if len(count) == n:
            die()
        return meta

    pipeline.process_item = item_then_die
else:  # inside the n-th shard, after its first sample went into the temp tar
    real_shard = pipeline.write_shard

    def shard_dies_midway(samples, path):
        count.append(1)
        if len(count) < n:
            return real_shard(samples, path)

        def first_then_die():
            for i, s in enumerate(samples):
                if i == 1:
                    die()
                yield s

        return real_shard(first_then_die(), path)

    pipeline.write_shard = shard_dies_midway
name, items, skipped = datasets.ffpp(root, os.path.join(root, "splits"), "c23")
pipeline.run(name, items, skipped, out, pipeline.Settings(frames=frames, size=size), pipeline.Runtime(progress=False))
"""


def test_prep_killed_in_each_phase_and_resumed_equals_one_run_straight(sample_root, sample_shards, tmp_path):
    """Killed after 10 of 36 videos, then again halfway through writing the 5th of 9 shards (the first split's
    shards and manifest done, a half-written temp tar left behind), then resumed: the same files as the straight
    run, and no stray file."""
    out = tmp_path / "shards"
    st = _prep_settings(sample_shards)
    for point, n in (("items", 10), ("shards", 5)):
        killed = subprocess.run([sys.executable, "-c", _KILL_PREP_AT, str(sample_root), str(out), str(st.frames),
                                 str(st.size), point, str(n)], env=ENV, cwd=REPO, capture_output=True, text=True,
                                timeout=300)
        assert killed.returncode == -9, killed.stderr[-2000:]
    assert list(out.glob("ffpp_c23/*/*/*.tar.tmp*")), "the second run was not killed inside a shard"
    assert len(list(out.glob("ffpp_c23/*/manifest.json"))) == 1
    name, items, skipped = datasets.ffpp(sample_root, sample_root / "splits", "c23")
    pipeline.run(name, items, skipped, out, st, pipeline.Runtime(progress=False))
    assert _digests(out) == _digests(sample_shards)
    assert _shard_tree(out) == _shard_tree(sample_shards)
    assert not (out / ".prep").exists()
