"""Which face of a frame is cropped, and what happens to a sampled frame without a face.

    crop_faces(item, frames, detector, settings) -> (frames, faces, notes)
        frames: [(frame index, RGB array)] as sampled (N evenly spaced, `Settings.frames`); faces: one Face or
        None per frame. Two rules decide the face:
        - `largest` (every dataset by default): the largest detected face, `Detector.crop`.
        - `mask` (DeepFakeDetection, `Item.face_rule == "mask"`): scenes show several people and only one face is
          forged; where the item's mask video has a non-empty frame at that index, the face whose box holds the
          most mask pixels is cropped. The largest face would often be an untouched bystander, which labels a real
          face "fake" and inflates the dataset's AUC. Frames whose mask is empty or absent fall back to the largest
          face, and each sample records which rule picked it (`face_rule` in its json: mask_overlap, largest_no_mask,
          largest_mask_empty, largest_no_overlap; counts in the manifest's `face_rules`).
        With `Settings.top_up = K > 0`, a sampled frame without a face is replaced by the nearest neighbouring
        frame (at most K frames away, not already sampled) that has one; the sample records `topped_up_from`.
        Otherwise the frame stays missing and the manifest lists the video with the frames it really has.
    frame_summary(per_video, wanted) -> the manifest's `frames` block
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from data_prep.datasets import Item
from data_prep.faces import Detector, Face, cut_and_resize, largest, square_box

log = logging.getLogger(__name__)

MASK_ON = 128  # a mask pixel counts as forged from this grey level (mask videos are binary, codec ringing aside)
RULES = ("mask_overlap", "largest", "largest_no_mask", "largest_mask_empty", "largest_no_overlap")


def _face(frame: np.ndarray, box: np.ndarray, size: int, scale: float) -> Face:
    h, w = frame.shape[:2]
    crop_box = square_box(box, scale, w, h)
    return Face(cut_and_resize(frame, crop_box, size), [round(float(v), 1) for v in box[:4]], list(crop_box),
                float(box[4]))


def pick_by_mask(boxes: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray | None, str]:
    """The box holding the most forged mask pixels, else the largest box; and the rule that decided."""
    if boxes is None or len(boxes) == 0:
        return None, "largest"
    if mask is None:
        return largest(boxes), "largest_mask_empty"
    grey = mask.mean(2) if mask.ndim == 3 else mask
    on = grey >= MASK_ON
    if not on.any():
        return largest(boxes), "largest_mask_empty"
    h, w = on.shape
    counts = []
    for b in boxes:
        x0, y0 = max(0, int(b[0])), max(0, int(b[1]))
        x1, y1 = min(w, int(np.ceil(b[2]))), min(h, int(np.ceil(b[3])))
        counts.append(int(on[y0:y1, x0:x1].sum()) if x1 > x0 and y1 > y0 else 0)
    if max(counts) == 0:
        return largest(boxes), "largest_no_overlap"
    return boxes[int(np.argmax(counts))], "mask_overlap"


def _select(item: Item, frames: list[tuple[int, np.ndarray]], detector: Detector, settings) -> tuple[list, list[str]]:
    """Faces of `frames` under the item's rule; the rule that picked each (empty string where no face)."""
    if getattr(item, "face_rule", "largest") != "mask" or not item.mask or detector.name == "none":
        faces = detector.crop([f for _, f in frames], settings.size, settings.scale)
        rule = "largest" if getattr(item, "face_rule", "largest") != "mask" else "largest_no_mask"
        return faces, [rule if f is not None else "" for f in faces]
    from data_prep.video import VideoError, frames_at

    try:
        masks = frames_at(item.mask, [i for i, _ in frames])
    except (VideoError, OSError) as exc:
        log.warning("%s: mask video unusable, largest face instead (%s)", item.path, exc)
        masks = {}
    faces, rules = [], []
    for (idx, frame), boxes in zip(frames, detector.detect([f for _, f in frames])):
        mask = masks.get(idx)
        if mask is not None and mask.shape[:2] != frame.shape[:2]:
            mask = None  # a mask of another size cannot locate the face in this frame
        box, rule = pick_by_mask(boxes, mask)
        faces.append(None if box is None else _face(frame, box, settings.size, settings.scale))
        rules.append(rule if box is not None else "")
    return faces, rules


def _neighbours(item: Item, missing: list[int], taken: set[int], k: int) -> dict[int, list[int]]:
    """For each missing index, the indices at distance 1..k (nearest first, earlier first on a tie)."""
    from data_prep.video import IMAGE_EXTS, probe

    if item.kind == "video":
        total = probe(item.path).frames
    elif item.kind == "frames":
        total = len(item.files) if item.files else sum(
            1 for p in Path(item.path).iterdir() if p.suffix.lower() in IMAGE_EXTS)
    else:
        return {}
    out = {}
    for idx in missing:
        cands = [j for d in range(1, k + 1) for j in (idx - d, idx + d) if 0 <= j < total and j not in taken]
        out[idx] = cands
    return out


def _decode(item: Item, indices: list[int]) -> dict[int, np.ndarray]:
    from data_prep.video import IMAGE_EXTS, VideoError, frames_at, read_image

    if not indices:
        return {}
    if item.kind == "video":
        return frames_at(item.path, indices)
    files = item.files or sorted(str(p) for p in Path(item.path).iterdir() if p.suffix.lower() in IMAGE_EXTS)
    got = {}
    for i in indices:
        try:
            got[i] = read_image(files[i])
        except VideoError:
            continue  # an unreadable neighbour is simply not a candidate
    return got


def crop_faces(item: Item, frames: list[tuple[int, np.ndarray]], detector: Detector, settings
               ) -> tuple[list[tuple[int, np.ndarray]], list[Face | None], dict]:
    """Faces of the sampled frames (module docstring); frames may come back with topped-up neighbours in place of
    faceless ones. notes: {"rules": [rule per frame], "topped_up": {new index: sampled index}}."""
    faces, rules = _select(item, frames, detector, settings)
    notes: dict = {"rules": rules, "topped_up": {}}
    k = int(getattr(settings, "top_up", 0) or 0)
    missing = [i for i, ((idx, _), f) in enumerate(zip(frames, faces)) if f is None]
    if not k or not missing or item.kind not in ("video", "frames"):
        return frames, faces, notes
    taken = {idx for idx, _ in frames}
    cands = _neighbours(item, [frames[i][0] for i in missing], taken, k)
    wanted = sorted({j for js in cands.values() for j in js})
    decoded = _decode(item, wanted)
    order = [j for j in wanted if j in decoded]
    if not order:
        return frames, faces, notes
    extra_faces, extra_rules = _select(item, [(j, decoded[j]) for j in order], detector, settings)
    found = {j: (f, r) for j, f, r in zip(order, extra_faces, extra_rules) if f is not None}
    frames, faces, rules = list(frames), list(faces), list(rules)
    for pos in missing:
        idx = frames[pos][0]
        for j in cands.get(idx, []):
            if j in found and j not in taken:
                taken.add(j)
                frames[pos] = (j, decoded[j])
                faces[pos], rules[pos] = found[j]
                notes["topped_up"][j] = idx
                break
    notes["rules"] = rules
    return frames, faces, notes


def frame_summary(per_video: list[dict], wanted: int | None) -> dict:
    """The manifest's account of frames per video: the protocol, how many videos have each count of face frames,
    and every video with fewer than the protocol's count (never dropped silently)."""
    hist: dict[str, int] = {}
    short = []
    for v in per_video:
        hist[str(v["frames"])] = hist.get(str(v["frames"]), 0) + 1
        target = min(wanted, v["sampled"]) if wanted else v["sampled"]
        if v["frames"] < target or (wanted and v["sampled"] < wanted):
            short.append(v)
    protocol = f"{wanted} evenly spaced frames per video" if wanted else "every frame of each video"
    return {"protocol": protocol, "wanted": wanted,
            "videos_by_frames": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
            "videos_short": len(short), "short": short}
