"""Shard writing: WebDataset tars with their DALI index, made visible only when complete.

The shard format (docs/shards.md): `<root>/<dataset>/<split>/<method>/<dataset>-<split>-<method>-NNNNNN.tar`, one
`.idx` per tar, `manifest.json` per split written last. A sample is a dict with `__key__` (str), `jpg` (bytes), `cls`
(`0`/`1`, int or str) and `json` (dict of metadata), and optionally `region.png` (bytes: a fake's manipulated region).

Public API:
    write_shards(samples, folder, prefix, max_samples=..., max_bytes=..., start_index=0) -> list[dict]
        Writes the samples in the given order into `<folder>/<prefix>-NNNNNN.tar` (+ `.idx`), each shard closed
        when it reaches `max_samples` samples or `max_bytes` bytes. Returns one record per shard:
        `{"name", "samples", "bytes", "sha256", "keys"}` (`name` relative to `folder`).
    write_shard(samples, path) -> dict        one shard at an exact path (temp name, index, rename).
    sha256_file(path) -> str
    content_digest(records) -> str             one sha256 for a split's shards (the manifest's `digest`)
    write_json_atomic(path, obj)               manifest writes: temp name, fsync, rename.
    clean_partial(folder)                      removes temp files a killed writer left behind.
    shard_name(prefix, index) -> str

Every tar is written by webdataset's TarWriter to `<name>.tmp<pid>` (a name no `*.tar` glob matches), its index by
DALI's `wds2idx` module, then the `.idx` and finally the `.tar` are renamed into place: a reader that lists `*.tar`
sees a shard only when both files are complete. Tar member mtimes are fixed so the same samples give the same bytes
(and the same sha256) on every run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import wds2idx

from data_prep.jpeg import jpeg_bytes  # noqa: F401  (re-exported: prep's and the tests' encoder)

DEFAULT_MAX_SAMPLES = 2000
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
TMP_MARK = ".tmp"
MTIME = 1_600_000_000.0  # fixed tar member mtime: reproducible shard bytes
# members a sample may carry besides the four required ones (docs/shards.md): `region.png`, a fake's
# manipulated region as an 8-bit map (`ltm prep synth`, `ltm prep ffpp`); readers that do not ask for it never see it
OPTIONAL_MEMBERS = ("region.png",)


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def content_digest(records: Iterable[dict]) -> str:
    """sha256 over `<name> <sha256>` lines of shard records, in their order: equal for two splits exactly when
    they hold the same samples in the same shards in the same order (tar members carry no time or owner of the
    run), and unmoved by what the manifest records about the run itself (its time, versions, the machine)."""
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r['name']} {r['sha256']}\n".encode())
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to a temp name in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _encode(sample: dict) -> dict:
    """Normalise one sample to the contract's member types and check its fields."""
    missing = [k for k in ("__key__", "jpg", "cls", "json") if k not in sample]
    if missing:
        raise ValueError(f"sample {sample.get('__key__', '?')!r} lacks field(s) {missing}")
    key = str(sample["__key__"])
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' or '/'")
    cls = str(sample["cls"]).strip()
    if cls not in ("0", "1"):
        raise ValueError(f"sample {key!r}: cls must be 0 or 1, got {sample['cls']!r}")
    if not isinstance(sample["jpg"], bytes | bytearray):
        raise ValueError(f"sample {key!r}: jpg must be bytes")
    meta = sample["json"]
    meta_bytes = meta if isinstance(meta, bytes) else json.dumps(meta, sort_keys=True).encode()
    out = {"__key__": key, "jpg": bytes(sample["jpg"]), "cls": cls.encode(), "json": meta_bytes}
    for name in OPTIONAL_MEMBERS:
        if name in sample:
            if not isinstance(sample[name], bytes | bytearray):
                raise ValueError(f"sample {key!r}: {name} must be bytes")
            out[name] = bytes(sample[name])
    return out


def write_shard(samples: Iterable[dict], path: str | Path) -> dict:
    """Write one complete shard at `path` (a `.tar`) plus its `.idx`; returns its manifest record."""
    path = Path(path)
    if path.suffix != ".tar":
        raise ValueError(f"shard path must end in .tar: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_tar = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    idx_path = path.with_suffix(".idx")
    tmp_idx = idx_path.with_name(f"{idx_path.name}{TMP_MARK}{os.getpid()}")
    keys: list[str] = []
    import webdataset as wds  # not at the top: it imports torch (seconds), which rejecting a bad flag never needs

    try:
        with open(tmp_tar, "wb") as f:
            writer = wds.TarWriter(f, mtime=MTIME)
            for sample in samples:
                enc = _encode(sample)
                writer.write(enc)
                keys.append(enc["__key__"])
            writer.close()
            f.flush()
            os.fsync(f.fileno())
        if not keys:
            raise ValueError(f"refusing to write an empty shard {path}")
        with wds2idx.IndexCreator(str(tmp_tar), str(tmp_idx), verbose=False) as creator:
            creator.create_index()
        digest = sha256_file(tmp_tar)
        size = tmp_tar.stat().st_size
        os.replace(tmp_idx, idx_path)  # the index first: a visible .tar always has its .idx
        os.replace(tmp_tar, path)
        _fsync_dir(path.parent)
    finally:
        for leftover in (tmp_tar, tmp_idx):
            if leftover.exists():
                leftover.unlink()
    return {"name": path.name, "samples": len(keys), "bytes": size, "sha256": digest, "keys": keys}


def _sample_size(sample: dict) -> int:
    # tar header + payload rounded to 512-byte blocks, per member
    total = 0
    for k, v in sample.items():
        if k.startswith("__"):
            continue
        n = len(v) if isinstance(v, bytes | bytearray | str) else len(json.dumps(v))
        total += 512 + (n + 511) // 512 * 512
    return total


def write_shards(
    samples: Iterable[dict],
    folder: str | Path,
    prefix: str,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    max_bytes: int = DEFAULT_MAX_BYTES,
    start_index: int = 0,
) -> list[dict]:
    """Write `samples` (in order) into shards `<folder>/<prefix>-NNNNNN.tar`; returns the shard records.

    A shard closes when the next sample would exceed `max_samples` samples or `max_bytes` bytes (a shard always
    holds at least one sample). Numbering starts at `start_index`.
    """
    if max_samples < 1 or max_bytes < 1:
        raise ValueError("max_samples and max_bytes must be positive")
    folder = Path(folder)
    records: list[dict] = []
    batch: list[dict] = []
    batch_bytes = 0
    index = start_index

    def flush() -> None:
        nonlocal batch, batch_bytes, index
        if batch:
            records.append(write_shard(batch, folder / shard_name(prefix, index)))
            index += 1
        batch, batch_bytes = [], 0

    for sample in samples:
        size = _sample_size(sample)
        if batch and (len(batch) >= max_samples or batch_bytes + size > max_bytes):
            flush()
        batch.append(sample)
        batch_bytes += size
    flush()
    return records


def clean_partial(folder: str | Path) -> list[Path]:
    """Remove temp files of killed writers and `.idx` files whose `.tar` never became visible."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.rglob("*"):
        if not p.is_file():
            continue
        orphan_idx = p.suffix == ".idx" and not p.with_suffix(".tar").exists()
        if TMP_MARK in p.name or orphan_idx:
            p.unlink()
            removed.append(p)
    return removed


def read_shard(path: str | Path) -> list[dict]:
    """All samples of one shard as dicts of raw bytes (tests and verification)."""
    import webdataset as wds

    return list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False))


