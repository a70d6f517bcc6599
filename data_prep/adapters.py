"""Adapters for the cross-dataset benchmarks, each from the dataset's own download layout and label files
(docs/datasets.md has one section per dataset). Every adapter returns (dataset name, items, skipped) like the
ones in `data_prep.datasets`, raises `LayoutError` naming the folder or file when the root is not the dataset, and
turns single bad entries (a missing label, an unknown split, a listed file that is absent) into skipped records.

    dfdc(root, test_labels=None)            DFDC: dfdc_train_part_*/metadata.json + the public test set's labels.csv
    dfdc_preview(root)                      DFDC-Preview: dataset.json
    faceshifter(root, splits_dir, compression)      FF++ layout, manipulated_sequences/FaceShifter
    dfd(root, compression, split)           DeepFakeDetection: actors' originals, forged face picked by its mask
    deeperforensics(root, real, ffpp_root, compression)   manipulated_videos/<variant>, lists/splits, distortions
    celebdf_v1(root)                        Celeb-DF v1 (the v2 layout and label convention)
    uadfv(root, rule)                       UADFV: real/, fake/; no official split
    df40(root, lists, keep_crops)           DF40: per-method frame folders and JSON lists
    forgerynet(root)                        ForgeryNet: image_list.txt / video_list.txt per split folder
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from pathlib import Path

from data_prep.datasets import (
    SPLITS,
    Item,
    LayoutError,
    _present_folders,
    _require_dir,
    celebdf,
    ffpp,
    key_safe,
    skip,
)
from data_prep.video import VIDEO_EXTS

log = logging.getLogger(__name__)

ADAPTERS = ("dfdc", "dfdcp", "faceshifter", "dfd", "deeperforensics", "celebdf1", "uadfv", "df40", "forgerynet")


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LayoutError(f"{what} {path}: not valid JSON ({exc})") from exc


# ---------------------------------------------------------------- DFDC
DFDC_LABELS = {"FAKE": 1, "REAL": 0}


def dfdc_parts(root: Path) -> list[Path]:
    """The `dfdc_train_part_N` folders in numeric order (part 10 after part 9)."""
    parts = [p for p in root.glob("dfdc_train_part_*") if p.is_dir()]
    return sorted(parts, key=lambda p: (int(m.group(1)) if (m := re.search(r"(\d+)$", p.name)) else 1 << 30, p.name))


def _dfdc_test_videos(labels: Path) -> Path:
    """The folder of the public test set's videos: beside labels.csv, or its `videos/` subfolder."""
    sub = labels.parent / "videos"
    return sub if sub.is_dir() else labels.parent


def dfdc(root: str | Path, test_labels: str | Path | None = None) -> tuple[str, list[Item], list[dict]]:
    """DFDC: every `dfdc_train_part_N/metadata.json` under `root` (label FAKE/REAL, split, original) and the public
    test set's `labels.csv` (filename,label; 1 = fake), default `<root>/test/labels.csv` when present.

    A fake's `original` names the real video it was made from: it becomes `Item.original` (the pair gives the
    fake a region map from the difference, as in FF++) and the `original` field of its samples' json."""
    root = Path(root)
    _require_dir(root, "DFDC root")
    parts = dfdc_parts(root)
    labels = Path(test_labels) if test_labels else root / "test" / "labels.csv"
    if test_labels and not labels.is_file():
        raise LayoutError(f"DFDC: test label file {labels} does not exist")
    if not parts and not labels.is_file():
        raise LayoutError(f"DFDC: no dfdc_train_part_N/ folder and no test/labels.csv under {root}")
    items: list[Item] = []
    skipped: list[dict] = []
    seen: dict[str, str] = {}
    for part in parts:
        meta_file = part / "metadata.json"
        if not meta_file.is_file():
            skipped.append(skip(meta_file, "part without metadata.json: its videos have no labels", split="train"))
            continue
        meta = _read_json(meta_file, "DFDC metadata")
        if not isinstance(meta, dict):
            raise LayoutError(f"DFDC metadata {meta_file}: expected an object keyed by file name")
        for name in sorted(meta):
            entry = meta[name]
            where = f"{meta_file} key {name!r}"
            path = part / name
            label = DFDC_LABELS.get(str(entry.get("label", "")).upper()) if isinstance(entry, dict) else None
            split = str(entry.get("split", "train")) if isinstance(entry, dict) else "train"
            if label is None:
                got = entry.get("label") if isinstance(entry, dict) else entry
                skipped.append(skip(path, f"{where}: field 'label' is {got!r}, expected FAKE or REAL", split=split))
                continue
            if split not in SPLITS:
                skipped.append(skip(path, f"{where}: field 'split' is {split!r}, expected one of {SPLITS}",
                                    split="train"))
                continue
            if not path.is_file():
                skipped.append(skip(path, f"listed in {meta_file} but absent", split=split))
                continue
            vid = key_safe(Path(name).stem)
            if vid in seen:
                skipped.append(skip(path, f"video id {vid!r} already used by {seen[vid]}", split=split))
                continue
            seen[vid] = str(path)
            original = entry.get("original") if label else None
            orig_path = part / original if original else None
            extra = {"original": Path(original).stem, "dfdc_part": part.name} if original else {"dfdc_part": part.name}
            items.append(Item(vid, str(path), "video", label, "fake" if label else "real", split,
                              str(path.relative_to(root)), extra=extra,
                              original=str(orig_path) if orig_path is not None and orig_path.is_file() else None))
    if labels.is_file():
        items_t, skipped_t = _dfdc_test(labels, root, seen)
        items += items_t
        skipped += skipped_t
    return "dfdc", items, skipped


def _dfdc_test(labels: Path, root: Path, seen: dict[str, str]) -> tuple[list[Item], list[dict]]:
    videos = _dfdc_test_videos(labels)
    items, skipped = [], []
    with open(labels, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"filename", "label"} <= set(reader.fieldnames):
            raise LayoutError(f"DFDC test labels {labels}: the header must name the columns filename,label")
        for n, row in enumerate(reader, 2):
            name = (row.get("filename") or "").strip()
            lab = (row.get("label") or "").strip()
            path = videos / name
            if lab not in ("0", "1"):
                skipped.append(skip(path, f"{labels}:{n}: label {row.get('label')!r} is not 0 or 1", split="test"))
                continue
            if not name or not path.is_file():
                skipped.append(skip(path, f"listed on {labels}:{n} but absent", split="test"))
                continue
            vid = key_safe(Path(name).stem)
            if vid in seen:
                skipped.append(skip(path, f"video id {vid!r} already used by {seen[vid]}", split="test"))
                continue
            seen[vid] = str(path)
            label = int(lab)  # labels.csv: 1 = fake, as in the project
            rel = path.relative_to(root) if root in path.parents else path
            items.append(Item(vid, str(path), "video", label, "fake" if label else "real", "test", str(rel)))
    listed = {it.path for it in items} | {s["path"] for s in skipped}
    for p in sorted(videos.glob("*.mp4")):
        if str(p) not in listed:
            skipped.append(skip(p, f"no label: not listed in {labels}", split="test"))
    return items, skipped


# ---------------------------------------------------------------- DFDC-Preview
DFDCP_SETS = {"train": "train", "test": "test", "val": "val"}


def dfdc_preview(root: str | Path) -> tuple[str, list[Item], list[dict]]:
    """DFDC-Preview: `dataset.json` maps paths under method_A/, method_B/ and original_videos/ to {"label": "fake" |
    "real", "set": "train" | "test"}; the top folder is the method (original_videos -> real)."""
    root = Path(root)
    _require_dir(root, "DFDC-Preview root")
    listing = root / "dataset.json"
    if not listing.is_file():
        raise LayoutError(f"DFDC-Preview: expected file {listing} does not exist")
    data = _read_json(listing, "DFDC-Preview list")
    if not isinstance(data, dict):
        raise LayoutError(f"DFDC-Preview list {listing}: expected an object keyed by video path")
    items: list[Item] = []
    skipped: list[dict] = []
    for rel in sorted(data):
        entry = data[rel] if isinstance(data[rel], dict) else {}
        path = root / rel
        top = Path(rel).parts[0]
        split = DFDCP_SETS.get(str(entry.get("set", "")).lower())
        lab = str(entry.get("label", "")).lower()
        where = f"{listing} key {rel!r}"
        if split is None:
            skipped.append(skip(path, f"{where}: field 'set' is {entry.get('set')!r}, expected train or test"))
            continue
        if lab not in ("fake", "real"):
            skipped.append(skip(path, f"{where}: field 'label' is {entry.get('label')!r}, expected fake or real",
                                split=split))
            continue
        label = 1 if lab == "fake" else 0
        if (top == "original_videos") == bool(label):
            skipped.append(skip(path, f"{where}: labelled {lab} but it lies in {top}/", split=split))
            continue
        if not path.is_file():
            skipped.append(skip(path, f"listed in {listing} but absent", split=split))
            continue
        method = "real" if label == 0 else key_safe(top)
        vid = key_safe(str(Path(*Path(rel).parts[1:]).with_suffix("")))
        items.append(Item(vid, str(path), "video", label, method, split, rel))
    return "dfdcp", items, skipped


# ---------------------------------------------------------------- FaceShifter (FF++ layout)
def faceshifter(root: str | Path, splits_dir: str | Path | None, compression: str = "c23",
                splits: list[str] | None = None) -> tuple[str, list[Item], list[dict]]:
    """FaceShifter as released with FF++: `manipulated_sequences/FaceShifter/<c>/videos`, FF++'s official pairs and
    splits, FF++'s youtube originals as the real class."""
    _, items, skipped = ffpp(root, splits_dir, compression, ["FaceShifter"], splits)
    return f"faceshifter_{compression}", items, skipped


# ---------------------------------------------------------------- DeepFakeDetection
DFD_NAME = re.compile(r"^(\d+)_(\d+)__(.+?)__([A-Z0-9]+)$")


def dfd(root: str | Path, compression: str = "c23", split: str = "test") -> tuple[str, list[Item], list[dict]]:
    """DeepFakeDetection in the FF++ layout: reals `original_sequences/actors/<c>/videos/<actor>__<scene>.mp4`,
    fakes `manipulated_sequences/DeepFakeDetection/<c>/videos/<a>_<b>__<scene>__<id>.mp4`, masks under
    `.../DeepFakeDetection/masks/videos/`. No official split: every video goes to `split` (test: DFD is a test set
    in the cross-dataset protocol). A fake with a mask crops the face under the mask (`face_rule` mask)."""
    root = Path(root)
    _require_dir(root, "DFD root")
    real_dir = root / "original_sequences" / "actors" / compression / "videos"
    fake_dir = root / "manipulated_sequences" / "DeepFakeDetection" / compression / "videos"
    _require_dir(real_dir, f"DFD real videos at compression {compression}")
    _require_dir(fake_dir, f"DFD fakes at compression {compression}")
    mask_dir = root / "manipulated_sequences" / "DeepFakeDetection" / "masks" / "videos"
    items: list[Item] = []
    skipped: list[dict] = []
    for path in sorted(real_dir.glob("*.mp4")):
        items.append(Item(key_safe(path.stem), str(path), "video", 0, "real", split, str(path.relative_to(root)),
                          face_rule="mask"))  # no mask: the largest face, recorded as largest_no_mask
    for path in sorted(fake_dir.glob("*.mp4")):
        m = DFD_NAME.match(path.stem)
        if not m:
            skipped.append(skip(path, "name is not <actor>_<actor>__<scene>__<id>.mp4", split=split))
            continue
        mask = mask_dir / path.name
        extra = {"actors": f"{m.group(1)}_{m.group(2)}", "scene": m.group(3)}
        items.append(Item(key_safe(path.stem), str(path), "video", 1, "DeepFakeDetection", split,
                          str(path.relative_to(root)), mask=str(mask) if mask.is_file() else None, extra=extra,
                          face_rule="mask"))
    return f"dfd_{compression}", items, skipped


# ---------------------------------------------------------------- DeeperForensics-1.0
DISTORTION = re.compile(r"^[A-Za-z]+:\d+$")


def _read_list(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _distortions(lists: Path) -> dict[str, str]:
    """`<path> TYPE:level [TYPE:level ...]` lines of every distortion list -> {path and file name: "TYPE:level..."}.
    Keyed by the path as written and by `<variant>/<file>` so either spelling in the list matches."""
    out: dict[str, str] = {}
    for f in sorted(lists.rglob("*.txt")):
        if f.parent.name == "splits":
            continue
        for line in _read_list(f):
            parts = line.split()
            specs = [p for p in parts[1:] if DISTORTION.match(p)]
            if len(parts) < 2 or len(specs) != len(parts) - 1:
                continue  # not a distortion list (or a header line): only `<path> TYPE:level` lines count
            rel = parts[0].lstrip("./")
            out[rel] = " ".join(specs)
            if len(Path(rel).parts) >= 2:
                out["/".join(Path(rel).parts[-2:])] = out[rel]
    return out


def deeperforensics(root: str | Path, real: str = "ffpp", ffpp_root: str | Path | None = None,
                    compression: str = "c23") -> tuple[str, list[Item], list[dict]]:
    """DeeperForensics-1.0: fakes `manipulated_videos/<variant>/<target>_<source>.mp4`, split by the file names in
    `lists/splits/{train,val,test}.txt`; every variant is a method folder. Distortions from the lists'
    `<path> TYPE:level` lines go into the samples' json (`distortion`).

    Real class, `real`: "ffpp" (default, the field's protocol): FF++'s youtube videos of the split's targets,
    `<ffpp_root>/original_sequences/youtube/<compression>/videos/<target>.mp4`; "source_videos": the dataset's own
    recordings of the split's source actors, every .mp4 under `source_videos/<source>/`."""
    root = Path(root)
    _require_dir(root, "DeeperForensics-1.0 root")
    manip = root / "manipulated_videos"
    _require_dir(manip, "DeeperForensics-1.0")
    split_dir = root / "lists" / "splits"
    split_of: dict[str, str] = {}
    for split in SPLITS:
        f = split_dir / f"{split}.txt"
        if not f.is_file():
            raise LayoutError(f"DeeperForensics-1.0: split file {f} does not exist")
        for name in _read_list(f):
            split_of[Path(name).name] = split
    dist = _distortions(root / "lists") if (root / "lists").is_dir() else {}
    items: list[Item] = []
    skipped: list[dict] = []
    wanted: dict[str, set[str]] = {s: set() for s in SPLITS}
    for vdir in sorted(p for p in manip.iterdir() if p.is_dir()):
        for path in sorted(vdir.glob("*.mp4")):
            rel = str(path.relative_to(root))
            split = split_of.get(path.name)
            if split is None:
                skipped.append(skip(path, f"not named in {split_dir}/{{train,val,test}}.txt", method=vdir.name))
                continue
            target, _, source = path.stem.partition("_")
            extra = {"target": target, "source_actor": source}
            d = dist.get(rel) or dist.get(f"{vdir.name}/{path.name}")
            if d:
                extra["distortion"] = d
            items.append(Item(key_safe(path.stem), str(path), "video", 1, key_safe(vdir.name), split, rel,
                              extra=extra))
            wanted[split].add(target if real == "ffpp" else source)
    if real == "ffpp":
        if ffpp_root is None:
            raise LayoutError("DeeperForensics-1.0: the real class is FF++'s youtube videos: pass --ffpp-root "
                              "(or --real source_videos)")
        real_dir = Path(ffpp_root) / "original_sequences" / "youtube" / compression / "videos"
        _require_dir(real_dir, "FF++ youtube videos for DeeperForensics-1.0's real class")
        for split in SPLITS:
            for target in sorted(wanted[split]):
                path = real_dir / f"{target}.mp4"
                if path.is_file():
                    items.append(Item(key_safe(target), str(path), "video", 0, "real", split, f"ffpp:{target}.mp4"))
                else:
                    skipped.append(skip(path, f"FF++ original of the {split} targets absent", split=split))
    elif real == "source_videos":
        src = root / "source_videos"
        _require_dir(src, "DeeperForensics-1.0 source_videos")
        for split in SPLITS:
            for actor in sorted(wanted[split]):
                files = sorted((src / actor).rglob("*.mp4")) if (src / actor).is_dir() else []
                if not files:
                    skipped.append(skip(src / actor, f"no source video of actor {actor}", split=split))
                for path in files:
                    rel = path.relative_to(src)
                    items.append(Item(key_safe(str(rel.with_suffix(""))), str(path), "video", 0, "real", split,
                                      str(path.relative_to(root))))
    else:
        raise ValueError(f"DeeperForensics-1.0: real class {real!r}: expected ffpp or source_videos")
    return "deeperforensics", items, skipped


# ---------------------------------------------------------------- Celeb-DF v1
def celebdf_v1(root: str | Path) -> tuple[str, list[Item], list[dict]]:
    """Celeb-DF v1: the v2 layout (Celeb-real/, YouTube-real/, Celeb-synthesis/) and its own
    List_of_testing_videos.txt, where label 1 also means REAL (inverted into the project's 1 = fake)."""
    try:
        _, items, skipped = celebdf(root)
    except LayoutError as exc:
        raise LayoutError(str(exc).replace("Celeb-DF v2", "Celeb-DF v1")) from None
    return "celebdf_v1", items, skipped


# ---------------------------------------------------------------- UADFV
UADFV_RULES = ("test", "hash")


def _uadfv_pair(stem: str) -> str:
    return stem[: -len("_fake")] if stem.endswith("_fake") else stem


def uadfv_split(pair: str) -> str:
    """The documented split of `--split-rule hash`: the first byte of sha1(pair id) -> train < 179 (70 %),
    val < 218 (15 %), else test; a real video and its fake share the pair id, so they share a split."""
    b = hashlib.sha1(pair.encode()).digest()[0]
    return "train" if b < 179 else "val" if b < 218 else "test"


def uadfv(root: str | Path, rule: str = "test") -> tuple[str, list[Item], list[dict]]:
    """UADFV: `real/NNNN.mp4` and `fake/NNNN_fake.mp4` (49 pairs), no official split. rule "test" (default, as in
    the cross-dataset protocol): all in test; "hash": `uadfv_split` of the pair id."""
    if rule not in UADFV_RULES:
        raise ValueError(f"UADFV split rule {rule!r}: expected one of {UADFV_RULES}")
    root = Path(root)
    _require_dir(root, "UADFV root")
    _require_dir(root / "real", "UADFV")
    _require_dir(root / "fake", "UADFV")
    items: list[Item] = []
    skipped: list[dict] = []
    for top, label in (("real", 0), ("fake", 1)):
        for path in sorted((root / top).iterdir()):
            if path.suffix.lower() not in VIDEO_EXTS:
                skipped.append(skip(path, "not a video file"))
                continue
            pair = _uadfv_pair(path.stem)
            split = "test" if rule == "test" else uadfv_split(pair)
            items.append(Item(key_safe(path.stem), str(path), "video", label, top, split, f"{top}/{path.name}",
                              extra={"pair": pair}))
    return "uadfv", items, skipped


# ---------------------------------------------------------------- DF40
def _df40_entries(node, split: str | None = None, video: str | None = None):
    """DeepfakeBench-style JSON: {dataset: {label name: {split: [{compression}:] {video: {"label", "frames"}}}}};
    yields (split, video, entry) for every dict that holds a `frames` list. The label is the entry's own `label`
    field (every entry of these lists carries one), never guessed from the nesting."""
    if not isinstance(node, dict):
        return
    if isinstance(node.get("frames"), list):
        yield split, video, node
        return
    for k, v in node.items():
        if isinstance(v, dict):
            yield from _df40_entries(v, k if k in SPLITS else split, None if k in SPLITS else k)


def _rebase(path: str, root: Path, cache: dict[int, int]) -> Path | None:
    """A frame path from the list (often absolute, from the authors' machines) found under `root`: the longest
    tail of its components that exists there. The number of leading components dropped is remembered per list."""
    parts = Path(path).parts
    key = len(parts)
    if key in cache:
        p = root.joinpath(*parts[cache[key]:])
        if p.exists():
            return p
    for i in range(len(parts)):
        p = root.joinpath(*parts[i:])
        if p.exists():
            cache[key] = i
            return p
    return None


def df40(root: str | Path, lists: str | Path | None = None) -> tuple[str, list[Item], list[dict]]:
    """DF40: per-method frame folders `<method>/{ff,cdf}/...` and per-method JSON lists (DeepfakeBench's format;
    default: every .json under `<root>/lists`, else under `root`). A list entry whose `label` contains "real" is
    real (method folder `real`), any other is a fake of the list's method; frames become a `frames` item."""
    root = Path(root)
    _require_dir(root, "DF40 root")
    ldir = Path(lists) if lists else (root / "lists" if (root / "lists").is_dir() else root)
    files = sorted(ldir.rglob("*.json")) if ldir.is_dir() else ([ldir] if ldir.is_file() else [])
    if not files:
        raise LayoutError(f"DF40: no JSON list under {ldir} (pass --lists DIR with the per-method .json files)")
    items: list[Item] = []
    skipped: list[dict] = []
    seen: set[tuple] = set()
    for f in files:
        data = _read_json(f, "DF40 list")
        method = key_safe(f.stem)
        cache: dict[int, int] = {}
        for split, video, entry in _df40_entries(data):
            video = video or (Path(entry["frames"][0]).parent.name if entry["frames"] else "")
            label_name = str(entry.get("label") or "")
            where = f"{f} video {video!r}"
            if split not in SPLITS:
                skipped.append(skip(f, f"{where}: no train/val/test key above it"))
                continue
            if not label_name:
                skipped.append(skip(f, f"{where}: field 'label' missing or empty", split=split))
                continue
            frames = [p for p in (_rebase(x, root, cache) for x in entry["frames"]) if p is not None]
            if not frames:
                skipped.append(skip(f, f"{where}: none of its {len(entry['frames'])} frames found under {root}",
                                    split=split))
                continue
            label = 0 if "real" in label_name.lower() else 1
            domain = next((d for d in ("ff", "cdf") if d in frames[0].relative_to(root).parts), "")
            vid = key_safe(f"{domain}_{video}" if domain else video)
            m = "real" if label == 0 else method
            if (split, m, vid) in seen:
                continue  # a real video listed by several methods' lists is one item
            seen.add((split, m, vid))
            items.append(Item(vid, str(frames[0].parent), "frames", label, m, split,
                              str(frames[0].parent.relative_to(root)), files=[str(p) for p in frames],
                              extra={"df40_label": label_name, **({"domain": domain} if domain else {})}))
    return "df40", items, skipped


# ---------------------------------------------------------------- ForgeryNet
FORGERYNET_SPLITS = {"Training": "train", "Validation": "val", "Test": "test"}


def forgerynet(root: str | Path) -> tuple[str, list[Item], list[dict]]:
    """ForgeryNet: per split folder (Training/, Validation/), `image_list.txt` lines `<image> <binary> <3-class>
    <16-class>` (paths under the split's `image/` folder) and `video_list.txt` lines `<video> <binary> <3-class>
    <16-class> [<start>-<end> ...]` (under `video/`; the optional frame segments are the forged parts). binary 1 =
    fake. Method folder: `real`, or `type<16-class>` for fakes; the 3- and 16-class labels and the segments go into
    the samples' json."""
    root = Path(root)
    _require_dir(root, "ForgeryNet root")
    present = _present_folders(root, FORGERYNET_SPLITS, "ForgeryNet", "split folders")
    items: list[Item] = []
    skipped: list[dict] = []
    found_list = False
    for d in present:
        split = FORGERYNET_SPLITS[d]
        for list_name, sub, kind in (("image_list.txt", "image", "image"), ("video_list.txt", "video", "video")):
            lf = root / d / list_name
            if not lf.is_file():
                continue
            found_list = True
            base = root / d / sub if (root / d / sub).is_dir() else root / d
            for n, line in enumerate(lf.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.split()
                where = f"{lf}:{n}"
                if len(parts) < 4 or not all(p.isdigit() for p in parts[1:4]) or parts[1] not in ("0", "1"):
                    skipped.append(skip(where, f"malformed line {line!r} (expected '<path> <0|1> <3-class> "
                                               f"<16-class>')", split=split))
                    continue
                rel, binary, c3, c16 = parts[0], int(parts[1]), int(parts[2]), int(parts[3])
                path = base / rel
                if not path.is_file():
                    skipped.append(skip(path, f"named on {where} but absent", split=split))
                    continue
                extra: dict = {"class3": c3, "class16": c16}
                segs = [s for s in parts[4:] if re.match(r"^\d+-\d+$", s)]
                if segs:
                    extra["segments"] = segs
                method = "real" if binary == 0 else f"type{c16:02d}"
                vid = key_safe(str(Path(rel).with_suffix("")))
                items.append(Item(vid, str(path), kind, binary, method, split, f"{d}/{sub}/{rel}", extra=extra))
    if not found_list:
        raise LayoutError(f"ForgeryNet: no image_list.txt or video_list.txt in {', '.join(present)} under {root}")
    return "forgerynet", items, skipped
