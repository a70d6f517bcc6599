"""Perturbations in the eval loaders: the DALI pipeline's per-crop perturbations against the reference loader's,
video compression (H.264 clips) against a direct PyAV encode/decode, and `eval.frames_per_video` frame selection,
on shards of real face photos with several frames per video."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from h264 import h264_roundtrip
from PIL import Image
from shared_data import SHARED_DATA

from data_prep.shards import jpeg_bytes, write_shards
from ltm.config import ConfigError, load_config
from ltm.data import ShardError, build_eval_loader
from ltm.data.perturb import PER_CROP
from ltm.data.plan import frame_indices

SIZE = 64
FRAMES = 7  # per video; frame numbers 0, 5, ..., 30
VIDEOS = 3  # per method
# Per type: the largest absolute difference (0-255) of a pixel and the mean absolute difference per image between
# the DALI CPU pipeline's and the reference loader's images (crops stored at the loader's size). Measured at levels
# 1-5: saturation and noise 1 / < 0.001 (float rounding at .5), blur 2 / 0.104 (OpenCV's 8-bit fixed-point kernel),
# pixelate 2 / 0.246 (OpenCV's fixed-point bilinear weights), the others 0 / 0.
TOLERANCE = {"saturation": (1, 0.01), "contrast": (0, 0.0), "block": (0, 0.0), "noise": (1, 0.01),
             "blur": (2, 0.15), "pixelate": (2, 0.3), "jpeg": (0, 0.0), "video": (0, 0.0)}


def _faces(size: int) -> list[np.ndarray]:
    out = []
    for path in sorted((SHARED_DATA / "faces").glob("*.jpg"))[:8]:
        with Image.open(path) as im:
            im = im.convert("RGB")
            s = min(im.size)
            out.append(np.array(im.crop((0, 0, s, s)).resize((size, size), Image.BILINEAR)))
    assert len(out) == 8, f"need real face photos in {SHARED_DATA / 'faces'}"
    return out


def _write(root: Path, size: int, split: str = "test") -> None:
    """`<root>/t/<split>/{real,fake}`: VIDEOS videos of FRAMES frames each (a face drifting sideways), samples
    shuffled across videos and spread over several shards, as prep writes them."""
    faces = _faces(size)
    for label, method in enumerate(("real", "fake")):
        items = []
        for v in range(VIDEOS):
            face = faces[(2 * v + label) % len(faces)]
            for f in range(FRAMES):
                video = f"{method}_{v}"
                items.append({"__key__": f"{video}-{5 * f:06d}", "jpg": jpeg_bytes(np.roll(face, 2 * f, axis=1)),
                              "cls": label, "json": {"dataset": "t", "split": split, "video": video, "frame": 5 * f,
                                                     "label": label, "method": method}})
        np.random.default_rng(label).shuffle(items)
        folder = root / "t" / split / method
        folder.mkdir(parents=True)
        write_shards(items, folder, f"t-{split}-{method}", max_samples=8)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("perturb-shards")
    _write(root, SIZE)  # stored at the loader's size: no resize
    _write(root, 96, "big")  # stored larger: perturbed at 96 px, then resized to 64
    return root


def _cfg(root: Path, loader: str, *extra: str):
    # the reference loader in-process (no worker start per pass) unless a test asks for workers
    threads = 1 if loader == "dali" else 0
    return load_config(None, [f"data.root={root}", f"data.loader={loader}", f"data.image_size={SIZE}",
                              f"data.num_threads={threads}", *extra])


def _images(root: Path, loader: str, *extra: str, folder: str = "t/test", rank: int = 0, world: int = 1,
            batch: int = 5) -> dict[str, torch.Tensor]:
    """key -> uint8 CHW image (the loader's float image x 255, rounded) of one rank's share."""
    loader_ = build_eval_loader(_cfg(root, loader, *extra), [folder], rank, world, "cpu", batch)
    assert loader_.kind == loader  # two loaders compared, not one loader twice
    out: dict[str, torch.Tensor] = {}
    for b in loader_:
        for key, image in zip(b["keys"], b["images"]):
            assert key not in out
            out[key] = (image * 255).round().to(torch.uint8)
    assert len(out) == loader_.num_samples
    return out


def _diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[int, float]:
    assert set(a) == set(b)
    d = [(a[k].int() - b[k].int()).abs() for k in a]
    return max(int(x.max()) for x in d), float(np.mean([x.float().mean() for x in d]))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _video_frames(root: Path, split: str, method: str, video: str) -> list[np.ndarray]:
    """The stored crops of one video in frame order, read straight from the tars."""
    import webdataset as wds

    frames = {}
    for tar in sorted((root / "t" / split / method).glob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            name, frame = s["__key__"].rsplit("-", 1)
            if name == video:
                with Image.open(io.BytesIO(s["jpg"])) as im:
                    frames[int(frame)] = np.array(im.convert("RGB"))
    return [frames[k] for k in sorted(frames)]


# ------------------------------------------------------------------------------------------ DALI vs reference


@pytest.mark.parametrize("kind", [*PER_CROP, "video"])
def test_dali_and_reference_give_the_same_perturbed_images(root, kind):
    """Levels 1 and 5 of every type through both loaders: the same keys, images within the type's bound, the DALI
    images bitwise equal on a rerun, and clearly not the clean images."""
    for level in (1, 5):
        spec = f"eval.perturb={kind}:{level}"
        dali, ref = _images(root, "dali", spec), _images(root, "reference", spec)
        largest, mean = _diff(dali, ref)
        bound, mean_bound = TOLERANCE[kind]
        assert largest <= bound and mean <= mean_bound, (kind, level, largest, mean)
    again = _images(root, "dali", spec)
    assert all(torch.equal(again[k], dali[k]) for k in dali)  # deterministic per sample
    clean = _images(root, "dali")
    assert _diff(dali, clean)[1] > 2.0, kind  # the perturbation was applied


def test_dali_perturbs_the_stored_crop_before_the_resize(root):
    """Crops stored at 96 px, loader at 64: both loaders blur (and pixelate) at 96 px, then resize. The loaders'
    resizes differ a little (DALI's antialiased linear against PIL's bilinear), as for clean crops."""
    for spec in ("blur:5", "pixelate:5"):
        dali = _images(root, "dali", f"eval.perturb={spec}", folder="t/big")
        ref = _images(root, "reference", f"eval.perturb={spec}", folder="t/big")
        assert _diff(dali, ref)[1] < 1.0, spec
    # the same measure separates the two orders: blurring the already resized crop is far off
    from data_prep import jpeg as jpeg_mod
    from ltm.data.perturb import perturbation

    p = perturbation("blur:5")
    key = "real_0-000000"
    stored = _video_frames(root, "big", "real", "real_0")[0]
    right = jpeg_mod.resize(p(stored, key), SIZE).astype(int)
    wrong = p(jpeg_mod.resize(stored, SIZE), key).astype(int)
    assert np.abs(right - wrong).mean() > 2.0


def test_dali_and_reference_scores_rank_samples_alike(root):
    """AUC of a fixed scorer (a seeded random projection of the image) on both loaders' perturbed images: the same
    up to a swapped near-tie (one of the 441 real/fake pairs is 0.0023), and the scores themselves correlated."""
    from sklearn.metrics import roc_auc_score

    w = torch.from_numpy(np.random.default_rng(0).standard_normal(3 * SIZE * SIZE)).float()
    for spec in ("noise:3", "blur:3", "pixelate:3"):
        scores = {}
        for loader in ("dali", "reference"):
            images = _images(root, loader, f"eval.perturb={spec}")
            keys = sorted(images)
            scores[loader] = [float(images[k].float().flatten() @ w) for k in keys]
        labels = [int("-fake-" in k) for k in keys]
        assert roc_auc_score(labels, scores["dali"]) == pytest.approx(roc_auc_score(labels, scores["reference"]),
                                                                      abs=0.005), spec
        assert np.corrcoef(scores["dali"], scores["reference"])[0, 1] > 0.9999


# ------------------------------------------------------------------------------------------ video compression


def test_video_frames_equal_a_direct_pyav_encode_and_fall_with_the_crf(root):
    """Each video's stored crops, in frame order, through H.264 at CRF 30 (level 1) and 40 (level 5): the loaders'
    frames equal a PyAV encode/decode of exactly those crops (libx264 without SIMD), and CRF 40 is further from
    the clean frames than CRF 30."""
    psnr: dict[int, list[float]] = {1: [], 5: []}
    for level, crf in ((1, 30), (5, 40)):
        for loader in ("dali", "reference"):
            images = _images(root, loader, f"eval.perturb=video:{level}")
            for method in ("real", "fake"):
                for v in range(VIDEOS):
                    clean = _video_frames(root, "test", method, f"{method}_{v}")
                    direct = h264_roundtrip(clean, crf)
                    assert len(direct) == FRAMES
                    for f, (c, d) in enumerate(zip(clean, direct)):
                        got = images[f"t-{method}-{method}_{v}-{5 * f:06d}"].permute(1, 2, 0).numpy()
                        assert np.array_equal(got, d), (loader, method, v, f)
                        psnr[level].append(_psnr(c, got))
    assert np.mean(psnr[5]) < np.mean(psnr[1]) - 1.0, psnr


def test_video_compression_is_the_same_on_any_rank_split(root):
    """Videos cut by rank boundaries: every rank compresses the whole clip, so 1, 2 or 3 ranks (and both loaders,
    the reference one also with 2 workers splitting each share) give the same frames; the shares are disjoint and
    cover the set."""
    whole = _images(root, "dali", "eval.perturb=video:3")
    for world, loader, extra in ((2, "dali", ()), (3, "dali", ()), (2, "reference", ("data.num_threads=2",)),
                                 (3, "reference", ())):
        parts = [_images(root, loader, "eval.perturb=video:3", *extra, rank=r, world=world, batch=4)
                 for r in range(world)]
        assert sum(len(p) for p in parts) == len(whole) == 2 * VIDEOS * FRAMES
        merged = {k: v for p in parts for k, v in p.items()}
        assert set(merged) == set(whole)
        assert all(torch.equal(merged[k], whole[k]) for k in whole), (loader, world)


def test_video_errors_name_the_video_and_keys(tmp_path):
    faces = _faces(48)
    items = [{"__key__": f"v0-{i:06d}", "jpg": jpeg_bytes(faces[0] if i else _faces(40)[0]), "cls": 0,
              "json": {"video": "v0", "frame": i, "method": "real", "dataset": "t"}} for i in range(3)]
    (tmp_path / "t" / "test" / "real").mkdir(parents=True)
    write_shards(items, tmp_path / "t" / "test" / "real", "t-test-real")
    with pytest.raises(ShardError, match=r"video '.*/v0'.*differ in size.*key 'v0-000000'.*key 'v0-000001'"):
        _images(tmp_path, "reference", "eval.perturb=video:1")
    with pytest.raises(ShardError, match=r"video '.*/v0'.*differ in size"):
        _images(tmp_path, "dali", "eval.perturb=video:1")


def test_a_crop_too_small_for_blocks_is_named(tmp_path):
    (tmp_path / "t" / "test" / "real").mkdir(parents=True)
    write_shards([{"__key__": "tiny-000000", "jpg": jpeg_bytes(np.full((8, 8, 3), 90, np.uint8)), "cls": 0,
                   "json": {"video": "tiny", "frame": 0, "method": "real"}}], tmp_path / "t" / "test" / "real",
                 "t-test-real")
    for loader in ("dali", "reference"):
        with pytest.raises(ShardError, match=r"key 'tiny-000000': block: a 8x8 crop has no room"):
            _images(tmp_path, loader, "eval.perturb=block:5")


def test_corrupt_jpeg_is_named_or_skipped_under_a_perturbation(tmp_path):
    """A broken JPEG among good ones: named (shard and key), or with on_bad_sample=skip dropped and counted while
    the rest is perturbed as without it (noise: in the DALI pipeline; video: the clip made of the other frames)."""
    face = _faces(SIZE)[0]  # stored at the loader's size: the loaders' resizes play no part
    items = [{"__key__": f"v-{i:06d}", "jpg": b"not a jpeg" if i == 2 else jpeg_bytes(np.roll(face, i, axis=1)),
              "cls": 0, "json": {"video": "v", "frame": i, "method": "real"}} for i in range(6)]
    (tmp_path / "t" / "test" / "real").mkdir(parents=True)
    write_shards(items, tmp_path / "t" / "test" / "real", "t-test-real")
    for spec in ("noise:3", "video:3"):
        got = {}
        for loader in ("dali", "reference"):
            with pytest.raises(ShardError, match=r"t-test-real-000000.tar key 'v-000002': corrupt JPEG"):
                _images(tmp_path, loader, f"eval.perturb={spec}")
            cfg = _cfg(tmp_path, loader, f"eval.perturb={spec}", "data.on_bad_sample=skip")
            ld = build_eval_loader(cfg, ["t/test"], 0, 1, "cpu", 4)
            got[loader] = {k: im for b in ld for k, im in zip(b["keys"], (b["images"] * 255).round().byte())}
            assert len(got[loader]) == 5 and ld.skipped == 1 and "t-real-v-000002" not in got[loader], loader
        assert _diff(got["dali"], got["reference"])[0] <= TOLERANCE[spec.split(":")[0]][0], spec


# ------------------------------------------------------------------------------------------ frames per video


def test_frame_indices_are_linspace_truncated():
    assert frame_indices(7, 3) == [0, 3, 6]
    assert frame_indices(10, 4) == [0, 3, 6, 9]
    assert frame_indices(300, 32)[:4] == [0, 9, 19, 28] and frame_indices(300, 32)[-1] == 299
    assert frame_indices(5, 1) == [0]
    assert frame_indices(5, 0) == frame_indices(5, 5) == frame_indices(5, 9) == [0, 1, 2, 3, 4]
    for count, n in ((300, 32), (33, 32), (100, 7)):
        got = frame_indices(count, n)
        assert got == sorted(set(got)) and len(got) == n  # distinct, in frame order


@pytest.mark.parametrize("n", [1, 3, 5])
def test_frames_per_video_selects_the_same_keys_in_both_loaders(root, n):
    """Per video, frames (numbers 0, 5, ..., 30) at positions linspace(0, 6, n) truncated, written out by hand
    (n = 5: 0, 1.5, 3, 4.5, 6 -> positions 0, 1, 3, 4, 6)."""
    chosen = {1: [0], 3: [0, 15, 30], 5: [0, 5, 15, 20, 30]}[n]
    expected = {f"t-{m}-{m}_{v}-{f:06d}" for m in ("real", "fake") for v in range(VIDEOS) for f in chosen}
    for loader in ("dali", "reference"):
        got = _images(root, loader, f"eval.frames_per_video={n}")
        assert set(got) == expected, loader
        for world in (2, 3):  # chosen before the rank split: the shares are disjoint and cover the selection
            parts = [set(_images(root, loader, f"eval.frames_per_video={n}", rank=r, world=world, batch=2))
                     for r in range(world)]
            assert sum(len(p) for p in parts) == len(expected) and set().union(*parts) == expected, (loader, world)


def test_frames_per_video_with_a_perturbation_and_bad_input(root, tmp_path):
    """The selected frames carry the clip's pixels (compressed from all frames); bad keys and values are named."""
    full = _images(root, "reference", "eval.perturb=video:2")
    some = _images(root, "dali", "eval.perturb=video:2", "eval.frames_per_video=3")
    assert len(some) == 2 * VIDEOS * 3 and all(torch.equal(some[k], full[k]) for k in some)
    blurred = _images(root, "dali", "eval.perturb=blur:2", "eval.frames_per_video=3")
    assert _diff(blurred, _images(root, "reference", "eval.perturb=blur:2", "eval.frames_per_video=3"))[0] <= 1
    with pytest.raises(ConfigError, match="eval.frames_per_video"):
        _cfg(root, "reference", "eval.frames_per_video=-1")
    # a key without -<frame> and a json without 'frame': the error names shard, key and field
    (tmp_path / "t" / "test" / "real").mkdir(parents=True)
    write_shards([{"__key__": "noframe", "jpg": jpeg_bytes(_faces(48)[0]), "cls": 0,
                   "json": {"video": "v", "method": "real"}}], tmp_path / "t" / "test" / "real", "t-test-real")
    for loader in ("dali", "reference"):
        with pytest.raises(ShardError, match=r"t-test-real-000000.tar key 'noframe'.*json field 'frame' is missing"):
            build_eval_loader(_cfg(tmp_path, loader, "eval.frames_per_video=2"), ["t/test"], 0, 1, "cpu", 4)


def test_keys_without_frame_fall_back_to_the_json(tmp_path):
    faces = _faces(48)
    items = [{"__key__": f"clip{i}x", "jpg": jpeg_bytes(faces[i]), "cls": 0,
              "json": json.dumps({"video": "v", "frame": 10 - i, "method": "real", "dataset": "t"}).encode()}
             for i in range(5)]
    (tmp_path / "t" / "test" / "real").mkdir(parents=True)
    write_shards(items, tmp_path / "t" / "test" / "real", "t-test-real")
    got = _images(tmp_path, "reference", "eval.frames_per_video=2")
    assert set(got) == {"t-real-clip4x", "t-real-clip0x"}  # frames 6 and 10: the first and last of the video
