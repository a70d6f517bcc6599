"""`ltm prep synth` on real face photos and a real video (MTCNN for real, no mocks): real views plus the five fake
families as shards, identity-disjoint splits, byte-identical reruns, resume, the detection cache, bad input on the
command line, and the shards read back by the project's eval loader."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shared_data import SHARED_DATA

from data_prep.shards import read_shard
from data_prep.synth import FAMILIES, SynthError, SynthSettings, build_synth

REPO = Path(__file__).resolve().parents[1]
SIZE, FRAMES = 64, 2  # small and fast: 2 views per face, 64 px crops
SPLITS = ("train", "val", "test")
METHODS = ("real", *FAMILIES)
# copy name -> shared file. The word before "__" is the identity group of the --identity-regex build (GROUP_REGEX):
# four groups of two files (a-d, one of them across two folders) and five single files.
MEDIA = {
    "sub/a__img1.jpg": "faces/deepface__tests_unit_dataset_img1.jpg",
    "sub/a__img2.jpg": "faces/deepface__tests_unit_dataset_img2.jpg",
    "sub/b__img3.jpg": "faces/deepface__tests_unit_dataset_img3.jpg",
    "b__img4.jpg": "faces/deepface__tests_unit_dataset_img4.jpg",
    "c__img5.jpg": "faces/deepface__tests_unit_dataset_img5.jpg",
    "c__img6.jpg": "faces/deepface__tests_unit_dataset_img6.jpg",
    "d__img7.jpg": "faces/deepface__tests_unit_dataset_img7.jpg",
    "d__img8.jpg": "faces/deepface__tests_unit_dataset_img8.jpg",
    "e__img9.jpg": "faces/deepface__tests_unit_dataset_img9.jpg",
    "f__img10.jpg": "faces/deepface__tests_unit_dataset_img10.jpg",
    "g__img11.jpg": "faces/deepface__tests_unit_dataset_img11.jpg",
    "h__guo.jpg": "faces/3ddfa__examples_inputs_JianzhuGuo.jpg",
    "v__driving_d18.mp4": "videos/liveportrait__assets_examples_driving_d18.mp4",  # one source, two frames
}
BROKEN, FACELESS = "zz__broken.jpg", "zz__faceless.png"  # skipped, with their reason, by a run that succeeds
GROUP_REGEX = r"[a-z]+(?=__)"


def ltm(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """The real command line, in its own process."""
    return subprocess.run([sys.executable, "-m", "ltm.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO), "LTM_LOG_LEVEL": "INFO"})


def prep_synth(root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return ltm("prep", "synth", "--root", str(root), "--out", str(out), "--size", str(SIZE), "--frames", str(FRAMES),
               *extra)


def settings(**kw) -> SynthSettings:
    """The settings `prep_synth` gives (the CLI's defaults otherwise), for in-process builds."""
    return SynthSettings(frames=FRAMES, size=SIZE, **kw)


def manifests(out: Path) -> dict[str, dict]:
    return {s: json.loads((out / "synth" / s / "manifest.json").read_text()) for s in SPLITS}


def shard_hashes(out: Path) -> dict[str, str]:
    return {f"{split}/{r['name']}": r["sha256"] for split, m in manifests(out).items() for r in m["shards"]}


def read_samples(out: Path) -> list[dict]:
    """Every sample of every split: split, method folder, key, cls, json metadata and the decoded image."""
    rows = []
    for split in SPLITS:
        for tar in sorted((out / "synth" / split).glob("*/*.tar")):
            for s in read_shard(tar):
                region = None
                if "region.png" in s:
                    with Image.open(io.BytesIO(s["region.png"])) as im:
                        assert im.format == "PNG" and im.mode == "L", (s["__key__"], im.format, im.mode)
                        region = np.asarray(im, np.float32) / 255
                rows.append({"split": split, "folder": tar.parent.name, "key": s["__key__"], "cls": int(s["cls"]),
                             "meta": json.loads(s["json"]), "jpg": s["jpg"],
                             "img": np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"), np.float32),
                             "region": region})
    return rows


def copy_with_cache(out: Path, dest: Path) -> Path:
    """A new, empty output folder holding `out`'s detection cache (so no detector runs)."""
    cache = dest / ".synth" / "synth"
    cache.mkdir(parents=True)
    shutil.copy2(out / ".synth" / "synth" / "faces.json", cache / "faces.json")
    return dest


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory) -> Path:
    """12 single-face photos and one video from the shared test data, plus an unreadable and a faceless image."""
    missing = [str(SHARED_DATA / src) for src in MEDIA.values() if not (SHARED_DATA / src).is_file()]
    assert not missing, f"need the real test media in {SHARED_DATA}: missing {missing}"
    root = tmp_path_factory.mktemp("synth-photos")
    for name, src in MEDIA.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHARED_DATA / src, root / name)
    (root / BROKEN).write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG " * 64)
    ramp = np.linspace(0, 255, 200 * 300, dtype=np.uint8).reshape(200, 300)
    Image.fromarray(np.stack([ramp, ramp[::-1], np.full_like(ramp, 128)], -1)).save(root / FACELESS)
    (root / "notes.txt").write_text("not media: ignored")
    return root


@pytest.fixture(scope="module")
def built(photo_root, tmp_path_factory) -> dict:
    """One build through the real command line (default settings but --size 64 --frames 2)."""
    out = tmp_path_factory.mktemp("synth-out")
    t = time.monotonic()
    proc = prep_synth(photo_root, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": photo_root, "out": out, "proc": proc, "seconds": time.monotonic() - t}


@pytest.fixture(scope="module")
def samples(built) -> list[dict]:
    return read_samples(built["out"])


def pairs(samples: list[dict]) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Per family, (real view, fake view) pairs: the same source and frame, matched through the json metadata."""
    real = {(s["meta"]["source"], s["meta"]["frame"]): s["img"] for s in samples if s["meta"]["method"] == "real"}
    out: dict[str, list] = {f: [] for f in FAMILIES}
    for s in samples:
        if s["meta"]["method"] != "real":
            out[s["meta"]["method"]].append((real[(s["meta"]["source"], s["meta"]["frame"])], s["img"]))
    return out


# ------------------------------------------------------------------------------------------- layout and metadata
def test_manifests_methods_counts_labels_and_metadata(built, samples):
    ms = manifests(built["out"])
    usable = set(MEDIA)
    per_split_sources = {}
    for split, m in ms.items():
        assert m["dataset"] == "synth" and m["split"] == split and m["kind"] == "synth"
        folders = sorted(p.name for p in (built["out"] / "synth" / split).iterdir() if p.is_dir())
        assert folders == sorted(METHODS)
        assert set(m["totals"]["by_method"]) == set(METHODS)
        n = m["stats"]["sources"] * FRAMES
        assert n > 0 and all(v == n for v in m["totals"]["by_method"].values()), m["totals"]
        assert m["totals"]["by_label"] == {"0": n, "1": n * len(FAMILIES)}
        got = [s for s in samples if s["split"] == split]
        for method in METHODS:
            assert sum(s["folder"] == method for s in got) == n, (split, method)
        assert sum(r["samples"] for r in m["shards"]) == m["totals"]["samples"] == len(got)
        assert m["settings"]["size"] == SIZE and m["settings"]["frames"] == FRAMES
        per_split_sources[split] = {s["meta"]["source"] for s in got}
        assert len(per_split_sources[split]) == m["stats"]["sources"]
    assert set().union(*per_split_sources.values()) == usable  # every usable photo and the video, nothing else

    keys = [s["key"] for s in samples]
    assert len(keys) == len(set(keys)), "duplicate sample keys"
    for s in samples:
        meta, method = s["meta"], s["folder"]
        assert set(meta) >= {"dataset", "split", "video", "frame", "label", "method", "source", "identity"}
        assert meta["dataset"] == "synth" and meta["split"] == s["split"] and meta["method"] == method
        assert s["cls"] == meta["label"] == (0 if method == "real" else 1)
        assert meta["frame"] in range(FRAMES) and meta["source"] in usable and meta["identity"] == meta["source"]
        assert meta["video"].startswith(f"synth-{method}-") and s["key"] == f"{meta['video']}-{meta['frame']:06d}"
        assert re.fullmatch(r"jpeg\d+", meta["compression"]) and len(meta["bbox"]) == 4
        assert s["img"].shape == (SIZE, SIZE, 3)
    # one video id per (method, source); a fake's id names its real source the same way
    videos = {(s["folder"], s["meta"]["source"]): s["meta"]["video"] for s in samples}
    assert len(set(videos.values())) == len(videos)
    for (method, source), video in videos.items():
        assert video.removeprefix(f"synth-{method}-") == videos[("real", source)].removeprefix("synth-real-")


def test_unreadable_and_faceless_files_are_skipped_and_the_run_succeeds(built):
    assert "Traceback" not in built["proc"].stderr
    assert error_lines(built["proc"].stderr) == []
    for m in manifests(built["out"]).values():
        skipped = {s["path"]: s["reason"] for s in m["skipped"]}
        assert set(skipped) == {BROKEN, FACELESS}, skipped
        assert "not a readable image" in skipped[BROKEN] and BROKEN in skipped[BROKEN]
        assert "no face" in skipped[FACELESS]


# ------------------------------------------------------------------------------------------- identities
def test_splits_are_identity_disjoint(built, samples):
    ms = manifests(built["out"])
    identities = {split: {s["meta"]["identity"] for s in samples if s["split"] == split} for split in SPLITS}
    sources = {split: {s["meta"]["source"] for s in samples if s["split"] == split} for split in SPLITS}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not identities[a] & identities[b], (a, b)
        assert not sources[a] & sources[b], (a, b)
    for split in SPLITS:
        assert set(ms[split]["identities"]) == identities[split]
        assert len(identities[split]) >= 2  # IdentitySwap needs a donor of another identity in every split
    assert len(identities["train"]) > len(identities["val"]) and len(identities["train"]) > len(identities["test"])


def test_identity_regex_keeps_a_group_in_one_split(built, tmp_path):
    out = copy_with_cache(built["out"], tmp_path / "grouped")
    build_synth(built["root"], out, settings=settings(identity_regex=GROUP_REGEX))
    rows = read_samples(out)
    split_of: dict[str, set[str]] = {}
    files_of: dict[str, set[str]] = {}
    for s in rows:
        meta = s["meta"]
        group = re.search(GROUP_REGEX, meta["source"]).group(0)
        assert meta["identity"] == group, meta
        split_of.setdefault(group, set()).add(s["split"])
        files_of.setdefault(group, set()).add(meta["source"])
    assert sum(len(f) == 2 for f in files_of.values()) == 4  # the test means something: four two-file groups
    assert all(len(s) == 1 for s in split_of.values()), split_of
    ms = manifests(out)
    assert sum(len(m["identities"]) for m in ms.values()) == len(files_of)  # each identity in exactly one split
    assert all(m["settings"]["identity_regex"] == GROUP_REGEX for m in ms.values())


# ------------------------------------------------------------------------------------------- determinism
def test_same_seed_gives_the_same_bytes_another_seed_other_bytes(built, tmp_path):
    again = tmp_path / "again"
    proc = prep_synth(built["root"], again)  # from scratch: detection included
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = shard_hashes(built["out"])
    assert shard_hashes(again) == first
    assert (again / ".synth/synth/faces.json").read_bytes() == (built["out"] / ".synth/synth/faces.json").read_bytes()

    other = copy_with_cache(built["out"], tmp_path / "seed1")
    build_synth(built["root"], other, settings=settings(seed=1))
    second = shard_hashes(other)
    assert set(second) == set(first)
    assert all(second[k] != first[k] for k in first), [k for k in first if second[k] == first[k]]
    # not only the shuffle: every sample's pixels (jitter, noise, JPEG quality, manipulation) follow the seed
    jpgs = {s["key"]: s["jpg"] for s in read_samples(built["out"])}
    other_jpgs = {s["key"]: s["jpg"] for s in read_samples(other)}
    assert set(other_jpgs) == set(jpgs)
    assert not [k for k in jpgs if jpgs[k] == other_jpgs[k]]


# ------------------------------------------------------------------------------------------- pixels
def test_every_fake_differs_from_its_real_view_and_real_views_differ_across_frames(samples):
    for family, ps in pairs(samples).items():
        assert len(ps) == len(MEDIA) * FRAMES, family
        diffs = [float(np.abs(r - f).mean()) for r, f in ps]
        assert min(diffs) > 0.25, (family, min(diffs))
    real = {(s["meta"]["source"], s["meta"]["frame"]): s["img"] for s in samples if s["meta"]["method"] == "real"}
    for source in MEDIA:
        d = float(np.abs(real[(source, 0)] - real[(source, 1)]).mean())
        if source.endswith(".mp4"):  # two frames of the video
            assert d > 4, (source, d)
        else:  # crops of one photo jittered in scale, shift and rotation (noise and JPEG alone differ by ~3)
            assert d > 8, (source, d)


def _regions() -> dict[str, np.ndarray]:
    b = round(0.1 * SIZE)
    border = np.ones((SIZE, SIZE), bool)
    border[b:-b, b:-b] = False
    box = {}
    for name, (y0, y1) in {"centre": (0.25, 0.75), "upper": (0.2, 0.45), "lower": (0.55, 0.85)}.items():
        box[name] = np.zeros((SIZE, SIZE), bool)
        box[name][round(y0 * SIZE): round(y1 * SIZE), SIZE // 4: 3 * SIZE // 4] = True
    return {"border": border, **box}


def test_each_family_changes_the_face_not_the_border(samples):
    regions = _regions()
    stats = {}
    for family, ps in pairs(samples).items():
        d = np.stack([np.abs(r - f).mean(-1) for r, f in ps])
        stats[family] = {name: float(d[:, m].mean()) for name, m in regions.items()}
    for family, s in stats.items():
        assert s["centre"] > 3 * s["border"], (family, s)
        assert s["border"] < 2, (family, s)  # the background stays (nearly) as it was
    # the mouth and lower face are TextureRender's: the eyes and brows change far less
    assert stats["TextureRender"]["lower"] > 2 * stats["TextureRender"]["upper"], stats["TextureRender"]


# ------------------------------------------------------------------------------------------- resume and cache
def test_rerun_with_the_same_settings_does_nothing(built):
    out = built["out"]
    files = sorted(p for p in out.rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    t = time.monotonic()
    result = build_synth(built["root"], out, settings=settings())
    assert time.monotonic() - t < 5
    assert result["samples"] == sum(m["totals"]["samples"] for m in manifests(out).values())
    assert sorted(p for p in out.rglob("*") if p.is_file()) == files
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_rerun_with_other_settings_is_refused(built):
    out = built["out"]
    mf = out / "synth" / "train" / "manifest.json"
    before = mf.read_bytes()
    proc = prep_synth(built["root"], out, "--strength", "0.5")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and str(mf) in errors[0] and "other settings" in errors[0], proc.stderr
    assert mf.read_bytes() == before
    with pytest.raises(SynthError, match="manifest.json"):
        build_synth(built["root"], out, settings=settings(seed=3))
    with pytest.raises(SynthError, match="other settings"):  # the shortcut is a setting like the others
        build_synth(built["root"], out, settings=settings(shortcut="patch"))
    assert mf.read_bytes() == before


def test_missing_split_is_rebuilt_from_the_detection_cache(built, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(built["out"], out)
    cache_file = out / ".synth" / "synth" / "faces.json"
    cache = json.loads(cache_file.read_text())
    assert set(cache["files"]) == set(MEDIA) | {BROKEN, FACELESS}
    assert "error" in cache["files"][BROKEN] and cache["files"][FACELESS]["frames"] == [[]]
    kept = {s: (out / "synth" / s / "manifest.json").stat().st_mtime_ns for s in ("train", "val")}

    shutil.rmtree(out / "synth" / "test")
    build_synth(built["root"], out, settings=settings())
    assert shard_hashes(out) == shard_hashes(built["out"])  # the same bytes as the first build
    assert {s: (out / "synth" / s / "manifest.json").stat().st_mtime_ns for s in kept} == kept

    # the cache is what the rebuild reads: a box edited there shows up in the rebuilt samples
    for rel in {s["meta"]["source"] for s in read_samples(out) if s["split"] == "test"}:
        for faces in cache["files"][rel]["frames"]:
            for face in faces:
                face["box"] = [round(v + 3.0, 2) for v in face["box"]]
    cache_file.write_text(json.dumps(cache))
    shutil.rmtree(out / "synth" / "test")
    build_synth(built["root"], out, settings=settings())
    rebuilt = [s for s in read_samples(out) if s["split"] == "test"]
    assert rebuilt
    for s in rebuilt:
        assert s["meta"]["bbox"] == cache["files"][s["meta"]["source"]]["frames"][0][0]["box"]


# ------------------------------------------------------------------------------------------- bad input
BAD = {
    "no-root": (["--root", "{tmp}/nowhere"], "--root"),
    "no-images": (["--root", "{tmp}/empty"], "no images"),
    "unknown-family": (["--families", "SelfBlend", "Morph"], "--families"),
    "family-twice": (["--families", "SelfBlend", "SelfBlend"], "--families"),
    "strength-text": (["--strength", "strong"], "--strength"),
    "strength-family": (["--strength", "Morph=2"], "--strength"),
    "strength-negative": (["--strength", "Upsample=-1"], "--strength"),
    "strength-nan": (["--strength", "nan"], "--strength"),
    "split-two": (["--split", "0.5,0.5"], "--split"),
    "split-text": (["--split", "a,b,c"], "--split"),
    "split-negative": (["--split=-0.2,0.6,0.6"], "--split"),
    "shortcut-unknown": (["--shortcut", "stripes"], "--shortcut"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_with_a_one_line_error(case, photo_root, tmp_path):
    args, needle = BAD[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no media here")
    argv = ["--root", str(photo_root), *[a.replace("{tmp}", str(tmp_path)) for a in args]]
    out = tmp_path / "out"
    proc = ltm("prep", "synth", "--out", str(out), "--size", str(SIZE), "--frames", str(FRAMES), *argv, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-3000:]
    assert not (out / "synth").exists()



def test_a_bad_flag_is_rejected_before_torch_is_imported(tmp_path):
    """Flags and folders are checked before the heavy imports: the error comes in about a second, not after torch's
    import (several seconds on a login node)."""
    code = ("import sys; from ltm.cli import main; "
            "code = main(['prep', 'synth', '--root', sys.argv[1], '--out', sys.argv[2]]); "
            "print(code, sorted(m for m in ('torch', 'webdataset', 'deepspeed') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "nowhere"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.split() == ["2", "[]"], proc.stdout + proc.stderr[-2000:]
    assert "--root" in proc.stderr

# ------------------------------------------------------------------------------------------- the eval loader
def test_shards_load_through_the_eval_loader(built):
    from ltm.config import load_config
    from ltm.data import build_eval_loader

    cfg = load_config("tiny-cpu", [f"data.root={built['out']}", f"data.image_size={SIZE}", "data.num_threads=1"])
    m = manifests(built["out"])["test"]
    keys, methods = [], []
    for batch in build_eval_loader(cfg, ["synth/test"], 0, 1, "cpu", 8):
        images = batch["images"]
        assert images.shape[1:] == (3, SIZE, SIZE) and 0 <= float(images.min()) and float(images.max()) <= 1
        assert float(images.std()) > 0.05
        for label, method in zip(batch["labels"].tolist(), batch["methods"]):
            assert label == (0.0 if method == "real" else 1.0)
        keys += batch["keys"]
        methods += batch["methods"]
    assert len(keys) == len(set(keys)) == m["totals"]["samples"]
    assert {x: methods.count(x) for x in set(methods)} == m["totals"]["by_method"]


def test_source_ids_differ_for_paths_that_sanitise_alike():
    """`a.jpg` / `a.png` and `a-b.jpg` / `a_b.jpg` are different sources: their video ids (and keys) must differ."""
    from data_prep.synth import _source_id

    ids = [_source_id({"file": f, "face": 0}) for f in ("a.jpg", "a.png", "a-b.jpg", "a_b.jpg", "x/a.jpg")]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", i) for i in ids)


# ------------------------------------------------------------------------------------------- regions
def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum() + 1e-12))


def test_fakes_carry_a_region_map_and_real_samples_none(samples):
    for s in samples:
        if s["folder"] == "real":
            assert s["region"] is None and "region" not in s["meta"], s["key"]
            continue
        assert s["meta"]["region"] == "blend", s["key"]
        assert s["region"].shape == s["img"].shape[:2] == (SIZE, SIZE), s["key"]
        assert s["region"].max() >= 0.5 and 0.01 < s["region"].mean() < 0.6, (s["key"], s["region"].mean())
        assert s["region"][0].max() < 0.5 and s["region"][-1].max() < 0.5  # the face, not the frame's border


def test_region_lies_where_the_fake_differs_from_its_real_view(samples):
    """The region map correlates with |fake - real| better than the same map flipped upside down or moved by 1/8
    of the crop in any of the four directions, and holds most of the change in a small part of the crop: a map
    written flipped, shifted or through another resize than the image's fails here."""
    real = {(s["meta"]["source"], s["meta"]["frame"]): s["img"] for s in samples if s["folder"] == "real"}
    for family in FAMILIES:
        shifts = {f"shift{axis}{sign:+d}": (axis, sign * SIZE // 8) for axis in (0, 1) for sign in (-1, 1)}
        stats: dict[str, list[float]] = {k: [] for k in ("true", "vflip", *shifts, "share", "area")}
        for s in samples:
            if s["folder"] != family:
                continue
            d = np.abs(s["img"] - real[(s["meta"]["source"], s["meta"]["frame"])]).mean(-1)
            r = s["region"]
            stats["true"].append(_corr(r, d))
            stats["vflip"].append(_corr(r[::-1], d))
            for name, (axis, by) in shifts.items():
                stats[name].append(_corr(np.roll(r, by, axis=axis), d))
            stats["share"].append(float((d * r).sum() / d.sum()))
            stats["area"].append(float(r.mean()))
        m = {k: float(np.mean(v)) for k, v in stats.items()}
        assert m["true"] > 0.4, (family, m)
        assert all(m["true"] > m[k] + 0.05 for k in ("vflip", *shifts)), (family, m)
        assert m["share"] > 2 * m["area"], (family, m)


# ------------------------------------------------------------------------------------------- the shortcut
def _checkerboard_response(img: np.ndarray, region: np.ndarray) -> float:
    """The `patch` artefact's own signature, read from the pixels: the high-passed grey image projected on a 2x2-cell
    checkerboard over the region's square (about the artefact's amplitude where it is, about 0 elsewhere)."""
    import cv2

    ys, xs = np.nonzero(region > 0.5)
    y0, x0, side = ys.min(), xs.min(), ys.max() - ys.min() + 1
    yy, xx = np.mgrid[0:side, 0:side]
    board = np.where((yy // 2 + xx // 2) % 2 == 0, 1.0, -1.0)
    g = img.mean(-1)
    hp = (g - cv2.GaussianBlur(g, (0, 0), 2.0))[y0:y0 + side, x0:x0 + side]
    return float((hp * board).mean())


@pytest.fixture(scope="module")
def shortcut_built(built, tmp_path_factory) -> dict:
    """The same build with `--shortcut patch` (in process, from the first build's detection cache)."""
    out = copy_with_cache(built["out"], tmp_path_factory.mktemp("synth-shortcut"))
    build_synth(built["root"], out, settings=settings(shortcut="patch"))
    return {"out": out, "samples": read_samples(out)}


def test_shortcut_is_in_every_train_fake_and_no_clean_val_or_test_sample(shortcut_built):
    """Read from the pixels, at the place each view's shortcut region names: the artefact is in every training
    fake and every Stamped copy, and in no real view and no clean val/test fake."""
    rows = shortcut_built["samples"]
    def view(s: dict) -> tuple[str, str, int]:  # one face's view: the video id less its dataset and method
        return s["split"], s["meta"]["video"].split("-", 2)[2], s["meta"]["frame"]

    where = {}  # view -> the artefact's square: a train fake's region or the Stamped copy's
    for s in rows:
        if s["meta"].get("region") == "shortcut":
            where[view(s)] = s["region"]
    carrying, clean = [], []
    for s in rows:
        region = where[view(s)]
        response = _checkerboard_response(s["img"], region)
        shortcut = s["folder"] != "real" and (s["split"] == "train" or s["folder"].endswith("Stamped"))
        (carrying if shortcut else clean).append((response, s["key"]))
        assert (s["meta"].get("region") == "shortcut") == shortcut, s["key"]
        if shortcut:
            assert np.array_equal(s["region"], region), s["key"]  # one square per view, whichever family
    assert len(carrying) == len(MEDIA) * FRAMES * len(FAMILIES)  # train fakes + val/test Stamped copies
    # the artefact's amplitude is 10 grey levels (6-13 measured); a view's own texture gives 0-3 (sharpened
    # SelfBlend fakes the most)
    assert min(carrying)[0] > 5, min(carrying)
    assert max(clean)[0] < 4, max(clean)
    for split in ("val", "test"):  # the clean val/test fakes are the no-shortcut build's, region and all
        assert all(s["meta"]["region"] == "blend" for s in rows if s["split"] == split and s["folder"] in FAMILIES)


def test_stamped_copies_in_val_and_test_only(shortcut_built, samples):
    out, rows = shortcut_built["out"], shortcut_built["samples"]
    ms = manifests(out)
    stamped = [f"{f}Stamped" for f in FAMILIES]
    for split, m in ms.items():
        assert m["settings"]["shortcut"] == "patch"
        folders = sorted(p.name for p in (out / "synth" / split).iterdir() if p.is_dir())
        want = sorted(METHODS) if split == "train" else sorted([*METHODS, *stamped])
        assert folders == want and sorted(m["totals"]["by_method"]) == want, (split, folders)
    clean = {s["key"]: s for s in samples}  # the build without the shortcut
    by_key = {s["key"]: s for s in rows}
    n = 0
    for s in rows:
        if not s["folder"].endswith("Stamped"):
            if s["split"] != "train" or s["folder"] == "real":  # everything the shortcut leaves alone is as before
                assert s["jpg"] == clean[s["key"]]["jpg"], s["key"]
            continue
        n += 1
        family = s["folder"].removesuffix("Stamped")
        meta = s["meta"]
        assert meta["method"] == s["folder"] and meta["region"] == "shortcut" and s["cls"] == 1
        assert meta["video"].startswith(f"synth-{s['folder']}-") and s["key"].startswith(meta["video"])
        twin = by_key[s["key"].replace(f"-{s['folder']}-", f"-{family}-", 1)]
        # the same fake with the artefact added: outside the square's 8x8 JPEG blocks the pixels are identical
        ys, xs = np.nonzero(s["region"] > 0.5)
        near = np.zeros((SIZE, SIZE), bool)
        near[ys.min() // 8 * 8: (ys.max() // 8 + 1) * 8, xs.min() // 8 * 8: (xs.max() // 8 + 1) * 8] = True
        d = np.abs(s["img"] - twin["img"]).mean(-1)
        assert d[~near].max() == 0 and d[s["region"] > 0.5].mean() > 4, (s["key"], d[~near].max())
        assert 0.08 < np.sqrt(s["region"].mean()) < 0.2  # a square of about 1/8 of the crop's side
    assert n == sum(m["stats"]["sources"] for k, m in ms.items() if k != "train") * FRAMES * len(FAMILIES)


def test_shortcut_build_is_deterministic(built, shortcut_built, tmp_path):
    again = copy_with_cache(built["out"], tmp_path / "again")
    build_synth(built["root"], again, settings=settings(shortcut="patch"))
    assert shard_hashes(again) == shard_hashes(shortcut_built["out"])


def test_manifests_from_before_the_shortcut_option_still_match(built, tmp_path):
    """Splits written before `shortcut` was a setting read as `none`: a rerun leaves them as they are."""
    for split in SPLITS:
        m = manifests(built["out"])[split]
        del m["settings"]["shortcut"]
        (tmp_path / "synth" / split).mkdir(parents=True)
        (tmp_path / "synth" / split / "manifest.json").write_text(json.dumps(m))
    result = build_synth(built["root"], tmp_path, settings=settings())
    assert result["skipped"] is None and result["samples"] == sum(m["totals"]["samples"]
                                                                 for m in manifests(built["out"]).values())
    with pytest.raises(SynthError, match="other settings"):
        build_synth(built["root"], tmp_path, settings=settings(shortcut="patch"))
