"""Dataset adapters: each turns a dataset root into a list of `Item`s (one per video / frame sequence / image) plus
the inputs it had to skip, with the reason.

    ffpp(root, splits_dir, compression="c23", methods=None) -> (dataset name, items, skipped)
    celebdf(root) -> ...
    wdf(root, work_dir) -> ...          (.tar.gz archives are extracted safely into work_dir)
    folder(root, split, name) -> ...    (<real|fake>/... tree of videos and images)
    csv_list(path, root, split, name) -> ...   (CSV: path,label[,method,split,video])

An adapter raises `LayoutError` (a ValueError naming the expected folder or file) when the root does not have the
dataset's layout at all; single bad entries become skipped records instead.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import tarfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from data_prep.video import IMAGE_EXTS, VIDEO_EXTS

log = logging.getLogger(__name__)

FFPP_METHODS = ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures", "FaceShifter")
SPLITS = ("train", "val", "test")
FFPP_SPLITS_URL = "https://github.com/ondyari/FaceForensics/tree/master/dataset/splits"


class LayoutError(ValueError):
    """The root does not look like the dataset it was given as."""


@dataclass
class Item:
    video: str  # key-safe id, unique within (split, method)
    path: str  # video file, image file, or a folder of frames
    kind: str  # video | image | frames
    label: int  # 1 = fake, 0 = real
    method: str  # real | Deepfakes | ... | fake
    split: str
    source: str  # path relative to the dataset root, for the metadata
    files: list[str] | None = None  # kind "frames" given as an explicit list of image files (CSV rows of one video)
    # where a fake's manipulated region can come from (FF++; `Settings.regions`): the dataset's mask video of this
    # fake, and the original video it was made from (same frames, the face replaced or re-rendered)
    mask: str | None = None
    original: str | None = None
    # dataset-specific labels carried into every sample's json (a distortion, a 16-class label, the original's id)
    extra: dict | None = None
    # which face of a frame is the sample: "largest", or "mask" (the face under the forgery mask; data_prep.protocol)
    face_rule: str = "largest"

    def to_dict(self) -> dict:
        return asdict(self)


def key_safe(name: str) -> str:
    """A video id usable inside a WebDataset key: only [A-Za-z0-9_]."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def skip(path, reason: str, **extra) -> dict:
    log.warning("skipping %s: %s", path, reason)
    return {"path": str(path), "reason": reason, **extra}


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise LayoutError(f"{what}: expected folder {path} does not exist")


def _present_folders(root: Path, folders: Iterable[str], dataset: str, kind: str) -> list[str]:
    """The named folders that exist under root, in the given order; a LayoutError naming them all when none does."""
    folders = list(folders)
    present = [f for f in folders if (root / f).is_dir()]
    if not present:
        raise LayoutError(f"{dataset}: none of the {kind} {sorted(folders)} exist under {root}")
    return present


# ---------------------------------------------------------------- FaceForensics++
def read_ffpp_splits(splits_dir: str | Path) -> dict[str, list[tuple[str, str]]]:
    splits_dir = Path(splits_dir)
    out = {}
    for split in SPLITS:
        f = splits_dir / f"{split}.json"
        if not f.is_file():
            raise LayoutError(f"FF++ split file {f} not found (the official train/val/test.json come from "
                              f"{FFPP_SPLITS_URL})")
        try:
            pairs = json.loads(f.read_text())
        except json.JSONDecodeError as exc:
            raise LayoutError(f"FF++ split file {f}: not valid JSON ({exc})") from exc
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise LayoutError(f"FF++ split file {f}: expected a list of [target, source] id pairs")
        out[split] = [(str(a), str(b)) for a, b in pairs]
    return out


def ffpp(root: str | Path, splits_dir: str | Path | None, compression: str = "c23",
         methods: list[str] | None = None, splits: list[str] | None = None) -> tuple[str, list[Item], list[dict]]:
    root = Path(root)
    _require_dir(root, "FF++ root")
    if splits_dir is None:
        raise LayoutError(f"FF++ needs --splits DIR with train.json/val.json/test.json (get them from "
                          f"{FFPP_SPLITS_URL})")
    real_dir = root / "original_sequences" / "youtube" / compression / "videos"
    _require_dir(real_dir, f"FF++ real videos at compression {compression}")
    if methods:
        for m in methods:
            _require_dir(root / "manipulated_sequences" / m / compression / "videos", f"FF++ method {m}")
    else:
        methods = sorted(p.name for p in (root / "manipulated_sequences").glob("*")
                         if (p / compression / "videos").is_dir())
        if not methods:
            raise LayoutError(f"FF++: no manipulated_sequences/<method>/{compression}/videos folder under {root}")
    pairs = read_ffpp_splits(splits_dir)
    dataset = f"ffpp_{compression}"
    items: list[Item] = []
    skipped: list[dict] = []
    absent: list[dict] = []
    for split in splits or SPLITS:
        reals = sorted({v for p in pairs[split] for v in p})
        for vid in reals:
            path = real_dir / f"{vid}.mp4"
            rec = (split, "real", vid, path)
            if path.is_file():
                items.append(Item(key_safe(vid), str(path), "video", 0, "real", split, str(path.relative_to(root))))
            else:
                absent.append({"path": str(path), "split": split, "method": rec[1], "video": vid})
        for method in methods:
            mdir = root / "manipulated_sequences" / method / compression / "videos"
            for a, b in pairs[split]:
                for vid in (f"{a}_{b}", f"{b}_{a}"):
                    path = mdir / f"{vid}.mp4"
                    if path.is_file():
                        mask = root / "manipulated_sequences" / method / "masks" / "videos" / f"{vid}.mp4"
                        original = real_dir / f"{vid.split('_')[0]}.mp4"  # <target>_<source>: target's video
                        items.append(Item(key_safe(vid), str(path), "video", 1, method, split,
                                          str(path.relative_to(root)), mask=str(mask) if mask.is_file() else None,
                                          original=str(original) if original.is_file() else None))
                    else:
                        absent.append({"path": str(path), "split": split, "method": method, "video": vid})
    for a in absent:
        skipped.append({**a, "reason": f"listed in {a['split']}.json but absent"})
    if absent:
        log.warning("FF++: %d videos named by the split files are absent (e.g. %s); recorded in the manifest",
                    len(absent), absent[0]["path"])
    return dataset, items, skipped


# ---------------------------------------------------------------- Celeb-DF v2
CELEBDF_FOLDERS = {"Celeb-real": (0, "real"), "YouTube-real": (0, "real"), "Celeb-synthesis": (1, "fake")}


def celebdf(root: str | Path) -> tuple[str, list[Item], list[dict]]:
    """Celeb-DF v2: test = List_of_testing_videos.txt (label 1 there means REAL: inverted here), train = the rest."""
    root = Path(root)
    _require_dir(root, "Celeb-DF v2 root")
    for name in CELEBDF_FOLDERS:
        _require_dir(root / name, "Celeb-DF v2")
    listing = root / "List_of_testing_videos.txt"
    if not listing.is_file():
        raise LayoutError(f"Celeb-DF v2: expected file {listing} does not exist")
    skipped: list[dict] = []
    test: dict[str, int] = {}
    for n, line in enumerate(listing.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in ("0", "1"):
            skipped.append(skip(f"{listing}:{n}", f"malformed line {line!r} (expected '<0|1> <folder>/<name>.mp4')"))
            continue
        test[parts[1]] = 1 - int(parts[0])  # the list says 1 = real; the project says 1 = fake
    items: list[Item] = []
    seen: set[str] = set()
    for folder, (label, method) in CELEBDF_FOLDERS.items():
        for path in sorted((root / folder).glob("*.mp4")):
            rel = f"{folder}/{path.name}"
            split = "test" if rel in test else "train"
            if rel in test and test[rel] != label:
                skipped.append(skip(path, f"List_of_testing_videos.txt labels it {'fake' if test[rel] else 'real'} "
                                          f"but it lies in {folder}"))
                continue
            items.append(Item(key_safe(path.stem), str(path), "video", label, method, split, rel))
            seen.add(rel)
    for rel in test:
        if rel not in seen and not any(s["path"].endswith(rel) for s in skipped):
            skipped.append(skip(root / rel, "listed in List_of_testing_videos.txt but absent", split="test"))
    return "celebdf_v2", items, skipped


# ---------------------------------------------------------------- WildDeepfake
WDF_FOLDERS = {"real_train": (0, "real", "train"), "fake_train": (1, "fake", "train"),
               "real_test": (0, "real", "test"), "fake_test": (1, "fake", "test")}


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar(.gz) into `dest`, refusing the whole archive if any member is a link, a device, an absolute
    path or a path that leaves `dest`."""
    dest = dest.resolve()
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for m in members:
            target = (dest / m.name).resolve()
            if m.name.startswith("/") or Path(m.name).is_absolute():
                raise ValueError(f"{archive}: member {m.name!r} has an absolute path; archive refused")
            if m.issym() or m.islnk():
                raise ValueError(f"{archive}: member {m.name!r} is a link; archive refused")
            if not (m.isfile() or m.isdir()):
                raise ValueError(f"{archive}: member {m.name!r} is not a regular file; archive refused")
            if target != dest and dest not in target.parents:
                raise ValueError(f"{archive}: member {m.name!r} would be written outside {dest}; archive refused")
        # a temp folder per process (array tasks may list the same archives at once), renamed when complete
        tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        extract_kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp, members=members, **extract_kw)
        try:
            tmp.replace(dest)
        except OSError:
            if not dest.is_dir():
                raise
            shutil.rmtree(tmp)  # another process finished the same archive first


def _frame_folders(top: Path) -> list[Path]:
    """Folders that directly hold image files (one per frame sequence)."""
    found = set()
    for p in top.rglob("*"):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            found.add(p.parent)
    return sorted(found)


def wdf(root: str | Path, work_dir: str | Path) -> tuple[str, list[Item], list[dict]]:
    """WildDeepfake: real/fake x train/test folders of frame sequences or .tar.gz archives of them (no val)."""
    root = Path(root)
    _require_dir(root, "WildDeepfake root")
    present = _present_folders(root, WDF_FOLDERS, "WildDeepfake", "expected folders")
    items: list[Item] = []
    skipped: list[dict] = []
    for folder in present:
        label, method, split = WDF_FOLDERS[folder]
        tops: list[tuple[Path, str]] = []
        for entry in sorted((root / folder).iterdir()):
            if entry.is_dir():
                tops.append((entry, entry.name))
            elif entry.name.endswith((".tar.gz", ".tgz", ".tar")):
                stem = entry.name.split(".")[0]
                dest = Path(work_dir) / "extract" / folder / key_safe(stem)
                if not dest.is_dir():
                    try:
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        safe_extract(entry, dest)
                    except (ValueError, tarfile.TarError, OSError, EOFError) as exc:
                        skipped.append(skip(entry, str(exc), split=split, method=method))
                        continue
                tops.append((dest, stem))
        for top, stem in tops:
            for seq in _frame_folders(top):
                rel = seq.relative_to(top)
                vid = key_safe(f"{stem}_{rel}" if str(rel) != "." else stem)
                items.append(Item(vid, str(seq), "frames", label, method, split, f"{folder}/{stem}/{rel}"))
    return "wdf", items, skipped


# ---------------------------------------------------------------- generic folder / CSV
def _media_kind(path: Path) -> str | None:
    ext = path.suffix.lower()
    return "video" if ext in VIDEO_EXTS else "image" if ext in IMAGE_EXTS else None


def folder(root: str | Path, split: str = "test", name: str | None = None) -> tuple[str, list[Item], list[dict]]:
    """A tree `<root>/<real|fake>/...` of videos and images; `fake/<Method>/...` names the method."""
    root = Path(root)
    _require_dir(root, "folder root")
    if not (root / "real").is_dir() and not (root / "fake").is_dir():
        raise LayoutError(f"folder dataset: expected {root}/real and/or {root}/fake")
    items: list[Item] = []
    skipped: list[dict] = []
    for top, label in (("real", 0), ("fake", 1)):
        if not (root / top).is_dir():
            continue
        for path in sorted((root / top).rglob("*")):
            if not path.is_file():
                continue
            kind = _media_kind(path)
            rel = path.relative_to(root)
            if kind is None:
                skipped.append(skip(path, "not a video or image file", split=split))
                continue
            parts = rel.parts
            method = "real" if label == 0 else (key_safe(parts[1]) if len(parts) > 2 else "fake")
            vid = key_safe(str(Path(*parts[1:]).with_suffix("")))
            items.append(Item(vid, str(path), kind, label, method, split, str(rel)))
    return key_safe(name or root.name), items, skipped


def csv_list(path: str | Path, root: str | Path | None = None, split: str = "test",
             name: str | None = None) -> tuple[str, list[Item], list[dict]]:
    """A CSV with header `path,label[,method,split,video]`; label 0/1 or real/fake; paths relative to `root`
    (default: the CSV's folder)."""
    path = Path(path)
    if not path.is_file():
        raise LayoutError(f"CSV list {path} not found")
    base = Path(root) if root else path.parent
    items: list[Item] = []
    skipped: list[dict] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise LayoutError(f"{path}: the header must name at least the columns path,label")
        for n, row in enumerate(reader, 2):
            where = f"{path}:{n}"
            lab = (row.get("label") or "").strip().lower()
            if lab not in ("0", "1", "real", "fake"):
                skipped.append(skip(where, f"label {row.get('label')!r} is not 0/1/real/fake"))
                continue
            label = 1 if lab in ("1", "fake") else 0
            media = base / row["path"]
            kind = "frames" if media.is_dir() else _media_kind(media)
            if not media.exists():
                skipped.append(skip(media, f"file named on {where} does not exist", split=row.get("split") or split))
                continue
            if kind is None:
                skipped.append(skip(media, f"{where}: not a video, image or frame folder"))
                continue
            method = key_safe(row.get("method") or ("real" if label == 0 else "fake"))
            vid = key_safe(row.get("video") or str(Path(row["path"]).with_suffix("")))
            items.append(Item(vid, str(media), kind, label, method, row.get("split") or split, row["path"]))
    # image rows that share a video id form one frame sequence (frames in CSV order)
    grouped: dict[tuple, Item] = {}
    out: list[Item] = []
    for it in items:
        k = (it.split, it.method, it.video)
        if it.kind == "image" and k in grouped:
            g = grouped[k]
            if g.kind == "image":
                g.kind, g.files = "frames", [g.path]
            g.files.append(it.path)
        elif k in grouped:
            skipped.append(skip(it.path, f"video id {it.video!r} of {it.split}/{it.method} already used"))
        else:
            grouped[k] = it
            out.append(it)
    items = out
    return key_safe(name or path.stem), items, skipped
