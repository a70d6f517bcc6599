"""`ltm prep synth`: a cross-manipulation benchmark built from real faces, with fakes of five artefact families.

From a folder of real photos and/or videos, MTCNN finds each face and its five landmarks (eyes, nose, mouth corners);
every face becomes a source ("video") of `frames` real views — jittered crops of a photo (scale, shift, rotation,
sensor noise, JPEG quality) or decoded frames of a video — and each family turns every real view into a fake one.
Real and fake views then share their framing, noise and final JPEG quality, so only the manipulation tells them apart.
Shards follow docs/shards.md, "Shard format": `<out>/<dataset>/<split>/{real,<Family>}/*.tar`, one `manifest.json`
per split.

The five families and the shortcut artefact are image functions in `data_prep.forgeries`; this module builds the
benchmark around them (sources, faces, identity splits, views, shards).

Regions: every fake sample also carries `region.png`, the family's per-pixel blending weight (the mask the fake was
made with) resized exactly as the crop is, json `"region": "blend"`; real samples have none.

Shortcut (`shortcut="patch"`, a benchmark for whether a model's mask finds what a detector leans on): every training
fake also carries a small checkerboard-and-colour square on one cheek (`apply_stamp`), its square as `region.png`
(`"region": "shortcut"`); val/test fakes stay clean and get stamped copies in `<Family>Stamped` folders.

Identities: sources are split identity-disjointly by `identity_regex` (the first match of the regex on the file's
path relative to `root` names its identity; default: the file's own path, i.e. one identity per file; faces of one
group photo or one video share the file's identity). Whole identity groups go to train/val/test greedily by face
count. Every draw comes from `numpy.random.default_rng([seed, ...])` keyed by the source's sorted position, view and
family: the same inputs and settings give the same shards, byte for byte.

Resumable: detections are cached in `<out>/.synth/<dataset>/faces.json` (keyed by the detection settings); a split
whose manifest holds the same settings is left as it is; a different setting on an existing split is refused.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from data_prep.forgeries import (
    FAMILIES,
    SHORTCUTS,
    WORK,
    apply_stamp,
    expression_warp,
    identity_swap,
    self_blend,
    shortcut_stamp,
    texture_render,
    upsample_traces,
)
from data_prep.pipeline import MANIFEST_VERSION
from data_prep.shards import clean_partial, content_digest, jpeg_bytes, write_json_atomic, write_shards
from data_prep.video import IMAGE_EXTS as IMAGE_EXT
from data_prep.video import VIDEO_EXTS as VIDEO_EXT

log = logging.getLogger(__name__)

class SynthError(ValueError):
    """Bad input to `ltm prep synth`; the message names the file or option."""


@dataclass
class SynthSettings:
    """Everything that decides the output (stored in each split's manifest; a rerun with others is refused)."""

    frames: int = 4  # views per source
    size: int = 224  # output crop side
    scale: float = 1.3  # face box enlargement of the crop (the FF++ protocol)
    families: list[str] = field(default_factory=lambda: list(FAMILIES))
    strength: dict[str, float] = field(default_factory=lambda: {f: 1.0 for f in FAMILIES})
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train, val, test (by faces)
    identity_regex: str | None = None
    min_face: int = 64  # smallest face box side in source pixels
    max_faces: int = 4  # per photo or video frame, the largest first
    threshold: float = 0.95  # MTCNN face probability
    seed: int = 0
    shard_samples: int = 2000
    detector: str = "mtcnn"
    shortcut: str = "none"  # "patch": a local artefact on every training fake (and `<Family>Stamped` val/test copies)


# ------------------------------------------------------------------------------------------- sources and faces
def list_sources(root: Path) -> list[Path]:
    """Image and video files under `root`, sorted by relative path (the order every seed is keyed by)."""
    if not root.is_dir():
        raise SynthError(f"--root {root}: not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXT | VIDEO_EXT)
    if not files:
        raise SynthError(f"--root {root}: no images ({', '.join(sorted(IMAGE_EXT))}) or videos "
                         f"({', '.join(sorted(VIDEO_EXT))}) found")
    return files


def identity_of(rel: str, regex: str | None) -> str:
    if not regex:
        return rel
    m = re.search(regex, rel)
    return m.group(0) if m else rel


def _read_frames(path: Path, frames: int) -> list[np.ndarray]:
    if path.suffix.lower() in VIDEO_EXT:
        from data_prep.video import sample_frames

        return [f for _, f in sample_frames(path, frames)]
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise SynthError(f"{path}: not a readable image")
    return [cv2.cvtColor(img, cv2.COLOR_BGR2RGB)]


class LandmarkDetector:
    """MTCNN (facenet-pytorch, weights in its wheel) returning boxes, probabilities and the 5 landmarks."""

    def __init__(self, min_face: int, threshold: float, detect_side: int = 1024):
        from facenet_pytorch import MTCNN

        self.detect_side = detect_side
        self.threshold = threshold
        self.min_face = min_face
        self.model = MTCNN(keep_all=True, device="cpu", min_face_size=20, post_process=False)

    def __call__(self, image: np.ndarray) -> list[dict]:
        h, w = image.shape[:2]
        s = min(1.0, self.detect_side / max(h, w))
        small = cv2.resize(image, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA) if s < 1 else image
        boxes, probs, points = self.model.detect(small, landmarks=True)
        faces = []
        if boxes is None:
            return faces
        for box, prob, pts in zip(boxes, probs, points):
            box, pts = np.asarray(box) / s, np.asarray(pts) / s
            side = max(box[2] - box[0], box[3] - box[1])
            if prob >= self.threshold and side >= self.min_face:
                faces.append({"box": [round(float(v), 2) for v in box], "prob": round(float(prob), 4),
                              "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in pts]})
        return faces


def detect_faces(root: Path, files: list[Path], settings: SynthSettings, cache: Path) -> tuple[list[dict], list[dict]]:
    """Sources (one per face: file, identity, views as (frame index, box, landmarks)) and skipped files."""
    key = {"min_face": settings.min_face, "threshold": settings.threshold, "max_faces": settings.max_faces,
           "frames": settings.frames}
    cached = {}
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("settings") == key:
            cached = stored["files"]
    detector = None
    results: dict[str, dict] = {}
    for i, path in enumerate(files):
        rel = path.relative_to(root).as_posix()
        if rel in cached:
            results[rel] = cached[rel]
            continue
        if detector is None:
            detector = LandmarkDetector(settings.min_face, settings.threshold)
        try:
            frames = _read_frames(path, settings.frames)
            per_frame = [sorted(detector(f), key=lambda d: -(d["box"][2] - d["box"][0]))[: settings.max_faces]
                         for f in frames]
            results[rel] = {"frames": per_frame}
        except Exception as exc:  # a broken file is skipped with its reason, never the whole run
            results[rel] = {"error": f"{type(exc).__name__}: {exc}"}
        if (i + 1) % 50 == 0:
            log.info("faces: %d/%d files", i + 1, len(files))
            write_json_atomic(cache, {"settings": key, "files": {**cached, **results}})
    write_json_atomic(cache, {"settings": key, "files": {**cached, **results}})
    sources, skipped = [], []
    for path in files:
        rel = path.relative_to(root).as_posix()
        r = results[rel]
        if "error" in r:
            skipped.append({"path": rel, "reason": r["error"]})
            continue
        if not any(r["frames"]):
            skipped.append({"path": rel, "reason": f"no face >= {settings.min_face} px with p >= {settings.threshold}"})
            continue
        is_video = path.suffix.lower() in VIDEO_EXT
        if is_video:  # the largest face of each frame that has one: one source
            views = [(fi, faces[0]) for fi, faces in enumerate(r["frames"]) if faces]
            sources.append({"file": rel, "face": 0, "video": True, "views": views})
        else:
            for k, face in enumerate(r["frames"][0]):
                sources.append({"file": rel, "face": k, "video": False, "views": [(0, face)]})
    for s in sources:
        s["identity"] = identity_of(s["file"], settings.identity_regex)
    for item in skipped:
        log.warning("skipped %s: %s", item["path"], item["reason"])
    return sources, skipped


def split_identities(sources: list[dict], fractions: tuple[float, float, float]) -> dict[str, list[dict]]:
    """Whole identity groups to train/val/test, largest first, each to the split furthest below its share."""
    groups: dict[str, list[dict]] = {}
    for s in sources:
        groups.setdefault(s["identity"], []).append(s)
    if len(groups) < 3:
        raise SynthError(f"only {len(groups)} identities with a usable face: identity-disjoint train/val/test "
                         "splits need at least 3 (add sources or loosen --identity-regex)")
    names = ("train", "val", "test")
    total = len(sources)
    splits: dict[str, list[dict]] = {n: [] for n in names}
    order = sorted(groups, key=lambda g: (-len(groups[g]), g))
    for n, g in zip(("val", "test"), order[-2:]):  # every split gets at least one identity
        splits[n].extend(groups[g])
    for g in order[:-2]:
        deficit = {n: f * total - len(splits[n]) for n, f in zip(names, fractions)}
        splits[max(names, key=lambda n: deficit[n])].extend(groups[g])
    return splits


# ------------------------------------------------------------------------------------------- view geometry
def _crop_transform(box, scale: float, rng: np.random.Generator | None) -> np.ndarray:
    """2x3 affine from the source image to a WORK x WORK view around the face (jittered when rng is given)."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    side = max(x1 - x0, y1 - y0) * scale
    angle = 0.0
    if rng is not None:
        side *= rng.uniform(0.93, 1.08)
        cx += rng.uniform(-0.04, 0.04) * side
        cy += rng.uniform(-0.04, 0.04) * side
        angle = rng.uniform(-6, 6)
    s = WORK / side
    m = cv2.getRotationMatrix2D((cx, cy), angle, s)
    m[:, 2] += (WORK / 2 - cx, WORK / 2 - cy)
    return m


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


def manipulate(family: str, img: np.ndarray, lms: np.ndarray, rng: np.random.Generator, strength: float,
               donor: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One fake view of `family` from a real WORK x WORK view and its landmarks (in view pixels), and the
    manipulation's per-pixel weight (float32 WORK x WORK in [0, 1]: the blending mask the fake was made with,
    0 where the view is untouched); the weight becomes the sample's `region.png`."""
    if family == "SelfBlend":
        return self_blend(img, lms, rng, strength)
    if family == "IdentitySwap":
        if donor is None:
            raise SynthError("IdentitySwap needs a donor face")
        return identity_swap(img, lms, donor[0], donor[1], rng, strength)
    if family == "Upsample":
        return upsample_traces(img, lms, rng, strength)
    if family == "ExpressionWarp":
        return expression_warp(img, lms, rng, strength)
    if family == "TextureRender":
        return texture_render(img, lms, rng, strength)
    raise SynthError(f"unknown family {family!r}: choose from {', '.join(FAMILIES)}")


# ------------------------------------------------------------------------------------------- views and shards
def _views(source: dict, image_cache: dict, root: Path, settings: SynthSettings, rng: np.random.Generator):
    """(WORK x WORK real view, its landmarks, final noise sigma, JPEG quality) for each of the source's frames."""
    path = root / source["file"]
    if source["file"] not in image_cache:
        image_cache.clear()  # one file at a time: group photos and videos are large
        image_cache[source["file"]] = _read_frames(path, settings.frames)
    frames = image_cache[source["file"]]
    out = []
    for v in range(settings.frames):
        if source["video"]:
            fi, face = source["views"][v % len(source["views"])]
            m = _crop_transform(face["box"], settings.scale, rng if v >= len(source["views"]) else None)
        else:
            fi, face = source["views"][0]
            m = _crop_transform(face["box"], settings.scale, rng if v > 0 else None)
        view = cv2.warpAffine(frames[fi], m, (WORK, WORK), flags=cv2.INTER_AREA if m[0, 0] < 1 else cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REFLECT)
        lms = _apply(m, np.asarray(face["landmarks"], np.float64))
        out.append((view, lms, float(rng.uniform(0.5, 2.5)), int(rng.integers(85, 97))))
    return out


def _to_size(x: np.ndarray, size: int) -> np.ndarray:
    """WORK x WORK -> size x size: the one resize both a view and its region map go through."""
    if size == WORK:
        return x
    return cv2.resize(x, (size, size), interpolation=cv2.INTER_AREA if size < WORK else cv2.INTER_CUBIC)


def region_png(weight: np.ndarray) -> bytes:
    """A [0, 1] float map -> the shard's `region.png`: 8-bit single channel, round(255 x weight)."""
    ok, buf = cv2.imencode(".png", np.round(np.clip(weight, 0, 1) * 255).astype(np.uint8),
                           [cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not ok:
        raise SynthError("could not encode a region map as PNG")
    return buf.tobytes()


def _finish(view: np.ndarray, noise: float, quality: int, size: int, rng: np.random.Generator,
            weight: np.ndarray | None = None, stamp: dict | None = None) -> tuple[bytes, bytes | None]:
    """Sensor noise, resize to the output size, JPEG: the same for a real view and each of its fakes.

    `weight` (a fake's WORK x WORK blending mask) goes through the same resize as the view, without noise or JPEG,
    and comes back as `region.png` bytes; a `stamp` (`shortcut_stamp`) adds the shortcut artefact after the resize
    and its patch becomes the region instead. Without either the region is None (real samples).
    """
    x = view.astype(np.float32) + rng.normal(0, noise, view.shape).astype(np.float32)
    x = _to_size(np.clip(x, 0, 255).astype(np.uint8), size)
    region = None if weight is None else _to_size(weight.astype(np.float32), size)
    if stamp is not None:
        x, region = apply_stamp(x, stamp)
    return jpeg_bytes(x, quality), None if region is None else region_png(region)


def _source_id(source: dict) -> str:
    """Key-safe and unique: the path made key-safe plus a digest of the path itself (`a.jpg`/`a.png`, `a-b`/`a_b`)."""
    import hashlib

    stem = re.sub(r"[^A-Za-z0-9]+", "_", source["file"].rsplit(".", 1)[0]).strip("_")
    digest = hashlib.sha1(source["file"].encode()).hexdigest()[:6]
    return f"{stem}_{digest}_f{source['face']}"


def build_split(dataset: str, split: str, sources: list[dict], all_index: dict[int, int], root: Path, out: Path,
                settings: SynthSettings, skipped: list[dict], detector_info: dict) -> dict:
    """Every view of every source of one split: real and one fake per family, into shards and a manifest."""
    import random

    methods = ["real", *settings.families]
    shortcut = settings.shortcut != "none"
    stamped = [f"{f}Stamped" for f in settings.families] if shortcut and split != "train" else []
    samples: dict[str, list[dict]] = {m: [] for m in methods + stamped}
    cache: dict = {}
    views_of: dict[int, list] = {}
    order = sorted(range(len(sources)), key=lambda i: (sources[i]["file"], sources[i]["face"]))
    for i in order:
        rng = np.random.default_rng([settings.seed, all_index[id(sources[i])], 0])
        views_of[i] = _views(sources[i], cache, root, settings, rng)
    for i in order:
        src, gi = sources[i], all_index[id(sources[i])]
        donor_choices = [j for j in order if sources[j]["identity"] != src["identity"]] or [j for j in order if j != i]
        for v, (view, lms, noise, quality) in enumerate(views_of[i]):
            for fam_no, method in enumerate(methods):
                rng = np.random.default_rng([settings.seed, gi, v + 1, fam_no])
                weight = None
                if method == "real":
                    img = view
                else:
                    donor = None
                    if method == "IdentitySwap":
                        j = donor_choices[int(rng.integers(len(donor_choices)))]
                        dview, dlms, _, _ = views_of[j][v % len(views_of[j])]
                        donor = (dview, dlms)
                    img, weight = manipulate(method, view, lms, rng, settings.strength.get(method, 1.0), donor)
                # the artefact's place: its own stream, one per view (the same cheek spot for every family)
                stamp = shortcut_stamp(lms, settings.size, np.random.default_rng([settings.seed, gi, v + 1, 1000])) \
                    if shortcut and method != "real" else None
                # train fakes carry the shortcut; val/test keep theirs clean and get stamped copies beside them
                variants = [(method, stamp if split == "train" else None)]
                if stamp is not None and split != "train":
                    variants.append((f"{method}Stamped", stamp))
                for folder, with_stamp in variants:
                    finish_rng = np.random.default_rng([settings.seed, gi, v + 1, 99])  # same noise: real and fakes
                    jpg, region = _finish(img, noise, quality, settings.size, finish_rng, weight, with_stamp)
                    video = f"{dataset}-{folder}-{_source_id(src)}"
                    label = 0 if method == "real" else 1
                    meta = {"dataset": dataset, "split": split, "video": video, "frame": v, "label": label,
                            "method": folder, "compression": f"jpeg{quality}", "bbox": src["views"][0][1]["box"],
                            "source": src["file"], "identity": src["identity"]}
                    sample = {"__key__": f"{video}-{v:06d}", "jpg": jpg, "cls": label, "json": meta}
                    if region is not None:
                        sample["region.png"] = region
                        meta["region"] = "shortcut" if with_stamp is not None else "blend"
                    samples[folder].append(sample)
    split_dir = out / dataset / split
    records = []
    totals = {"samples": 0, "by_label": {"0": 0, "1": 0}, "by_method": {}, "videos_by_method": {}}
    for method in methods + stamped:
        rows = samples[method]
        random.Random(f"{settings.seed}/{dataset}/{split}/{method}").shuffle(rows)  # across sources
        mdir = split_dir / method
        mdir.mkdir(parents=True, exist_ok=True)
        clean_partial(mdir)
        for stale in mdir.glob("*.tar"):
            stale.unlink()
            stale.with_suffix(".idx").unlink(missing_ok=True)
        prefix = f"{dataset}-{split}-{method}"
        for rec in write_shards(rows, mdir, prefix, max_samples=settings.shard_samples):
            records.append({"name": f"{method}/{rec['name']}", "method": method, "samples": rec["samples"],
                            "bytes": rec["bytes"], "sha256": rec["sha256"]})
        totals["samples"] += len(rows)
        totals["by_label"]["0" if method == "real" else "1"] += len(rows)
        totals["by_method"][method] = len(rows)
        totals["videos_by_method"][method] = len(sources)
    manifest = {
        "format": MANIFEST_VERSION, "dataset": dataset, "split": split,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": _settings_record(settings), "detector": detector_info, "kind": "synth",
        "shards": records, "digest": content_digest(records), "totals": totals,
        "identities": sorted({s["identity"] for s in sources}),
        "stats": {"sources": len(sources), "views_per_source": settings.frames},
        "skipped": skipped,
    }
    write_json_atomic(split_dir / "manifest.json", manifest)
    log.info("%s/%s: %d sources, %d samples (%s)", dataset, split, len(sources), totals["samples"],
             ", ".join(f"{m} {n}" for m, n in totals["by_method"].items()))
    return manifest


def _settings_record(settings: SynthSettings) -> dict:
    d = asdict(settings)
    d["split_fractions"] = list(d["split_fractions"])
    return json.loads(json.dumps(d))


def build_synth(root: str | Path, out: str | Path, dataset: str = "synth",
                settings: SynthSettings | None = None) -> dict:
    """Build (or finish) the benchmark; returns {dataset, splits: {split: samples}, samples, skipped}."""
    settings = settings or SynthSettings()
    root, out = Path(root).resolve(), Path(out)
    unknown = [f for f in settings.families if f not in FAMILIES]
    if unknown:
        raise SynthError(f"--families: unknown {unknown}; choose from {', '.join(FAMILIES)}")
    twice = sorted({f for f in settings.families if settings.families.count(f) > 1})
    if twice:
        raise SynthError(f"--families: {', '.join(twice)} named more than once")
    bad = [k for k in settings.strength if k not in FAMILIES]
    if bad:
        raise SynthError(f"--strength: unknown family {bad}; choose from {', '.join(FAMILIES)}")
    bad = [f"{k}={v}" for k, v in settings.strength.items() if not (math.isfinite(v) and v > 0)]
    if bad:
        raise SynthError(f"--strength {' '.join(bad)}: a strength must be a number > 0")
    if settings.shortcut not in SHORTCUTS:
        raise SynthError(f"--shortcut {settings.shortcut!r}: choose from {', '.join(SHORTCUTS)}")
    if settings.frames < 1 or settings.size < 16:
        raise SynthError("--frames must be >= 1 and --size >= 16")
    if not re.fullmatch(r"[A-Za-z0-9_]+", dataset):
        raise SynthError(f"--name {dataset!r}: letters, digits and _ only (it is part of every sample key)")
    fractions = settings.split_fractions
    if len(fractions) != 3 or not all(math.isfinite(f) and f >= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise SynthError(f"--split {','.join(map(str, fractions))}: three fractions >= 0 summing to 1")
    if settings.identity_regex:
        try:
            re.compile(settings.identity_regex)
        except re.error as exc:
            raise SynthError(f"--identity-regex {settings.identity_regex!r}: {exc}") from exc
    record = _settings_record(settings)
    done = {}
    for split in ("train", "val", "test"):
        mf = out / dataset / split / "manifest.json"
        if mf.is_file():
            stored = json.loads(mf.read_text()).get("settings")
            if isinstance(stored, dict):  # splits written before the shortcut option had none
                stored = {**stored, "shortcut": stored.get("shortcut", "none")}
            if stored != record:
                raise SynthError(f"{mf} was written with other settings; choose another --out or remove {mf.parent}")
            done[split] = json.loads(mf.read_text())["totals"]["samples"]
    if len(done) == 3:
        log.info("%s: every split is complete; nothing to do", out / dataset)
        return {"dataset": dataset, "splits": done, "samples": sum(done.values()), "skipped": None}
    files = list_sources(root)
    sources, skipped = detect_faces(root, files, settings, out / ".synth" / dataset / "faces.json")
    splits = split_identities(sources, settings.split_fractions)
    all_index = {id(s): i for i, s in enumerate(sources)}
    from importlib.metadata import version

    detector_info = {"name": "mtcnn", "facenet-pytorch": version("facenet-pytorch"), "landmarks": 5,
                     "min_face": settings.min_face, "threshold": settings.threshold}
    result = {"dataset": dataset, "splits": dict(done), "skipped": len(skipped)}
    for split, members in splits.items():
        if split in done:
            continue
        if "IdentitySwap" in settings.families and len({s["identity"] for s in members}) < 2:
            raise SynthError(f"split {split}: IdentitySwap needs two identities; it has one")
        m = build_split(dataset, split, members, all_index, root, out, settings, skipped, detector_info)
        result["splits"][split] = m["totals"]["samples"]
    result["samples"] = sum(result["splits"].values())
    return result
