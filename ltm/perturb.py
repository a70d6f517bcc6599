"""Test-time perturbations of face crops, after DeeperForensics-1.0's (Jiang et al., CVPR 2020; its
`perturbation/distortions.py` and `add_distortion_to_video.py` define the types and their five levels).

    perturbation("blur:3")(crop, key)      # uint8 RGB (H, W, 3) -> the same, perturbed; deterministic per key

Types (DeeperForensics' name) and their parameter at levels 1..5:

    saturation (CS)  chroma factor 0.4 .. 0.0: Cb and Cr (BT.601, full range) pulled toward grey, Y kept
    contrast (CC)    RGB x 0.85, 0.725, 0.6, 0.475, 0.35, truncated to uint8
    block (BW)       16, 32, 48, 64, 80 grey (128) 8x8 blocks per 256 px of the short side, at uniform positions
    noise (GNC)      white Gaussian noise of variance 0.001, 0.002, 0.005, 0.01, 0.05 on [0, 1] YCbCr, clipped
    blur (GB)        OpenCV Gaussian blur, kernel 7, 9, 13, 17, 21, sigma = kernel / 6
    pixelate ("JPEG") down-scaled by 2 .. 6 and up again (bilinear): DeeperForensics calls it JPEG; it is pixelation
    jpeg (added)     a real JPEG re-encoding (PIL, 4:2:0) at quality 90, 70, 50, 30, 10

Differences, on purpose: DeeperForensics perturbs whole video frames; ltm perturbs the face crops the shards hold
(at their stored size, before the loader's resize). Its block count, `short side // 256 x n`, gives no block at all to
a crop under 256 px; here the count is rounded from `n x side / 256` (a 224 px crop gets 14 blocks at level 1,
70 at level 5). Its saturation change works on OpenCV's float YCrCb of 0-255 values, whose neutral chroma sits
0.5/255 off grey; here chroma is scaled around exact grey. Video compression (H.264 CRF 30-40) re-encodes whole
clips and is not a per-crop operation.
"""

from __future__ import annotations

import hashlib
import io

import cv2
import numpy as np

LEVELS: dict[str, tuple[float, ...]] = {
    "saturation": (0.4, 0.3, 0.2, 0.1, 0.0),
    "contrast": (0.85, 0.725, 0.6, 0.475, 0.35),
    "block": (16, 32, 48, 64, 80),
    "noise": (0.001, 0.002, 0.005, 0.01, 0.05),
    "blur": (7, 9, 13, 17, 21),
    "pixelate": (2, 3, 4, 5, 6),
    "jpeg": (90, 70, 50, 30, 10),
}
BLOCK = 8
GREY = 128

# BT.601 full-range RGB <-> YCbCr (JPEG's): rows give Y, Cb, Cr
_TO_YCBCR = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_FROM_YCBCR = np.linalg.inv(_TO_YCBCR).astype(np.float32)
_TO_YCBCR = _TO_YCBCR.astype(np.float32)  # float32 throughout: a twentieth of a grey level is far below a uint8 step


class PerturbationError(ValueError):
    """A perturbation spec that names no known type or level."""


def _ycbcr(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float YCbCr in [0, 1] (chroma centred on 0.5)."""
    out = (rgb.astype(np.float32) / np.float32(255.0)) @ _TO_YCBCR.T
    out[..., 1:] += 0.5
    return out


def _rgb(ycbcr: np.ndarray) -> np.ndarray:
    x = ycbcr.copy()
    x[..., 1:] -= 0.5
    return np.clip(np.rint((x @ _FROM_YCBCR.T) * 255.0), 0, 255).astype(np.uint8)


def saturation(rgb: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    y = _ycbcr(rgb)
    y[..., 1:] = 0.5 + (y[..., 1:] - 0.5) * factor
    return _rgb(y)


def contrast(rgb: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    return (rgb.astype(np.float32) * factor).astype(np.uint8)


def block(rgb: np.ndarray, per_256: float, rng: np.random.Generator) -> np.ndarray:
    out = rgb.copy()
    h, w = out.shape[:2]
    for _ in range(int(round(per_256 * min(h, w) / 256))):
        y, x = rng.integers(0, h - BLOCK), rng.integers(0, w - BLOCK)
        out[y:y + BLOCK, x:x + BLOCK] = GREY
    return out


def noise(rgb: np.ndarray, variance: float, rng: np.random.Generator) -> np.ndarray:
    y = _ycbcr(rgb) + np.float32(np.sqrt(variance)) * rng.standard_normal(rgb.shape, dtype=np.float32)
    return _rgb(y)


def blur(rgb: np.ndarray, kernel: float, rng: np.random.Generator) -> np.ndarray:
    k = int(kernel)
    return cv2.GaussianBlur(rgb, (k, k), k / 6)


def pixelate(rgb: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    h, w = rgb.shape[:2]
    small = cv2.resize(rgb, (max(1, w // int(factor)), max(1, h // int(factor))), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def jpeg(rgb: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=int(quality))
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        return np.array(im.convert("RGB"))


FUNCTIONS = {"saturation": saturation, "contrast": contrast, "block": block, "noise": noise, "blur": blur,
             "pixelate": pixelate, "jpeg": jpeg}


class Perturbation:
    """One type at one level; `__call__(crop, key)` draws its randomness from the sample's key, so that a rerun (or
    another rank, or another loader) perturbs every sample the same way."""

    def __init__(self, kind: str, level: int) -> None:
        self.kind, self.level = kind, level
        self.param = LEVELS[kind][level - 1]
        self.fn = FUNCTIONS[kind]

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.level}"

    def __call__(self, rgb: np.ndarray, key: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha1(f"{self.name}/{key}".encode()).digest()[:8], "little")
        return self.fn(np.ascontiguousarray(rgb), self.param, np.random.default_rng(seed))


def perturbation(spec: str | None) -> Perturbation | None:
    """`TYPE:LEVEL` (e.g. `blur:3`) -> a Perturbation; None or "" -> None."""
    if not spec:
        return None
    kind, sep, level = str(spec).partition(":")
    if kind == "video":
        raise PerturbationError("perturbation 'video' (H.264 re-encoding of whole clips) is not a per-crop operation "
                                "and is not available in this version")
    if kind not in LEVELS or not sep or level not in ("1", "2", "3", "4", "5"):
        raise PerturbationError(f"perturbation {spec!r}: expected TYPE:LEVEL with TYPE one of {', '.join(LEVELS)} "
                                "and LEVEL 1-5")
    return Perturbation(kind, int(level))
