"""Test-time perturbations of face crops, after DeeperForensics-1.0's (Jiang et al., CVPR 2020; its
`perturbation/distortions.py` and `add_distortion_to_video.py` define the types and their five levels).

    perturbation("blur:3")(crop, key)            # uint8 RGB (H, W, 3) -> the same, perturbed; deterministic per key
    perturbation("video:3").clip(frames, video)  # a video's crops in frame order -> the same after H.264 at CRF 35

Types (DeeperForensics' name) and their parameter at levels 1..5:

    saturation (CS)  chroma factor 0.4 .. 0.0: Cb and Cr (BT.601, full range) pulled toward grey, Y kept
    contrast (CC)    RGB x 0.85, 0.725, 0.6, 0.475, 0.35, truncated to uint8
    block (BW)       16, 32, 48, 64, 80 grey (128) 8x8 blocks per 256 px of the short side, at uniform positions
    noise (GNC)      white Gaussian noise of variance 0.001, 0.002, 0.005, 0.01, 0.05 on [0, 1] YCbCr, clipped
    blur (GB)        OpenCV Gaussian blur, kernel 7, 9, 13, 17, 21, sigma = kernel / 6
    pixelate ("JPEG") down-scaled by 2 .. 6 and up again (bilinear): DeeperForensics calls it JPEG; it is pixelation
    jpeg (added)     a real JPEG re-encoding (PIL, 4:2:0) at quality 90, 70, 50, 30, 10
    video (VC)       H.264 re-encoding of the whole video at CRF 30, 32, 35, 38, 40

Video compression is a clip operation: the crops of one video (the shard samples sharing its id, in frame order)
are encoded as one H.264 stream with PyAV's libx264 (`data_prep.video.encode_h264`: yuv420p, preset medium, the
encoder's default and what DeeperForensics' plain `ffmpeg -crf` call uses, 25 fps, one thread, SIMD limited to SSE2,
so the same frames always give the same bytes, on any machine), decoded back, and those frames are scored. The RGB <->
YUV 4:2:0 conversions are PyAV's defaults (swscale, BT.601). Odd sides are padded to even by repeating the last
row/column and cropped back after decoding. All crops of a video must have one size (an error names the video
otherwise).

Where each type runs: every per-crop type runs inside the DALI eval pipeline when `data.loader` is dali (on the GPU
with CUDA, as DALI CPU operators otherwise: `ltm.data.dali_perturb`), and on the CPU with the functions below in the
reference loader; the two agree within a pixel or two (tests/test_perturb_loaders.py states the bound per type).
The random draws of block and noise come from the sample's key on the host in both loaders (positions, and the
noise field fed to DALI as an external source), so they are identical. Video compression runs on the CPU (PyAV) in
both loaders before the loader's resize; the DALI loader receives the decoded frames.

Differences, on purpose: DeeperForensics perturbs whole video frames; ltm perturbs the face crops the shards hold
(at their stored size, before the loader's resize), and compresses the sequence of a video's crops as its clip.
Its block count, `short side // 256 x n`, gives no block at all to a crop under 256 px; here the count is rounded
from `n x side / 256` (a 224 px crop gets 14 blocks at level 1, 70 at level 5). Its saturation change works on
OpenCV's float YCrCb of 0-255 values, whose neutral chroma sits 0.5/255 off grey; here chroma is scaled around
exact grey.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence

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
    "video": (30, 32, 35, 38, 40),
}
BLOCK = 8
GREY = 128
# the video type's libx264 preset (the CRF comes from the level); data_prep.video.encode_h264 fixes the rest, so a
# clip always gives the same bytes (measured before it did: 17 different streams in 30 encodes of one 16-frame clip)
VIDEO_PRESET = "medium"
VIDEO_FPS = 25

# BT.601 full-range RGB <-> YCbCr (JPEG's): rows give Y, Cb, Cr
TO_YCBCR = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
FROM_YCBCR = np.linalg.inv(TO_YCBCR).astype(np.float32)
TO_YCBCR = TO_YCBCR.astype(np.float32)  # float32 throughout: a twentieth of a grey level is far below a uint8 step


class PerturbationError(ValueError):
    """A perturbation spec that names no known type or level, or input a perturbation cannot take."""


def _ycbcr(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float YCbCr in [0, 1] (chroma centred on 0.5)."""
    out = (rgb.astype(np.float32) / np.float32(255.0)) @ TO_YCBCR.T
    out[..., 1:] += 0.5
    return out


def _rgb(ycbcr: np.ndarray) -> np.ndarray:
    x = ycbcr.copy()
    x[..., 1:] -= 0.5
    return np.clip(np.rint((x @ FROM_YCBCR.T) * 255.0), 0, 255).astype(np.uint8)


def saturation(rgb: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    y = _ycbcr(rgb)
    y[..., 1:] = 0.5 + (y[..., 1:] - 0.5) * factor
    return _rgb(y)


def contrast(rgb: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    return (rgb.astype(np.float32) * factor).astype(np.uint8)


def block_anchors(h: int, w: int, per_256: float, rng: np.random.Generator) -> np.ndarray:
    """(n, 2) top-left (y, x) corners of the grey blocks of an h x w crop, drawn in order from `rng`."""
    n = int(round(per_256 * min(h, w) / 256))
    if n and (h <= BLOCK or w <= BLOCK):
        raise PerturbationError(f"block: a {h}x{w} crop has no room for {BLOCK}x{BLOCK} blocks")
    out = np.zeros((n, 2), dtype=np.int64)
    for i in range(n):
        out[i] = rng.integers(0, h - BLOCK), rng.integers(0, w - BLOCK)
    return out


def block(rgb: np.ndarray, per_256: float, rng: np.random.Generator) -> np.ndarray:
    out = rgb.copy()
    h, w = out.shape[:2]
    for y, x in block_anchors(h, w, per_256, rng).tolist():
        out[y:y + BLOCK, x:x + BLOCK] = GREY
    return out


def noise_field(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """The standard normal field (float32, the crop's shape) that `noise` scales by sqrt(variance) on YCbCr."""
    return rng.standard_normal(shape, dtype=np.float32)


def noise(rgb: np.ndarray, variance: float, rng: np.random.Generator) -> np.ndarray:
    y = _ycbcr(rgb) + np.float32(np.sqrt(variance)) * noise_field(rgb.shape, rng)
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


def h264(frames: Sequence[np.ndarray], crf: int) -> tuple[list[np.ndarray], bytes]:
    """Encode uint8 RGB frames (one size) as one H.264 clip at `crf` (`data_prep.video.encode_h264`, preset
    `VIDEO_PRESET`), decode it: (the decoded frames, the encoded stream)."""
    import av

    from data_prep.video import encode_h264

    h, w = frames[0].shape[:2]
    buf = io.BytesIO()
    encode_h264(frames, buf, VIDEO_FPS, crf, VIDEO_PRESET, container="h264")
    data = buf.getvalue()
    with av.open(io.BytesIO(data), mode="r", format="h264") as src:
        # contiguous copies owning their memory (to_ndarray gives a strided view of the frame's buffer)
        decoded = [np.array(f.to_ndarray(format="rgb24")[:h, :w]) for f in src.decode(video=0)]
    return decoded, data


FUNCTIONS = {"saturation": saturation, "contrast": contrast, "block": block, "noise": noise, "blur": blur,
             "pixelate": pixelate, "jpeg": jpeg}
PER_CROP = tuple(FUNCTIONS)  # the types applied crop by crop; "video" works on whole clips


class Perturbation:
    """One per-crop type at one level; `__call__(crop, key)` draws its randomness from the sample's key, so that a
    rerun (or another rank, or another loader) perturbs every sample the same way."""

    per_crop = True

    def __init__(self, kind: str, level: int) -> None:
        self.kind, self.level = kind, level
        self.param = LEVELS[kind][level - 1]
        self.fn = FUNCTIONS[kind]

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.level}"

    def rng(self, key: str) -> np.random.Generator:
        """The generator of the sample `key` (its raw `__key__` in the shard)."""
        seed = int.from_bytes(hashlib.sha1(f"{self.name}/{key}".encode()).digest()[:8], "little")
        return np.random.default_rng(seed)

    def __call__(self, rgb: np.ndarray, key: str) -> np.ndarray:
        return self.fn(np.ascontiguousarray(rgb), self.param, self.rng(key))


class VideoCompression:
    """H.264 re-encoding of whole clips at one CRF level: `clip(frames, video)` -> the decoded frames."""

    per_crop = False
    kind = "video"

    def __init__(self, level: int) -> None:
        self.level = level
        self.param = self.crf = int(LEVELS["video"][level - 1])

    @property
    def name(self) -> str:
        return f"video:{self.level}"

    def clip(self, frames: Sequence[np.ndarray], video: str = "") -> list[np.ndarray]:
        if not len(frames):
            raise PerturbationError(f"video {video!r}: no frames to compress")
        sizes = {f.shape for f in frames}
        if len(sizes) > 1 or any(f.ndim != 3 or f.shape[2] != 3 or f.dtype != np.uint8 for f in frames):
            raise PerturbationError(f"video {video!r}: its crops must be uint8 RGB of one size to form a clip, got "
                                    f"{sorted(sizes)}")
        decoded, _ = h264(frames, self.crf)
        if len(decoded) != len(frames):
            raise PerturbationError(f"video {video!r}: {len(frames)} frames encoded, {len(decoded)} decoded")
        return decoded


def perturbation(spec: str | None) -> Perturbation | VideoCompression | None:
    """`TYPE:LEVEL` (e.g. `blur:3`, `video:2`) -> a Perturbation (per crop) or VideoCompression; None or "" -> None."""
    if not spec:
        return None
    kind, sep, level = str(spec).partition(":")
    if kind not in LEVELS or not sep or level not in ("1", "2", "3", "4", "5"):
        raise PerturbationError(f"perturbation {spec!r}: expected TYPE:LEVEL with TYPE one of {', '.join(LEVELS)} "
                                "and LEVEL 1-5")
    if kind == "video":
        return VideoCompression(int(level))
    return Perturbation(kind, int(level))
