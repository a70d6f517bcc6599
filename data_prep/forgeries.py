"""The fakes of `ltm prep synth`: five artefact families and the shortcut artefact, as image functions.

Each family turns a real WORK x WORK view and its five landmarks (eyes, nose, mouth corners, in view pixels) into a
fake view and the manipulation's per-pixel weight (the blending mask, 0 where the view is untouched), which becomes
the sample's `region.png`. No file access and no randomness of their own: every draw comes from the generator the
caller passes, so `data_prep.synth` decides the seeds.

The families (their artefacts differ on purpose; `strength` scales every magnitude below, 1.0 = the defaults):

- `SelfBlend` (after Shiohara & Yamasaki's self-blended images, SBI): the face blended back onto itself after a colour
  (per-channel gain/offset, HSV), frequency (blur or sharpening) and geometry (scale, shift) jitter, through the
  landmarks' face oval deformed elastically, eroded or dilated and blurred by a random amount, at a random opacity.
  Blending-boundary and colour-mismatch artefacts without another identity: the usual training family for users
  who have real videos only.
- `IdentitySwap` (FaceSwap / Deepfakes-like): another source's face of the same split aligned on the 5 landmarks
  (similarity transform), passed through a lower-resolution "reconstruction", colour-matched (Reinhard, LAB) inside
  the inner-face hull and blended in: identity, resolution and partial colour mismatches at a tighter boundary.
- `Upsample` (generator traces): the face region goes to 1/2 or 1/4 resolution and back through a transposed-
  convolution-like zero-insertion up-sampling with a random small kernel, which leaves a periodic (checkerboard)
  pattern in the spectrum; colours and geometry unchanged, soft face-wide mask.
- `ExpressionWarp` (Face2Face-like reenactment): a smooth displacement field localised at the mouth and eyes (mouth
  opening/closing, smile, eye-lid motion) resampled bilinearly: geometry and interpolation artefacts only,
  no colour change, no foreign texture.
- `TextureRender` (NeuralTextures-like): the mouth and lower face re-rendered: edge-preserving smoothing (skin pores
  lost), a band-pass "neural texture" pattern and a slight tone shift, blended through a soft lower-face mask.

The shortcut (`shortcut_stamp`, `apply_stamp`): a small checkerboard-and-colour square on one cheek, drawn on the
output-size crop, for the benchmark of whether a model's mask finds what a detector leans on.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

FAMILIES = ("SelfBlend", "IdentitySwap", "Upsample", "ExpressionWarp", "TextureRender")
WORK = 256  # manipulations happen on WORK x WORK views, then every view is resized to the output size


# ------------------------------------------------------------------------------------------- face geometry
def face_frame(lms: np.ndarray) -> dict:
    """Landmark geometry: eye centre, mouth centre, eye-mouth distance d, eye distance e, up (u) and side (v)."""
    eyes, mouth = (lms[0] + lms[1]) / 2, (lms[3] + lms[4]) / 2
    d = float(np.linalg.norm(mouth - eyes)) + 1e-3
    u = (mouth - eyes) / d
    v = np.array([-u[1], u[0]])
    return {"eyes": eyes, "mouth": mouth, "nose": lms[2], "d": d, "e": float(np.linalg.norm(lms[1] - lms[0])),
            "u": u, "v": v}


def _ellipse_mask(center, axes, u: np.ndarray, size: int = WORK) -> np.ndarray:
    mask = np.zeros((size, size), np.float32)
    angle = math.degrees(math.atan2(u[1], u[0])) - 90  # axes[1] runs along u (down the face)
    cv2.ellipse(mask, (round(center[0]), round(center[1])), (max(1, round(axes[0])), max(1, round(axes[1]))),
                angle, 0, 360, 1.0, -1)
    return mask


def face_oval(f: dict) -> np.ndarray:
    return _ellipse_mask(f["eyes"] + 0.45 * f["d"] * f["u"], (1.0 * f["e"], 1.35 * f["d"]), f["u"])


def inner_face(lms: np.ndarray, f: dict) -> np.ndarray:
    """Hull of the landmarks pushed outwards (brows above the eyes, chin below the mouth)."""
    pts = np.concatenate([lms, [f["eyes"] - 0.45 * f["d"] * f["u"] - 0.7 * f["e"] * f["v"],
                                f["eyes"] - 0.45 * f["d"] * f["u"] + 0.7 * f["e"] * f["v"],
                                f["mouth"] + 0.55 * f["d"] * f["u"]]])
    c = pts.mean(0)
    pts = c + (pts - c) * 1.15
    mask = np.zeros((WORK, WORK), np.float32)
    cv2.fillConvexPoly(mask, cv2.convexHull(pts.astype(np.int32)), 1.0)
    return mask


def _deform(mask: np.ndarray, rng: np.random.Generator, amount: float) -> np.ndarray:
    """Elastic wobble, random erosion or dilation, then a blur of random width (SBI's mask augmentation)."""
    h, w = mask.shape
    dx = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 14) * amount * 40
    dy = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 14) * amount * 40
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    mask = cv2.remap(mask, gx + dx, gy + dy, cv2.INTER_LINEAR)
    k = int(rng.integers(1, 12))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    mask = cv2.erode(mask, kernel) if rng.random() < 0.5 else cv2.dilate(mask, kernel)
    mask = cv2.GaussianBlur(mask, (0, 0), rng.uniform(2, 10))
    return np.clip(mask / max(float(mask.max()), 1e-6), 0, 1)


def _blend(target: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None]
    return np.clip(m * source + (1 - m) * target.astype(np.float32), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------- the five families
def self_blend(img: np.ndarray, lms: np.ndarray, rng: np.random.Generator,
               strength: float) -> tuple[np.ndarray, np.ndarray]:
    f = face_frame(lms)
    src = img.astype(np.float32)
    gain = 1 + strength * rng.uniform(-0.12, 0.12, 3)
    src = src * gain + strength * rng.uniform(-14, 14, 3)
    if rng.random() < 0.5:
        src = cv2.GaussianBlur(src, (0, 0), 0.4 + strength * rng.uniform(0.3, 1.4))
    else:  # unsharp mask
        amount = strength * rng.uniform(0.4, 1.2)
        src = src + amount * (src - cv2.GaussianBlur(src, (0, 0), 1.5))
    s = 1 + strength * rng.uniform(-0.05, 0.05)
    m = cv2.getRotationMatrix2D(tuple(f["nose"]), 0, s)
    m[:, 2] += strength * rng.uniform(-0.03, 0.03, 2) * WORK
    src = cv2.warpAffine(np.clip(src, 0, 255), m, (WORK, WORK), borderMode=cv2.BORDER_REFLECT)
    mask = _deform(face_oval(f) if rng.random() < 0.6 else inner_face(lms, f), rng, 0.6)
    opacity = min(1.0, rng.uniform(0.5, 1.0) * (0.5 + 0.5 * strength))
    return _blend(img, src, mask * opacity), mask * opacity


def _reinhard(src: np.ndarray, dst: np.ndarray, mask: np.ndarray, amount: float) -> np.ndarray:
    """Colour transfer in LAB: src's statistics inside the mask moved `amount` of the way to dst's."""
    s = cv2.cvtColor(np.clip(src, 0, 255).astype(np.uint8), cv2.COLOR_RGB2LAB).astype(np.float32)
    d = cv2.cvtColor(dst, cv2.COLOR_RGB2LAB).astype(np.float32)
    sel = mask > 0.5
    if sel.sum() < 16:
        return src
    sm, ss = s[sel].mean(0), s[sel].std(0) + 1e-3
    dm, ds = d[sel].mean(0), d[sel].std(0) + 1e-3
    matched = (s - sm) / ss * ds + dm
    out = amount * matched + (1 - amount) * s
    return cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB).astype(np.float32)


def identity_swap(img: np.ndarray, lms: np.ndarray, donor: np.ndarray, donor_lms: np.ndarray,
                  rng: np.random.Generator, strength: float) -> tuple[np.ndarray, np.ndarray]:
    f = face_frame(lms)
    m, _ = cv2.estimateAffinePartial2D(donor_lms.astype(np.float32), lms.astype(np.float32))
    if m is None:
        m = np.float32([[1, 0, 0], [0, 1, 0]])
    src = cv2.warpAffine(donor, m, (WORK, WORK), borderMode=cv2.BORDER_REFLECT).astype(np.float32)
    # the generator's own resolution: a 64-128 px reconstruction, brought back up
    r = int(np.clip(rng.uniform(64, 128) / max(0.5, strength), 48, WORK))
    src = cv2.resize(cv2.resize(src, (r, r), interpolation=cv2.INTER_AREA), (WORK, WORK),
                     interpolation=cv2.INTER_LINEAR)
    mask = inner_face(lms, f)
    src = _reinhard(src, img, mask, amount=float(np.clip(1.0 - strength * rng.uniform(0.1, 0.5), 0, 1)))
    mask = cv2.GaussianBlur(mask, (0, 0), rng.uniform(2, 5))
    return _blend(img, src, mask), mask


def upsample_traces(img: np.ndarray, lms: np.ndarray, rng: np.random.Generator,
                    strength: float) -> tuple[np.ndarray, np.ndarray]:
    f = face_frame(lms)
    factor = int(rng.choice([2, 4]))
    x = img.astype(np.float32)
    small = cv2.resize(x, (WORK // factor, WORK // factor), interpolation=cv2.INTER_AREA)
    # zero insertion then a small random kernel: a transposed convolution whose taps do not sum evenly over the
    # stride leaves a period-`factor` pattern (the checkerboard of Odena et al.)
    up = np.zeros_like(x)
    up[::factor, ::factor] = small
    k = rng.uniform(0.5, 1.5, (factor + 1, factor + 1)).astype(np.float32)
    k = k / k.sum() * factor * factor
    rendered = cv2.filter2D(up, -1, k, borderType=cv2.BORDER_REFLECT)
    smooth = cv2.resize(small, (WORK, WORK), interpolation=cv2.INTER_LINEAR)
    src = smooth + strength * 0.35 * (rendered - smooth)  # the periodic residue, scaled by strength
    mask = cv2.GaussianBlur(face_oval(f), (0, 0), 8)
    return _blend(img, src, mask), mask


def expression_warp(img: np.ndarray, lms: np.ndarray, rng: np.random.Generator,
                    strength: float) -> tuple[np.ndarray, np.ndarray]:
    f = face_frame(lms)
    gx, gy = np.meshgrid(np.arange(WORK, dtype=np.float32), np.arange(WORK, dtype=np.float32))
    dx, dy = np.zeros_like(gx), np.zeros_like(gy)
    region = np.zeros_like(gx)

    def bump(center, radius, shift):
        nonlocal dx, dy, region
        g = np.exp(-(((gx - center[0]) ** 2 + (gy - center[1]) ** 2) / (2 * radius ** 2)))
        dx += g * shift[0]
        dy += g * shift[1]
        region = np.maximum(region, g)

    amp = strength * f["d"]
    # mouth: open/close along u, smile (corners outwards and up along v / -u)
    bump(f["mouth"], 0.45 * f["d"], amp * rng.uniform(-0.18, 0.18) * f["u"])
    for corner, side in ((lms[3], -1), (lms[4], 1)):
        bump(corner, 0.3 * f["d"], amp * (side * rng.uniform(-0.12, 0.12) * f["v"] + rng.uniform(-0.1, 0.1) * f["u"]))
    for eye in (lms[0], lms[1]):  # lids
        bump(eye, 0.25 * f["d"], amp * rng.uniform(-0.1, 0.1) * f["u"])
    warped = cv2.remap(img, gx + dx, gy + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    # re-rendered through the reenactment's own resampling: a slight blur where the face moved
    warped = cv2.GaussianBlur(warped, (0, 0), 0.3 + 0.5 * strength)
    mask = np.clip(region * 2.5, 0, 1)  # the bumps' support: where the face moved and was re-rendered
    return _blend(img, warped.astype(np.float32), mask), mask


def texture_render(img: np.ndarray, lms: np.ndarray, rng: np.random.Generator,
                   strength: float) -> tuple[np.ndarray, np.ndarray]:
    f = face_frame(lms)
    smooth = cv2.bilateralFilter(img, 9, 20 + 40 * strength, 5).astype(np.float32)
    noise = rng.normal(0, 1, (WORK // 2, WORK // 2)).astype(np.float32)
    band = cv2.GaussianBlur(noise, (0, 0), 0.8) - cv2.GaussianBlur(noise, (0, 0), 2.0)  # band-pass "texture"
    band = cv2.resize(band, (WORK, WORK), interpolation=cv2.INTER_CUBIC)
    src = smooth + strength * 10 * band[..., None] / (band.std() + 1e-6) * 0.4
    src = src * (1 + strength * rng.uniform(-0.05, 0.05, 3))
    center = f["mouth"] + 0.15 * f["d"] * f["u"]
    mask = _ellipse_mask(center, (0.75 * f["e"], 0.6 * f["d"]), f["u"])
    mask = cv2.GaussianBlur(mask, (0, 0), rng.uniform(3, 8))
    return _blend(img, src, mask), mask


# ------------------------------------------------------------------------------------------- the shortcut artefact
SHORTCUTS = ("none", "patch")
PATCH_AMPLITUDE = 10.0  # grey levels of the checkerboard (+-), plus the same as a red-up / blue-down colour shift


def shortcut_stamp(lms: np.ndarray, size: int, rng: np.random.Generator) -> dict:
    """Where the `patch` shortcut goes on one view: a square of side ~size/8 on the image-left cheek.

    Anchored to the landmarks (midway between the image-left eye and mouth corner, pushed a quarter of the eye
    distance outwards), jittered by up to 3% of the side, kept inside the crop. `lms` are WORK-pixel landmarks;
    the result is in output pixels (the stamp is drawn after the resize, so its pixel period survives it).
    """
    f = face_frame(lms)
    s = size / WORK
    centre = ((lms[0] + lms[3]) / 2 + 0.25 * f["e"] * f["v"]) * s + rng.uniform(-0.03, 0.03, 2) * size
    side = max(4, 2 * round(size / 16))  # even: whole 2x2 cells of the checkerboard
    x0 = int(np.clip(round(centre[0] - side / 2), 0, size - side))
    y0 = int(np.clip(round(centre[1] - side / 2), 0, size - side))
    return {"x0": x0, "y0": y0, "side": side}


def apply_stamp(x: np.ndarray, stamp: dict) -> tuple[np.ndarray, np.ndarray]:
    """The `patch` artefact on a uint8 output-size crop, and its region (1 inside the patch, 0 elsewhere).

    A checkerboard of 2x2-pixel cells (period 4 px: high enough in frequency to be foreign to a face, low enough
    for JPEG at quality 85-96 to keep it) with a red-up / blue-down shift: a local trace that a detector picks up
    in a few hundred steps, as method-specific traces in real fakes are.
    """
    x0, y0, side = stamp["x0"], stamp["y0"], stamp["side"]
    yy, xx = np.mgrid[0:side, 0:side]
    board = np.where(((yy // 2) + (xx // 2)) % 2 == 0, 1.0, -1.0).astype(np.float32)
    delta = PATCH_AMPLITUDE * board[..., None] + np.float32([PATCH_AMPLITUDE, 0, -PATCH_AMPLITUDE])
    out = x.copy()
    patch = out[y0:y0 + side, x0:x0 + side].astype(np.float32) + delta
    out[y0:y0 + side, x0:x0 + side] = np.clip(patch, 0, 255).astype(np.uint8)
    region = np.zeros(x.shape[:2], np.float32)
    region[y0:y0 + side, x0:x0 + side] = 1.0
    return out, region
