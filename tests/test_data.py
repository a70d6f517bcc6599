"""ltm.data on shards written by data_prep's shard writer: eval coverage, rank split, weights, resume, bad input."""

from __future__ import annotations

import gc
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import wds2idx
import webdataset as wds

from data_prep.keys import video_id
from data_prep.shards import jpeg_bytes, write_shards
from ltm.config import load_config
from ltm.data import ShardError, build_eval_loader, build_train_loader, per_rank_batch

LOADERS = ["dali", "reference"]
SIZE = 48
# Per training source: (label, mean grey level). The level tells the source of a decoded training sample.
TRAIN = {"real": (0, 40), "FaceSwap": (1, 128), "Deepfakes": (1, 215)}


def _image(rng: np.random.Generator, level: int, size: int) -> np.ndarray:
    noise = rng.integers(-20, 21, (size, size, 3))
    return np.clip(level + noise, 0, 255).astype(np.uint8)


def _samples(method: str, label: int, level: int, n: int, seed: int, sizes=(SIZE,)):
    rng = np.random.default_rng(seed)
    for i in range(n):
        video = f"{method}_{i // 4:03d}"
        size = sizes[i % len(sizes)]
        yield {
            "__key__": f"{video}-{i % 4:06d}",
            "jpg": jpeg_bytes(_image(rng, level, size)),
            "cls": label,
            "json": {"dataset": "syn", "split": "x", "video": video, "frame": i % 4, "label": label, "method": method},
        }


@pytest.fixture(scope="session")
def shard_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    for j, (method, (label, level)) in enumerate(TRAIN.items()):
        write_shards(_samples(method, label, level, 60, j), root / "syn/train" / method, f"syn-train-{method}", 25)
    # test split: odd counts, several shards, some samples stored larger than the training size (resized)
    write_shards(_samples("real", 0, 90, 37, 10, (SIZE, 64)), root / "syn/test/real", "syn-test-real", 10)
    write_shards(_samples("Deepfakes", 1, 160, 22, 11), root / "syn/test/Deepfakes", "syn-test-Deepfakes", 8)
    return root


def _cfg(root: Path, loader: str, *extra: str):
    return load_config(
        None,
        [
            f"data.root={root}",
            f"data.loader={loader}",
            f"data.image_size={SIZE}",
            "data.shuffle_buffer=32",
            "data.num_threads=1",
            "train.batch_size=16",
            "data.train=[{path: syn/train/real, weight: 2}, {path: syn/train/FaceSwap, weight: 1},"
            " {path: syn/train/Deepfakes, weight: 1}]",
            *extra,
        ],
    )


def _eval_all(cfg, folders, rank=0, world=1, batch=8) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    loader = build_eval_loader(cfg, folders, rank, world, "cpu", batch)
    assert loader.kind == cfg.data.loader  # no silent fallback: "both loaders agree" must compare two loaders
    n = 0
    for b in loader:
        assert b["images"].shape[1:] == (3, SIZE, SIZE) and b["images"].dtype == torch.float32
        assert len(b["keys"]) == len(b["labels"]) == len(b["videos"]) == len(b["methods"]) == b["images"].shape[0]
        for i, key in enumerate(b["keys"]):
            assert key not in out, f"{key} returned twice"
            out[key] = (float(b["labels"][i]), b["videos"][i], b["methods"][i], b["images"][i])
        n += len(b["keys"])
    assert n == loader.num_samples
    return out


def _written(root: Path, split: str) -> dict[str, float]:
    keys = {}
    for tar in sorted((root / "syn" / split).glob("*/*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            meta = json.loads(s["json"])  # the loaders name samples with their dataset and method
            keys[video_id(meta["dataset"], meta["method"], s["__key__"])] = float(s["cls"].decode())
    return keys


def test_eval_both_loaders_same_keys_labels_and_pixels(shard_root):
    expected = _written(shard_root, "test")
    got = {name: _eval_all(_cfg(shard_root, name), ["syn/test"]) for name in LOADERS}
    for name, out in got.items():
        assert {k: v[0] for k, v in out.items()} == expected, name
        assert all(v[1] == k.rsplit("-", 1)[0] for k, v in out.items())
        assert {v[2] for v in out.values()} == {"real", "Deepfakes"}
    # the same decoded pixels up to JPEG decoder rounding (both libjpeg-turbo based); resized ones roughly
    for key, (_, _, _, img) in got["dali"].items():
        diff = (img - got["reference"][key][3]).abs().max().item()
        assert diff <= (3 / 255 if key.startswith("Deepfakes") else 0.1), (key, diff)


@pytest.mark.parametrize("loader", LOADERS)
def test_eval_two_ranks_cover_the_set_once(shard_root, loader):
    cfg = _cfg(shard_root, loader)
    expected = _written(shard_root, "test")
    parts = [_eval_all(cfg, ["syn/test/real", "syn/test/Deepfakes"], r, 2, batch=5) for r in range(2)]
    assert not set(parts[0]) & set(parts[1])
    assert set(parts[0]) | set(parts[1]) == set(expected)
    assert abs(len(parts[0]) - len(parts[1])) <= 1  # 59 samples: 29 + 30, the last batch's padding dropped


def _source_of(images: torch.Tensor) -> list[str]:
    means = images.mean(dim=(1, 2, 3)) * 255
    levels = {name: level for name, (_, level) in TRAIN.items()}
    return [min(levels, key=lambda n: abs(levels[n] - m)) for m in means.tolist()]


@pytest.mark.parametrize("loader", LOADERS)
def test_weighted_sources_follow_the_weights(shard_root, loader):
    train = build_train_loader(_cfg(shard_root, loader), 0, 1, "cpu")
    assert train.kind == loader
    counts = dict.fromkeys(TRAIN, 0)
    for _ in range(60):
        images, labels = next(train)
        assert images.shape == (16, 3, SIZE, SIZE) and labels.shape == (16,)
        assert images.dtype == labels.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1
        for name, label in zip(_source_of(images), labels.tolist()):
            assert TRAIN[name][0] == label
            counts[name] += 1
    n = sum(counts.values())
    # weights 2:1:1 -> 0.5, 0.25, 0.25; 960 draws: 3 sigma of a share is <= 0.049, tolerance 0.05
    for name, share in {"real": 0.5, "FaceSwap": 0.25, "Deepfakes": 0.25}.items():
        assert abs(counts[name] / n - share) < 0.05, (counts, loader)
    train.close()


@pytest.mark.parametrize("loader", LOADERS)
def test_restored_loader_continues_bitwise(shard_root, loader):
    cfg = _cfg(shard_root, loader)
    first = build_train_loader(cfg, 1, 2, "cpu")  # rank 1 of 2, per-rank batch 8
    assert first.kind == loader
    for _ in range(9):  # more than one pass over a rank's part of a source (30 samples)
        next(first)
    state = pickle.loads(pickle.dumps(first.state_dict()))
    expected = [next(first) for _ in range(5)]
    restored = build_train_loader(cfg, 1, 2, "cpu")
    restored.load_state_dict(state)
    for (xi, xl), (yi, yl) in zip(expected, (next(restored) for _ in range(5))):
        assert torch.equal(xi, yi) and torch.equal(xl, yl)
    # and the state does not fit another rank
    other = build_train_loader(cfg, 0, 2, "cpu")
    with pytest.raises(ValueError, match="rank"):
        other.load_state_dict(state)
    for loader_ in (first, restored, other):
        loader_.close()  # no pipeline threads left behind when later tests fork DataLoader workers


@pytest.mark.parametrize("loader", LOADERS)
def test_state_of_another_batch_size_or_source_list_is_refused(shard_root, loader):
    """A saved position means nothing to a loader with another batch size or other sources: refused, not applied."""
    cfg = _cfg(shard_root, loader)
    saved = build_train_loader(cfg, 0, 1, "cpu")
    next(saved)
    state = pickle.loads(pickle.dumps(saved.state_dict()))
    saved.close()
    others = {
        "batch": _cfg(shard_root, loader, "train.batch_size=8"),
        "sources": _cfg(shard_root, loader, "data.train=[{path: syn/train/real, weight: 2},"
                                            " {path: syn/train/FaceSwap, weight: 1}]"),
    }
    others["weight"] = _cfg(shard_root, loader, "data.train=[{path: syn/train/real, weight: 1},"
                                                " {path: syn/train/FaceSwap, weight: 1}, {path: syn/train/Deepfakes,"
                                                " weight: 1}]")
    for what, other_cfg in others.items():
        other = build_train_loader(other_cfg, 0, 1, "cpu")
        assert other.kind == loader
        with pytest.raises(ValueError, match="sources" if what == "weight" else what):
            other.load_state_dict(state)
        other.close()


def test_per_rank_batch():
    cfg = load_config(None, ["train.batch_size=32", "train.grad_accum=2"])
    assert per_rank_batch(cfg, 4) == 4
    with pytest.raises(ValueError, match="batch_size=32"):
        per_rank_batch(cfg, 3)


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="session")
def bad_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    good = list(_samples("real", 0, 100, 12, 20))
    corrupt = [dict(s) for s in good]
    corrupt[7]["jpg"] = corrupt[7]["jpg"][:300] + b"\x00" * 50  # cut off inside its headers
    write_shards(corrupt, root / "corrupt", "corrupt", 100)
    write_shards(good, root / "noidx", "noidx", 100)
    next((root / "noidx").glob("*.idx")).unlink()
    (root / "empty").mkdir()
    # a sample without cls: the writer refuses it, so write the tar the way it does by hand
    tar = root / "nocls" / "nocls-000000.tar"
    tar.parent.mkdir()
    with wds.TarWriter(str(tar)) as w:
        for i, s in enumerate(good):
            member = {"__key__": s["__key__"], "jpg": s["jpg"], "json": b"{}"}
            if i != 4:
                member["cls"] = b"0"
            w.write(member)
    with wds2idx.IndexCreator(str(tar), str(tar.with_suffix(".idx")), verbose=False) as ic:
        ic.create_index()
    return root


def _train(root: Path, loader: str, path: str, *extra: str):
    cfg = _cfg(root, loader, f"data.train=[{{path: {path}, weight: 1}}]", "train.batch_size=4", *extra)
    train = build_train_loader(cfg, 0, 1, "cpu")
    assert train.kind == loader
    return train


@pytest.mark.parametrize("loader", LOADERS)
def test_bad_folders_are_named(bad_root, loader):
    with pytest.raises(ShardError, match="missing.* does not exist"):
        _train(bad_root, loader, "missing")
    with pytest.raises(ShardError, match=r"noidx-000000.tar: index noidx-000000.idx is missing"):
        _train(bad_root, loader, "noidx")
    with pytest.raises(ShardError, match="empty source"):
        _train(bad_root, loader, "empty")
    with pytest.raises(ShardError, match=r"nocls-000000.tar key 'real_001-000000': no cls member"):
        build_eval_loader(_cfg(bad_root, loader), ["nocls"], 0, 1, "cpu", 4)


@pytest.mark.parametrize("loader", LOADERS)
def test_sample_without_cls_skipped_when_asked(bad_root, loader):
    cfg = _cfg(bad_root, loader, "data.on_bad_sample=skip")
    keys = [set(_eval_all(cfg, ["nocls"], r, 2, batch=4)) for r in range(2)]
    assert not keys[0] & keys[1]
    assert len(keys[0] | keys[1]) == 11 and not any(k.endswith("-real_001-000000") for k in keys[0] | keys[1])
    train = _train(bad_root, loader, "nocls", "data.on_bad_sample=skip")
    assert next(train)[0].shape[0] == 4


@pytest.mark.parametrize("loader", LOADERS)
def test_corrupt_jpeg_error_names_shard_and_key(bad_root, loader):
    cfg = _cfg(bad_root, loader)
    with pytest.raises(Exception, match=r"corrupt-000000.tar key 'real_001-000003': corrupt JPEG"):
        _eval_all(cfg, ["corrupt"], batch=4)
    train = _train(bad_root, loader, "corrupt")
    with pytest.raises(Exception, match=r"corrupt-000000.tar key 'real_001-000003': corrupt JPEG"):
        for _ in range(4):  # 12 samples, batch 4: the bad one comes within the first pass
            next(train)


@pytest.mark.parametrize("loader", LOADERS)
def test_corrupt_jpeg_skipped_and_counted(bad_root, loader):
    cfg = _cfg(bad_root, loader, "data.on_bad_sample=skip")
    loader_ = build_eval_loader(cfg, ["corrupt"], 0, 1, "cpu", 4)
    assert loader_.kind == loader
    keys = [k for b in loader_ for k in b["keys"]]
    assert len(keys) == 11 and not any(k.endswith("-real_001-000003") for k in keys) and loader_.skipped == 1
    train = _train(bad_root, loader, "corrupt", "data.on_bad_sample=skip")
    seen = sum(next(train)[0].shape[0] for _ in range(6))  # 24 draws over 2 passes of 12 samples
    assert train.skipped >= 1 and seen == 24 - train.skipped


def test_dali_missing_falls_back_to_reference(shard_root, monkeypatch, caplog):
    import sys

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # `import nvidia.dali` now raises ImportError
    loader = build_train_loader(_cfg(shard_root, "dali"), 0, 1, "cpu")
    assert loader.kind == "reference" and "nvidia.dali cannot be imported" in caplog.text
    assert next(loader)[0].shape == (16, 3, SIZE, SIZE)
    loader.close()


def test_both_loaders_on_prepared_sample_shards(sample_shards):
    """The project's own prep output (real face crops, manifest) through the tiny-cpu config."""
    import json

    cfg = {name: load_config("tiny-cpu", [f"data.root={sample_shards}", f"data.loader={name}"]) for name in LOADERS}
    manifest = json.loads((sample_shards / "ffpp_c23/test/manifest.json").read_text())
    expected = {}
    for tar in sorted((sample_shards / "ffpp_c23/test").glob("*/*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            meta = json.loads(s["json"])
            expected[s["__key__"], meta["method"]] = (float(s["cls"].decode()), meta["video"])
    assert len(expected) == sum(sh["samples"] for sh in manifest["shards"])
    for name in LOADERS:
        got = {}
        for b in build_eval_loader(cfg[name], cfg[name].data.test, 0, 1, "cpu", 16):
            assert b["images"].shape[1:] == (3, 112, 112)
            for k, y, v, m in zip(b["keys"], b["labels"].tolist(), b["videos"], b["methods"]):
                got[k, m] = (y, v)
        assert got == expected, name
        train = build_train_loader(cfg[name], 0, 1, "cpu")
        assert train.kind == name
        images, labels = next(train)
        assert images.shape == (32, 3, 112, 112) and set(labels.tolist()) <= {0.0, 1.0}


class _CyclicGarbage:
    """Garbage in a reference cycle (only a collection frees it) whose finalizer leaves a file named after the process
    it ran in."""

    def __init__(self, folder: Path):
        self.folder, self.me = folder, self

    def __del__(self):
        (self.folder / str(os.getpid())).touch()


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_reference_workers_leave_the_parents_garbage_to_the_parent(shard_root, tmp_path, monkeypatch, kind):
    """A worker forked while this process holds uncollected garbage must not finalize it: a dropped DALI pipeline's
    finalizer joins executor threads the worker does not have, and the worker dies of a segmentation fault. Here each
    worker runs a full collection before every decode, and only this process may run the finalizer."""
    from ltm.data import reference

    decode = reference.decode_jpeg

    def collect_then_decode(*args):
        gc.collect()
        return decode(*args)

    monkeypatch.setattr(reference, "decode_jpeg", collect_then_decode)
    cfg = _cfg(shard_root, "reference")
    gc.disable()  # the garbage must still be there when the workers fork
    try:
        _CyclicGarbage(tmp_path)
        if kind == "train":
            train = build_train_loader(cfg, 0, 1, "cpu")
            next(train)
            del train
        else:
            assert sum(len(b["keys"]) for b in build_eval_loader(cfg, ["syn/test"], 0, 1, "cpu", 8)) == 59
    finally:
        gc.enable()
    gc.collect()
    assert sorted(p.name for p in tmp_path.iterdir()) == [str(os.getpid())]


def test_loader_state_matches_a_source_named_relatively_or_absolutely(tmp_path, monkeypatch):
    """A run resumed with data.root given absolutely (or from another directory) reads the same shards: its
    loader state must be accepted; another folder must not."""
    from types import SimpleNamespace

    from ltm.data.state import check_state, loader_identity

    (tmp_path / "shards" / "real").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path)

    class Src(SimpleNamespace):
        def __len__(self):
            return 888

    def loader(folder):
        return SimpleNamespace(kind="reference", rank=0, world_size=1, batch=32,
                               sources=[Src(folder=folder, weight=1.0)])

    saved = loader_identity(loader("shards/real"))
    check_state(loader(str(tmp_path / "shards" / "real")), saved)
    old_style = {**saved, "sources": [("shards/real", 1.0, 888)]}  # saved before paths were resolved
    check_state(loader(str(tmp_path / "shards" / "real")), old_style)
    with pytest.raises(ValueError, match="sources is"):
        check_state(loader(str(tmp_path / "other")), saved)


@pytest.mark.parametrize("loader", LOADERS)
def test_prefetch_depth_changes_no_batch_and_no_resume(shard_root, loader):
    """data.prefetch (DALI's prefetch_queue_depth of the read and decode pipelines; the DataLoader's prefetch_factor)
    decides how far ahead batches are decoded, not which: depths 1 and 4 give bitwise the same batches, and a state
    saved at one depth continues exactly at the other (the state is the handed-out batch's, not the prefetched)."""
    def take(depth: int, n: int, state: dict | None = None) -> tuple[list, dict]:
        train = build_train_loader(_cfg(shard_root, loader, f"data.prefetch={depth}"), 1, 2, "cpu")
        if state is not None:
            train.load_state_dict(state)
        got = [next(train) for _ in range(n)]
        saved = pickle.loads(pickle.dumps(train.state_dict()))
        train.close()
        return got, saved

    shallow, _ = take(1, 8)
    deep, _ = take(4, 8)
    for (xi, xl), (yi, yl) in zip(shallow, deep, strict=True):
        assert torch.equal(xi, yi) and torch.equal(xl, yl)
    _, saved_deep = take(4, 3)
    continued, _ = take(1, 5, saved_deep)
    for (xi, xl), (yi, yl) in zip(shallow[3:], continued, strict=True):
        assert torch.equal(xi, yi) and torch.equal(xl, yl)


def test_pin_memory_changes_no_batch(shard_root):
    """data.pin_memory asks the reference loader's DataLoader for page-locked batches, which only a copy to a GPU
    uses: for a CUDA device the DataLoader is built with it; on the CPU it is accepted and does nothing (the same
    batches, bitwise)."""
    from ltm.data import train_sources
    from ltm.data.reference import ReferenceTrainLoader

    cfg = _cfg(shard_root, "reference", "data.pin_memory=true")
    # built, not iterated: without CUDA no batch can go to the GPU, but the choice is made at construction
    assert ReferenceTrainLoader(train_sources(cfg), cfg, 0, 1, torch.device("cuda"), 8).pin_memory is True
    batches = {}
    for pin in (False, True):
        train = build_train_loader(_cfg(shard_root, "reference", f"data.pin_memory={pin}"), 0, 1, "cpu")
        assert train.pin_memory is False  # no CUDA: nothing to pin for
        batches[pin] = [next(train) for _ in range(4)]
        train.close()
    for (xi, xl), (yi, yl) in zip(batches[False], batches[True], strict=True):
        assert torch.equal(xi, yi) and torch.equal(xl, yl)
