"""The prep run: items -> face crops per video (parallel, resumable) -> shuffled shards per split/method -> manifest.

Two phases, both restartable at any point (kill -9 included):

1. Per item (video, frame folder or image), in worker processes: sample frames, detect + crop faces, encode JPEG.
   The crops of one video are written into `<out>/.prep/<dataset>/items/<split>/<method>/<video>.tmp<pid>/` and the
   folder is renamed to `<video>/` when complete (its `meta.json` inside), so a finished video is never redone and
   an unfinished one leaves only a temp folder that the next run removes. A video that cannot be decoded gets a
   `meta.json` with `status: skipped` and the reason (redoing it would fail the same way).
2. Per split and method, once every item of the split is done: all sample keys sorted, shuffled with a seed
   derived from (seed, dataset, split, method) and cut into shards by count and size. This plan depends only on
   the finished crops, so a rerun recomputes the same plan, keeps every shard whose `.idx` lists exactly the planned
   keys and writes only the rest. `manifest.json` is written last; then the work folder of the split is removed
   (unless `keep_work`).

`--part i/N` runs phase 1 for a deterministic share of the items (every N-th of the sorted list, from i) and stops;
`merge()` (`ltm prep merge`) runs phase 2 once all N shares are done. A single run (N = 1) does both, so parts +
merge write byte-identical shards to one uninterrupted run.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing as mp
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from data_prep.datasets import Item
from data_prep.keys import sample_key, video_id
from data_prep.protocol import crop_faces, frame_summary
from data_prep.shards import (
    _sample_size,
    clean_partial,
    content_digest,
    jpeg_bytes,
    sha256_file,
    shard_name,
    write_json_atomic,
    write_shard,
)

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
WORK = ".prep"


@dataclass
class Settings:
    """Everything that decides the output; a rerun with different values refuses to mix them into one output."""

    frames: int | None = 32  # per video, evenly spaced; None = every frame
    size: int = 224
    scale: float = 1.3
    quality: int = 95
    detector: str = "mtcnn"
    detector_model: str | None = None
    detect_side: int = 320  # detection on a copy with this short side at most (faces >= min_face/320 of it)
    min_face: int = 32
    threshold: float = 0.9
    shard_samples: int = 2000
    shard_bytes: int = 512 * 1024 * 1024
    seed: int = 0
    regions: str = "auto"  # auto: fakes get region.png from FF++ masks or their original (data_prep.regions); none
    top_up: int = 0  # a sampled frame without a face is replaced by the nearest one with a face <= top_up frames away


REGION_CHOICES = ("auto", "none")


@dataclass
class Runtime:
    """How to run (does not change the output)."""

    workers: int = 1
    device: str = "auto"
    batch_size: int = 32
    part: tuple[int, int] = (0, 1)
    keep_work: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)


def parse_part(text: str) -> tuple[int, int]:
    """`i/N` with 0 <= i < N (SLURM: --array=0-(N-1), --part $SLURM_ARRAY_TASK_ID/N)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError as exc:
        raise ValueError(f"--part must look like i/N (e.g. 0/4), got {text!r}") from exc
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--part {text}: need 0 <= i < N")
    return i, n


def work_dir(out: Path, dataset: str) -> Path:
    return out / WORK / dataset


def item_dir(out: Path, dataset: str, item: Item) -> Path:
    return work_dir(out, dataset) / "items" / item.split / item.method / item.video


# ---------------------------------------------------------------- phase 1: one item
_DETECTOR = None
_SETTINGS: Settings | None = None


def _init_worker(settings: Settings, runtime: Runtime, threads: int) -> None:
    global _DETECTOR, _SETTINGS
    import torch

    torch.set_num_threads(max(1, threads))
    from data_prep.faces import build_detector

    _SETTINGS = settings
    _DETECTOR = build_detector(settings.detector, runtime.device, settings.detector_model, settings.detect_side,
                               settings.min_face, settings.threshold, runtime.batch_size)


def _frames_of(item: Item, n: int | None) -> tuple[list[tuple[int, object]], list[str]]:
    """(frame index, RGB array) pairs for an item, and notes on frames that could not be read."""
    from data_prep.video import evenly_spaced, read_image, sample_frames

    if item.kind == "video":
        return sample_frames(item.path, n), []
    if item.kind == "image":
        return [(0, read_image(item.path))], []
    from data_prep.video import IMAGE_EXTS, VideoError

    files = item.files or sorted(str(p) for p in Path(item.path).iterdir() if p.suffix.lower() in IMAGE_EXTS)
    frames, bad = [], []
    for i in evenly_spaced(len(files), n):
        try:
            frames.append((i, read_image(files[i])))
        except VideoError as exc:
            bad.append(str(exc))
    if not frames:
        raise VideoError(f"{item.path}: no readable image ({bad[0] if bad else 'empty folder'})")
    return frames, bad


def process_item(item: Item, out: Path, dataset: str, settings: Settings, detector) -> dict:
    """Decode, detect, crop and encode one item into its work folder; returns its meta record."""
    from data_prep.video import VideoError

    final = item_dir(out, dataset, item)
    if (final / "meta.json").is_file():
        return json.loads((final / "meta.json").read_text())
    tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    meta = {"item": item.to_dict(), "status": "ok", "reason": "", "samples": [], "frames_read": 0, "no_face": 0,
            "bad_frames": []}
    try:
        frames, bad = _frames_of(item, settings.frames)
        meta["frames_read"], meta["bad_frames"] = len(frames), bad
        frames, faces, picked = crop_faces(item, frames, detector, settings)
        regions: dict = {}
        if settings.regions == "auto" and item.label == 1 and (item.mask or item.original):
            from data_prep.regions import regions_for

            regions, note = regions_for(item, frames, faces, settings.size)
            if note:
                meta["region_note"] = note
                log.warning("%s: region: %s", item.path, note)
        for pos, ((idx, _), face) in enumerate(zip(frames, faces)):
            if face is None:
                meta["no_face"] += 1
                continue
            name = f"{idx:06d}.jpg"
            (tmp / name).write_bytes(jpeg_bytes(face.crop, settings.quality))
            rec = {"frame": idx, "file": name, "bbox": face.box, "crop_box": face.crop_box,
                   "score": round(face.score, 4)}
            if item.face_rule != "largest":
                rec["face_rule"] = picked["rules"][pos]
            if idx in picked["topped_up"]:
                rec["topped_up_from"] = picked["topped_up"][idx]
            if idx in regions:
                kind, png = regions[idx]
                rec["region"], rec["region_file"] = kind, f"{idx:06d}.region.png"
                (tmp / rec["region_file"]).write_bytes(png)
            meta["samples"].append(rec)
        if not meta["samples"]:
            meta["status"], meta["reason"] = "skipped", f"no face found in {len(frames)} sampled frames"
    except (VideoError, OSError, ValueError, RuntimeError) as exc:
        meta["status"], meta["reason"] = "skipped", str(exc)
    if meta["status"] == "skipped":
        log.warning("skipping %s: %s", item.path, meta["reason"])
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # a previous run died after renaming but the meta check above raced: keep the finished one
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, final)
    return meta


def _worker_task(item_dict: dict, out: str, dataset: str) -> dict:
    meta = process_item(Item(**item_dict), Path(out), dataset, _SETTINGS, _DETECTOR)
    return {"status": meta["status"], "faces": len(meta["samples"])}


# ---------------------------------------------------------------- plans and settings
def _check_settings(wd: Path, dataset: str, settings: Settings) -> None:
    f = wd / "settings.json"
    mine = asdict(settings)
    if f.is_file():
        old = _stored_settings(json.loads(f.read_text()))
        diff = {k: (old.get(k), v) for k, v in mine.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"{wd} holds an unfinished prep of {dataset} with other settings "
                             f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())}); rerun with the same "
                             f"settings to resume it, or remove {wd}")
    else:
        write_json_atomic(f, mine)


def _manifest_settings(out: Path, dataset: str, split: str) -> dict | None:
    f = out / dataset / split / "manifest.json"
    if f.is_file():
        return _stored_settings(json.loads(f.read_text()).get("settings"))
    return None


def _stored_settings(stored: dict | None) -> dict | None:
    """Settings as an output recorded them; outputs from before `regions` existed hold no region maps."""
    return None if stored is None else {"regions": "none", "top_up": 0, **stored}


def _clean_item_temps(out: Path, dataset: str, items: list[Item]) -> None:
    """Remove temp folders of killed workers, for this run's own items only (parts may run concurrently)."""
    by_parent: dict[Path, set[str]] = {}
    for it in items:
        d = item_dir(out, dataset, it)
        by_parent.setdefault(d.parent, set()).add(d.name)
    for parent, names in by_parent.items():
        if not parent.is_dir():
            continue
        for p in parent.iterdir():
            if ".tmp" in p.name and p.name.split(".tmp")[0] in names:
                shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- phase 1 driver
def process_items(items: list[Item], out: Path, dataset: str, settings: Settings, runtime: Runtime) -> None:
    todo = [it for it in items if not (item_dir(out, dataset, it) / "meta.json").is_file()]
    if len(todo) < len(items):
        log.info("%s: %d of %d items already done, resuming", dataset, len(items) - len(todo), len(items))
    if not todo:
        return
    _clean_item_temps(out, dataset, todo)
    workers = max(1, min(runtime.workers, len(todo)))
    by_split: dict[str, list[Item]] = {}
    for it in todo:
        by_split.setdefault(it.split, []).append(it)
    if workers == 1:
        import torch

        # one intra-op thread: MTCNN's small convolutions lose more to thread hand-offs than they gain (measured
        # 40 ms vs 500 ms per 192 px frame on a busy 2-core machine); the caller's setting is restored afterwards
        threads = torch.get_num_threads()
        _init_worker(settings, runtime, 1)
        try:
            _run_inline(by_split, out, dataset, settings, runtime)
        finally:
            torch.set_num_threads(threads)
        return
    restarts = 0
    ctx = mp.get_context("spawn")  # a forked torch (OpenMP, CUDA) is not safe
    while True:
        remaining = {s: [it for it in its if not (item_dir(out, dataset, it) / "meta.json").is_file()]
                     for s, its in by_split.items()}
        if restarts:
            _clean_item_temps(out, dataset, [it for its in remaining.values() for it in its])
        try:
            with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                        initargs=(settings, runtime, 1)) as pool:
                for split, its in remaining.items():
                    if not its:
                        continue
                    bar = _bar(runtime, dataset, split, len(its))
                    faces = 0
                    futures = [pool.submit(_worker_task, it.to_dict(), str(out), dataset) for it in its]
                    for fut in cf.as_completed(futures):
                        faces += fut.result()["faces"]
                        bar.update(1)
                        bar.set_postfix(faces=faces, refresh=False)
                    bar.close()
            return
        except cf.process.BrokenProcessPool:
            restarts += 1
            if restarts > 2:
                raise RuntimeError("prep workers keep dying (out of memory, or a file that crashes the decoder?); "
                                   "finished videos are kept: rerun to resume") from None
            log.warning("a prep worker died; restarting the pool for the unfinished videos (%d/2)", restarts)


def _run_inline(by_split: dict[str, list[Item]], out: Path, dataset: str, settings: Settings, runtime: Runtime) -> None:
    for split, its in by_split.items():
        bar = _bar(runtime, dataset, split, len(its))
        faces = 0
        for it in its:
            meta = process_item(it, out, dataset, settings, _DETECTOR)
            faces += len(meta["samples"])
            bar.update(1)
            bar.set_postfix(faces=faces, refresh=False)
        bar.close()


def _bar(runtime: Runtime, dataset: str, split: str, total: int):
    return tqdm(total=total, desc=f"{dataset}/{split}", unit="video", disable=not runtime.progress,
                mininterval=1.0, file=sys.stderr, dynamic_ncols=True)


# ---------------------------------------------------------------- phase 2: shards and manifest
def _versions(detector_info: dict) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("ltm", "av", "opencv-python-headless", "webdataset", "Pillow", "numpy", "torch", "facenet-pytorch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _plan(samples: list[dict], settings: Settings) -> list[list[dict]]:
    shards: list[list[dict]] = []
    cur: list[dict] = []
    cur_bytes = 0
    for s in samples:
        if cur and (len(cur) >= settings.shard_samples or cur_bytes + s["_size"] > settings.shard_bytes):
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(s)
        cur_bytes += s["_size"]
    if cur:
        shards.append(cur)
    return shards


def _idx_keys(idx: Path) -> list[str] | None:
    try:
        lines = idx.read_text().splitlines()[1:]
    except OSError:
        return None
    keys: list[str] = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 4:
            key = parts[3].rsplit(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


@dataclass
class _SplitScan:
    """What the finished items of one split hold: the samples of each method, and the manifest's accounting."""

    by_method: dict[str, list[dict]] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    per_video: list[dict] = field(default_factory=list)
    region_notes: list[dict] = field(default_factory=list)
    face_rules: dict[str, int] = field(default_factory=dict)


def _scan_items(out: Path, dataset: str, split: str, items: list[Item], skipped: list[dict]) -> _SplitScan:
    """Read every item's meta.json, in (method, video) order: never in the order workers finished them."""
    scan = _SplitScan(stats={"items": len(items), "frames_read": 0, "frames_without_face": 0, "videos_used": 0},
                      skipped=[s for s in skipped if s.get("split", split) == split])
    for it in sorted(items, key=lambda i: (i.method, i.video)):
        d = item_dir(out, dataset, it)
        meta = json.loads((d / "meta.json").read_text())
        if it.kind != "image":  # a photo is one frame by nature; videos and frame folders answer to the protocol
            scan.per_video.append({"video": it.video, "method": it.method, "frames": len(meta["samples"]),
                                   "sampled": meta["frames_read"], "no_face": meta["no_face"],
                                   "topped_up": sum(1 for s in meta["samples"] if "topped_up_from" in s)})
        scan.stats["frames_read"] += meta["frames_read"]
        scan.stats["frames_without_face"] += meta["no_face"]
        if meta.get("region_note"):
            scan.region_notes.append({"path": it.path, "note": meta["region_note"]})
        where = {"split": split, "method": it.method, "video": it.video}
        for note in meta.get("bad_frames", []):
            scan.skipped.append({"path": it.path, "reason": note, **where})
        if meta["status"] != "ok":
            scan.skipped.append({"path": it.path, "reason": meta["reason"], **where})
            continue
        scan.stats["videos_used"] += 1
        for s in meta["samples"]:
            if "face_rule" in s:
                scan.face_rules[s["face_rule"]] = scan.face_rules.get(s["face_rule"], 0) + 1
            scan.by_method.setdefault(it.method, []).append(_sample_record(dataset, split, it, d, s))
    return scan


def _sample_record(dataset: str, split: str, it: Item, d: Path, s: dict) -> dict:
    """One finished crop as a shard sample to be: key, files, json and its size in the tar."""
    video = video_id(dataset, it.method, it.video)  # FF++ reuses `<target>_<source>` in every method folder
    jpg = d / s["file"]
    info = {"dataset": dataset, "split": split, "video": video, "frame": s["frame"], "label": it.label,
            "method": it.method, "compression": settings_compression(dataset), "bbox": s["bbox"], "source": it.source}
    region = d / s["region_file"] if s.get("region_file") else None
    if region is not None:
        info["region"] = s["region"]
    if it.extra:
        info.update({k: v for k, v in it.extra.items() if k not in info})
    for k in ("face_rule", "topped_up_from"):
        if k in s:
            info[k] = s[k]
    size = _sample_size({"jpg": b"", "cls": "0", "json": info}) + jpg.stat().st_size
    if region is not None:
        size += _sample_size({"region.png": b""}) + region.stat().st_size
    return {"key": sample_key(video, s["frame"]), "jpg": jpg, "label": it.label, "json": info, "region": region,
            "_size": size}


def _shard_order(samples: list[dict], settings: Settings, dataset: str, split: str, method: str) -> list[dict]:
    """Sorted by key, then shuffled across videos with a seed of (seed, dataset, split, method) alone."""
    samples = sorted(samples, key=lambda s: s["key"])
    random.Random(f"{settings.seed}/{dataset}/{split}/{method}").shuffle(samples)
    return samples


def _write_method_shards(split_dir: Path, dataset: str, split: str, method: str, samples: list[dict],
                         settings: Settings) -> list[dict]:
    """The shards of one method, in plan order; a shard whose `.idx` lists exactly its planned keys is kept."""
    mdir = split_dir / method
    mdir.mkdir(parents=True, exist_ok=True)
    clean_partial(mdir)
    prefix = f"{dataset}-{split}-{method}"
    plan = _plan(samples, settings)
    wanted = {shard_name(prefix, i) for i in range(len(plan))}
    for stale in mdir.glob(f"{prefix}-*.tar"):  # from an older, larger plan
        if stale.name not in wanted:
            stale.unlink()
            stale.with_suffix(".idx").unlink(missing_ok=True)
    records = []
    for i, shard in enumerate(plan):
        path = mdir / shard_name(prefix, i)
        keys = [s["key"] for s in shard]
        if path.is_file() and _idx_keys(path.with_suffix(".idx")) == keys:
            rec = {"name": path.name, "samples": len(keys), "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        else:
            rec = write_shard((_shard_sample(s) for s in shard), path)
        records.append({"name": f"{method}/{rec['name']}", "method": method, "samples": rec["samples"],
                        "bytes": rec["bytes"], "sha256": rec["sha256"]})
    return records


def _totals(by_method: dict[str, list[dict]]) -> dict:
    totals = {"samples": 0, "by_label": {"0": 0, "1": 0}, "by_method": {}, "videos_by_method": {},
              "regions_by_method": {}}
    for method, samples in sorted(by_method.items()):
        n = len(samples)
        totals["samples"] += n
        totals["by_label"][str(samples[0]["label"])] += n
        totals["by_method"][method] = n
        totals["videos_by_method"][method] = len({s["json"]["video"] for s in samples})
        kinds: dict[str, int] = {}
        for s in samples:
            if "region" in s["json"]:
                kinds[s["json"]["region"]] = kinds.get(s["json"]["region"], 0) + 1
        if kinds:
            totals["regions_by_method"][method] = dict(sorted(kinds.items()))
    return totals


def _manifest(dataset: str, split: str, settings: Settings, detector_info: dict, parts: int, records: list[dict],
              scan: _SplitScan) -> dict:
    manifest = {
        "format": MANIFEST_VERSION,
        "dataset": dataset,
        "split": split,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": asdict(settings),
        "detector": detector_info,
        "versions": _versions(detector_info),
        "parts": parts,
        "shards": records,
        "digest": content_digest(records),
        "totals": _totals(scan.by_method),
        "stats": scan.stats,
        "skipped": sorted(scan.skipped, key=lambda s: (s.get("method", ""), s["path"])),
    }
    if scan.region_notes:
        manifest["region_notes"] = scan.region_notes
    manifest["frames"] = frame_summary(scan.per_video, settings.frames)
    if scan.face_rules:
        manifest["face_rules"] = dict(sorted(scan.face_rules.items()))
    return manifest


def finalize_split(out: Path, dataset: str, split: str, items: list[Item], skipped: list[dict], settings: Settings,
                   runtime: Runtime, detector_info: dict, parts: int) -> dict:
    """Phase 2 for one split: shards per method, then manifest.json. Returns the manifest."""
    split_dir = out / dataset / split
    scan = _scan_items(out, dataset, split, items, skipped)
    records: list[dict] = []
    for method, samples in sorted(scan.by_method.items()):
        ordered = _shard_order(samples, settings, dataset, split, method)
        records += _write_method_shards(split_dir, dataset, split, method, ordered, settings)
    manifest = _manifest(dataset, split, settings, detector_info, parts, records, scan)
    if manifest["frames"]["videos_short"]:
        log.warning("%s/%s: %d videos have fewer face frames than the protocol's %s (listed in the manifest's "
                    "frames.short; --top-up K takes neighbouring frames instead)", dataset, split,
                    manifest["frames"]["videos_short"], settings.frames or "all")
    write_json_atomic(split_dir / "manifest.json", manifest)
    log.info("%s/%s: %d samples in %d shards (%s); %d inputs skipped", dataset, split, manifest["totals"]["samples"],
             len(records), ", ".join(f"{m} {n}" for m, n in manifest["totals"]["by_method"].items()),
             len(manifest["skipped"]))
    return manifest


def _shard_sample(s: dict) -> dict:
    out = {"__key__": s["key"], "jpg": s["jpg"].read_bytes(), "cls": s["label"], "json": s["json"]}
    if s["region"] is not None:
        out["region.png"] = s["region"].read_bytes()
    return out


def settings_compression(dataset: str) -> str:
    # the FF++-layout datasets name their compression in the dataset name (ffpp_c23, faceshifter_c23, dfd_c23)
    return dataset.rsplit("_", 1)[1] if dataset.startswith(("ffpp_", "faceshifter_", "dfd_")) else ""


# ---------------------------------------------------------------- the whole run
def run(dataset: str, items: list[Item], skipped: list[dict], out: str | Path, settings: Settings,
        runtime: Runtime) -> dict:
    """Prep one dataset into `out`. Returns {"splits": {split: manifest or None}, "samples": total, ...}."""
    out = Path(out)
    wd = work_dir(out, dataset)
    part, nparts = runtime.part
    if settings.regions not in REGION_CHOICES:
        raise ValueError(f"regions must be one of {', '.join(REGION_CHOICES)}, got {settings.regions!r}")
    # splits already finished with the same settings are left alone
    done_splits, todo_splits = [], []
    for split in sorted({it.split for it in items}):
        ms = _manifest_settings(out, dataset, split)
        if ms is None:
            todo_splits.append(split)
        elif ms == asdict(settings):
            done_splits.append(split)
        else:
            diff = ", ".join(f"{k}: {ms.get(k)} -> {v}" for k, v in asdict(settings).items() if ms.get(k) != v)
            raise ValueError(f"{out / dataset / split / 'manifest.json'} was written with other settings ({diff}); "
                             f"choose another --out or remove that split folder")
    for split in done_splits:
        log.info("%s/%s is complete (manifest.json present); nothing to do", dataset, split)
    items = sorted((it for it in items if it.split in todo_splits), key=lambda i: (i.split, i.method, i.video))
    _check_unique(items)
    result = {"dataset": dataset, "splits": {}, "part": f"{part}/{nparts}", "skipped_inputs": len(skipped)}
    if not items:
        if not done_splits:
            result["samples"] = 0
            return result
        result["samples"] = sum(_manifest_total(out, dataset, s) for s in done_splits)
        return result
    wd.mkdir(parents=True, exist_ok=True)
    _check_settings(wd, dataset, settings)
    write_json_atomic(wd / "items.json", {"dataset": dataset, "items": [it.to_dict() for it in items],
                                          "skipped": skipped, "parts": nparts})
    share = items[part::nparts]
    process_items(share, out, dataset, settings, runtime)
    write_json_atomic(wd / "parts" / f"{part}-of-{nparts}.json", {"part": part, "parts": nparts, "items": len(share)})
    if nparts > 1:
        log.info("part %d/%d of %s done (%d items); when all parts are done: ltm prep merge --out %s --dataset %s",
                 part, nparts, dataset, len(share), out, dataset)
        result["samples"] = sum(len(_meta(out, dataset, it)["samples"]) for it in share)
        return result
    return merge(out, dataset, runtime)


def _meta(out: Path, dataset: str, it: Item) -> dict:
    return json.loads((item_dir(out, dataset, it) / "meta.json").read_text())


def _manifest_total(out: Path, dataset: str, split: str) -> int:
    return json.loads((out / dataset / split / "manifest.json").read_text())["totals"]["samples"]


def _check_unique(items: list[Item]) -> None:
    seen: dict[tuple, str] = {}
    for it in items:
        k = (it.split, it.method, it.video)
        if k in seen:
            raise ValueError(f"two inputs map to video id {it.video!r} in {it.split}/{it.method}: {seen[k]} and "
                             f"{it.path}")
        seen[k] = it.path


def merge(out: str | Path, dataset: str, runtime: Runtime | None = None) -> dict:
    """Phase 2: once every item of the dataset's unfinished splits is done, write shards and manifests."""
    runtime = runtime or Runtime()
    out = Path(out)
    wd = work_dir(out, dataset)
    if not (wd / "items.json").is_file():
        done = sorted(p.parent.name for p in (out / dataset).glob("*/manifest.json"))
        if done:
            log.info("%s: splits %s are complete; nothing to merge", dataset, done)
            return {"dataset": dataset, "splits": {s: None for s in done},
                    "samples": sum(_manifest_total(out, dataset, s) for s in done)}
        raise FileNotFoundError(f"nothing to merge: {wd / 'items.json'} not found (run the parts first)")
    plan = json.loads((wd / "items.json").read_text())
    settings = Settings(**_stored_settings(json.loads((wd / "settings.json").read_text())))
    items = [Item(**d) for d in plan["items"]]
    missing = [i for i, it in enumerate(items) if not (item_dir(out, dataset, it) / "meta.json").is_file()]
    if missing:
        nparts = plan["parts"]
        parts = sorted({i % nparts for i in missing})
        raise RuntimeError(f"{dataset}: {len(missing)} items are not done yet (e.g. {items[missing[0]].path}); "
                           f"unfinished part(s) {', '.join(f'{p}/{nparts}' for p in parts)}: rerun them, then merge")
    from data_prep.faces import build_detector

    detector_info = {"name": settings.detector}
    try:
        detector_info = build_detector(settings.detector, "cpu", settings.detector_model, settings.detect_side,
                                       settings.min_face, settings.threshold, runtime.batch_size).info()
        detector_info.pop("device", None)
    except (ImportError, FileNotFoundError, ValueError) as exc:
        log.debug("detector info unavailable: %s", exc)
    result = {"dataset": dataset, "splits": {}, "samples": 0}
    for split in sorted({it.split for it in items}):
        its = [it for it in items if it.split == split]
        manifest = finalize_split(out, dataset, split, its, list(plan["skipped"]), settings, runtime,
                                  detector_info, plan["parts"])
        result["splits"][split] = manifest
        result["samples"] += manifest["totals"]["samples"]
    if not runtime.keep_work:
        shutil.rmtree(wd, ignore_errors=True)
        if wd.parent.is_dir() and not any(wd.parent.iterdir()):
            wd.parent.rmdir()
    return result
