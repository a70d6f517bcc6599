"""A fake's manipulated region, cut like its face crop: the optional shard member `region.png` (docs/shards.md).

`ltm prep ffpp --regions auto` (the default) gives a fake sample a region map where a source exists, in this order:

- `ffpp_mask`: FaceForensics++'s own mask video of the fake, `manipulated_sequences/<method>/masks/videos/<a>_<b>.mp4`
  (same frames as the fake). Its frame, averaged over the channels, is stretched from [MASK_LOW, MASK_HIGH] to
  [0, 255]: the mask is binary, and the stretch removes the codec's ringing near black and white while keeping the
  anti-aliased edge.
- `pair_difference`: the original video the fake was made from, `original_sequences/youtube/<comp>/videos/<a>.mp4`
  for the fake `<a>_<b>`. Face swaps and re-enactments keep every frame of the target video and replace or re-render
  the face, so on the same frame index the two differ where the face was manipulated, plus the noise of two
  separate lossy encodes. The recipe, on the fake's crop box at full resolution (side `s` pixels):
    1. both cuts Gaussian-blurred with sigma = s * DIFF_SIGMA (s/64: 3.5 px of a 224 px crop): the codec noise of
       two c23 encodes and their different edge softness are fine-grained; swapped or re-rendered content is not;
    2. d = |blur(fake) - blur(original)|, averaged over R, G, B (grey levels), then Gaussian-blurred again with
       sigma = s * DIFF_SMOOTH (s/32): where the swapped face happens to match the original's brightness the
       difference crosses zero in thin lines; this fills them, so the region is the whole replaced area;
    3. the map is (d - DIFF_LOW) / (DIFF_HIGH - DIFF_LOW) clipped to [0, 1]: 0 up to 4 grey levels, 1 from 16.
       Measured on the FF++ sample pairs with 4 frames each: in the crop's outer 8 % (background) d stays at or
       below 2.5 (Deepfakes 519_515; FaceSwap 634_660: 1.8), while inside the swapped face its median is 29-33
       (Deepfakes) and 13-19 (FaceSwap); NeuralTextures (004_982) re-renders the mouth and jaw, at 10-30;
    4. times the detected face box enlarged FACE_GATE (1.1) times, feathered: FF++ manipulates the face only, and
       the NeuralTextures pair also differs by up to 35 grey levels along high-contrast edges outside the face
       (the collar below the chin), which no method touches.
  The values are absolute, not normalised per frame: a frame the fake left as it was gets an all-zero map, not
  its codec noise stretched to 255.

A source is used only when it is aligned with the fake: the same number of frames (container metadata) and the
same frame size; otherwise the fake has no region from it and the reason is kept in the prep record. Both maps are
computed on the full-resolution frame and cut with `faces.cut_and_resize`, the face crop's own box and resize.

Public API:
    regions_for(item, frames, faces, size) -> ({frame index: (kind, png bytes)}, note)
    mask_region(mask_frame, crop_box, size) -> uint8 (size, size)
    pair_difference(fake, original, crop_box, face_box, size) -> uint8 (size, size)
    png_bytes(region) -> bytes        (8-bit greyscale PNG)
"""

from __future__ import annotations

import io
import logging

import cv2
import numpy as np
from PIL import Image

from data_prep.faces import cut_and_resize

log = logging.getLogger(__name__)

KINDS = ("ffpp_mask", "pair_difference")
MASK_LOW, MASK_HIGH = 32.0, 224.0
DIFF_SIGMA = 1 / 64
DIFF_SMOOTH = 1 / 32
DIFF_LOW, DIFF_HIGH = 4.0, 16.0
FACE_GATE = 1.1


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def png_bytes(region: np.ndarray) -> bytes:
    """An 8-bit single-channel PNG of a (H, W) uint8 map (PIL's encoder: the same bytes on every run)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(region, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def mask_region(mask_frame: np.ndarray, crop_box, size: int) -> np.ndarray:
    """A frame of a dataset mask video -> its 0..255 region, cut and resized like the face crop."""
    grey = mask_frame.astype(np.float32)
    if grey.ndim == 3:
        grey = grey.mean(2)
    m = np.clip((grey - MASK_LOW) / (MASK_HIGH - MASK_LOW), 0.0, 1.0) * 255.0
    return _to_uint8(cut_and_resize(m, crop_box, size))


def pair_difference(fake: np.ndarray, original: np.ndarray, crop_box, face_box, size: int) -> np.ndarray:
    """The region where a fake frame differs from its original frame (module docstring: steps 1-4)."""
    x0, y0, x1, y1 = (int(v) for v in crop_box)
    side = x1 - x0
    sigma = max(0.5, side * DIFF_SIGMA)
    f = cv2.GaussianBlur(fake[y0:y1, x0:x1].astype(np.float32), (0, 0), sigma)
    o = cv2.GaussianBlur(original[y0:y1, x0:x1].astype(np.float32), (0, 0), sigma)
    d = cv2.GaussianBlur(np.abs(f - o).mean(2), (0, 0), max(0.5, side * DIFF_SMOOTH))
    r = np.clip((d - DIFF_LOW) / (DIFF_HIGH - DIFF_LOW), 0.0, 1.0)
    fx0, fy0, fx1, fy1 = (float(v) for v in face_box[:4])
    cx, cy = (fx0 + fx1) / 2 - x0, (fy0 + fy1) / 2 - y0
    hw, hh = (fx1 - fx0) * FACE_GATE / 2, (fy1 - fy0) * FACE_GATE / 2
    gate = np.zeros(d.shape, np.float32)
    gate[max(0, int(round(cy - hh))):max(0, int(round(cy + hh))),
         max(0, int(round(cx - hw))):max(0, int(round(cx + hw)))] = 1.0
    gate = cv2.GaussianBlur(gate, (0, 0), 2 * sigma)
    return _to_uint8(cut_and_resize(r * gate * 255.0, (0, 0, side, side), size))


def _aligned(fake_path: str, other_path: str, wanted: list[int], shape: tuple[int, ...]) -> dict[int, np.ndarray]:
    """The companion video's frames at the fake's indices; VideoError when it is not aligned with the fake."""
    from data_prep.video import VideoError, frames_at, probe

    n_fake, n_other = probe(fake_path).frames, probe(other_path).frames
    if n_fake != n_other:
        raise VideoError(f"{other_path}: {n_other} frames, the fake has {n_fake}: not aligned")
    got = frames_at(other_path, wanted)
    for frame in got.values():
        if frame.shape[:2] != shape[:2]:
            raise VideoError(f"{other_path}: frames of {frame.shape[1]}x{frame.shape[0]}, the fake's are "
                             f"{shape[1]}x{shape[0]}")
        break
    return got


def regions_for(item, frames: list[tuple[int, np.ndarray]], faces: list, size: int
                ) -> tuple[dict[int, tuple[str, bytes]], str]:
    """Region maps of a fake item's cropped frames from its first usable source (`item.mask`, then
    `item.original`): {frame index: (kind, PNG bytes)}, and a note on sources that could not be used."""
    from data_prep.video import VideoError

    wanted = [idx for (idx, _), face in zip(frames, faces) if face is not None]
    notes: list[str] = []
    if not wanted:
        return {}, ""
    for kind, path in (("ffpp_mask", item.mask), ("pair_difference", item.original)):
        if not path:
            continue
        try:
            other = _aligned(item.path, path, wanted, frames[0][1].shape)
        except (VideoError, OSError) as exc:
            notes.append(f"{kind}: {exc}")
            continue
        out: dict[int, tuple[str, bytes]] = {}
        for (idx, frame), face in zip(frames, faces):
            if face is None or idx not in other:
                continue
            if kind == "ffpp_mask":
                region = mask_region(other[idx], face.crop_box, size)
            else:
                region = pair_difference(frame, other[idx], face.crop_box, face.box, size)
            out[idx] = (kind, png_bytes(region))
        missing = len(wanted) - len(out)
        if missing:
            notes.append(f"{kind}: {missing} of {len(wanted)} frames not found in {path}")
        return out, "; ".join(notes)
    return {}, "; ".join(notes)
