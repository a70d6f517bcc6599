"""Test-time perturbations (ltm.data.perturb): each type against its definition on a real face photo (computed here
independently), severity rising with the level, determinism per key and per clip. The loaders' side is in
tests/test_perturb_loaders.py."""

from __future__ import annotations

import numpy as np
import pytest
from h264 import h264_roundtrip
from PIL import Image
from shared_data import SHARED_DATA

from ltm.data.perturb import LEVELS, PER_CROP, PerturbationError, perturbation

PHOTO = SHARED_DATA / "faces" / "3ddfa__examples_inputs_emma.jpg"


@pytest.fixture(scope="module")
def crop() -> np.ndarray:
    with Image.open(PHOTO) as im:
        im = im.convert("RGB")
        s = min(im.size)
        return np.array(im.crop((0, 0, s, s)).resize((224, 224)))


def chroma(rgb: np.ndarray) -> np.ndarray:
    x = rgb.astype(np.float64) / 255
    cb = -0.168736 * x[..., 0] - 0.331264 * x[..., 1] + 0.5 * x[..., 2]
    cr = 0.5 * x[..., 0] - 0.418688 * x[..., 1] - 0.081312 * x[..., 2]
    luma = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    return np.stack([luma, cb, cr], -1)


def test_every_type_and_level_matches_its_definition(crop):
    for kind in PER_CROP:
        previous = 0.0
        for level in range(1, 6):
            out = perturbation(f"{kind}:{level}")(crop, "key")
            assert out.shape == crop.shape and out.dtype == np.uint8, kind
            change = float(np.abs(out.astype(int) - crop).mean())
            if kind != "block":  # block counts are random positions that may overlap
                assert change >= previous - 0.5, (kind, level)  # stronger with the level
            previous = change
    ycc, sat = chroma(crop), chroma(perturbation("saturation:2")(crop, "k"))
    assert np.abs(sat[..., 1:] - 0.3 * ycc[..., 1:]).max() < 0.01  # chroma x 0.3
    assert np.abs(sat[..., 0] - ycc[..., 0]).max() < 0.01  # luma kept
    assert np.abs(chroma(perturbation("saturation:5")(crop, "k"))[..., 1:]).max() < 0.01  # grey
    assert np.array_equal(perturbation("contrast:3")(crop, "k"), (crop.astype(np.float32) * 0.6).astype(np.uint8))
    blocks = perturbation("block:1")(crop, "k")
    changed = np.any(blocks != crop, -1)
    assert np.all(blocks[changed] == 128) and 8 * 8 <= changed.sum() <= round(16 * 224 / 256) * 64
    noisy = chroma(perturbation("noise:5")(crop, "k")) - ycc
    assert 0.15 < noisy.std() < 0.25  # sqrt(0.05) = 0.22 before clipping
    pix = perturbation("pixelate:4")(crop, "k")
    assert np.abs(np.diff(pix.astype(int), axis=1)).mean() < np.abs(np.diff(crop.astype(int), axis=1)).mean()


def test_randomness_comes_from_the_key(crop):
    p = perturbation("block:3")
    assert np.array_equal(p(crop, "a"), p(crop, "a")) and not np.array_equal(p(crop, "a"), p(crop, "b"))
    q = perturbation("noise:2")
    assert np.array_equal(q(crop, "a"), q(crop, "a")) and not np.array_equal(q(crop, "a"), q(crop, "b"))


def test_bad_specs_are_one_line_errors():
    for spec in ("fog:2", "blur", "blur:0", "blur:6", "video:6"):
        with pytest.raises(PerturbationError, match="expected TYPE:LEVEL"):
            perturbation(spec)
    assert perturbation(None) is None and perturbation("") is None
    assert perturbation("video:2").crf == 32 and not perturbation("video:2").per_crop
    with pytest.raises(PerturbationError, match="video 'x/v'.*one size"):
        perturbation("video:1").clip([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 10, 3), np.uint8)], "x/v")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _clip(crop: np.ndarray) -> list[np.ndarray]:
    """16 frames of the face drifting sideways and back: a short clip."""
    return [np.roll(crop, int(3 * np.sin(i / 3)), axis=1) for i in range(16)]


def test_severity_is_monotonic_psnr_falls_with_the_level(crop):
    """For every type (video: on a 16-frame clip), the PSNR against the clean crop falls from level to level."""
    for kind in LEVELS:
        psnr = []
        for level in range(1, 6):
            p = perturbation(f"{kind}:{level}")
            if kind == "video":
                frames = _clip(crop)
                psnr.append(float(np.mean([_psnr(a, b) for a, b in zip(frames, p.clip(frames, "v"))])))
            else:
                psnr.append(_psnr(crop, p(crop, "key")))
        assert all(a > b for a, b in zip(psnr, psnr[1:])), (kind, psnr)
        assert psnr[0] < 60, (kind, psnr)  # level 1 already changes the crop


def _gauss_rows(x: np.ndarray, k: int, sigma: float) -> np.ndarray:
    """1-D Gaussian (k taps, sum 1) along axis 0 with reflect-101 borders (OpenCV's default)."""
    t = np.arange(k) - k // 2
    g = np.exp(-(t**2) / (2 * sigma**2))
    g /= g.sum()
    padded = np.pad(x, [(k // 2, k // 2)] + [(0, 0)] * (x.ndim - 1), mode="reflect")
    return sum(g[i] * padded[i:i + len(x)] for i in range(k))


def _bilinear(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resampling at pixel centres (half-pixel convention), edge-clamped, without antialiasing."""
    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), pos - lo

    y0, y1, fy = axis(x.shape[0], h)
    x0, x1, fx = axis(x.shape[1], w)
    x = x.astype(np.float64)
    rows = x[y0] * (1 - fy)[:, None, None] + x[y1] * fy[:, None, None]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


def test_each_type_equals_its_definition_computed_here(crop):
    """blur, pixelate, noise, block, jpeg and video against independent computations of their definitions, with
    DeeperForensics' parameters per level written out here."""
    import cv2

    x = crop.astype(np.float64)
    for level, k in enumerate((7, 9, 13, 17, 21), start=1):  # separable Gaussian, kernel k, sigma k / 6
        want = np.rint(_gauss_rows(np.swapaxes(_gauss_rows(np.swapaxes(x, 0, 1), k, k / 6), 0, 1), k, k / 6))
        got = perturbation(f"blur:{level}")(crop, "k").astype(np.float64)
        # OpenCV's 8-bit blur works with fixed-point weights: one level off at most, rarely (measured <= 0.044)
        assert np.abs(got - want).max() <= 1 and np.abs(got - want).mean() < 0.06, level
    for level, f in enumerate((2, 3, 4, 5, 6), start=1):  # down by f (floor of the side), up again, bilinear
        h, w = crop.shape[:2]
        small = np.clip(np.rint(_bilinear(crop, h // f, w // f)), 0, 255)
        want = np.rint(_bilinear(small, h, w))
        got = perturbation(f"pixelate:{level}")(crop, "k").astype(np.float64)
        # OpenCV's fixed-point bilinear weights, rounded twice: two levels off at most (measured mean <= 0.25)
        assert np.abs(got - want).max() <= 2 and np.abs(got - want).mean() < 0.3, level
    for level, var in enumerate((0.001, 0.002, 0.005, 0.01, 0.05), start=1):  # N(0, var) on [0, 1] YCbCr, in RGB
        p = perturbation(f"noise:{level}")
        n = p.rng("k").standard_normal(crop.shape, dtype=np.float32).astype(np.float64)
        inv = np.linalg.inv(np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5],
                                      [0.5, -0.418688, -0.081312]]))
        want = np.clip(np.rint(x + 255 * np.sqrt(var) * n @ inv.T), 0, 255)
        assert np.abs(p(crop, "k") - want).max() <= 1, level
    for level, per_256 in enumerate((16, 32, 48, 64, 80), start=1):  # n 8x8 grey blocks at uniform positions
        p = perturbation(f"block:{level}")
        rng, want = p.rng("k"), crop.copy()
        for _ in range(round(per_256 * 224 / 256)):
            y, x0 = rng.integers(0, 224 - 8), rng.integers(0, 224 - 8)
            want[y:y + 8, x0:x0 + 8] = 128
        assert np.array_equal(p(crop, "k"), want), level
    for level, q in enumerate((90, 70, 50, 30, 10), start=1):  # JPEG at quality q, 4:2:0 (here: OpenCV's libjpeg)
        ok, data = cv2.imencode(".jpg", crop[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(q)])
        want = cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1]
        assert np.abs(perturbation(f"jpeg:{level}")(crop, "k").astype(int) - want).max() <= 1, level
    frames = _clip(crop)
    for level, crf in ((1, 30), (5, 40)):  # H.264 at the CRF, written out with PyAV here (libx264 without SIMD)
        want = h264_roundtrip(frames, crf)
        got = perturbation(f"video:{level}").clip(frames, "v")
        assert len(got) == len(want) == 16 and all(np.array_equal(a, b) for a, b in zip(got, want)), level


def test_video_compression_is_deterministic_and_pads_odd_sides(crop):
    frames = _clip(crop)
    p = perturbation("video:3")
    runs = [p.clip(frames, "v") for _ in range(3)]
    assert all(np.array_equal(a, b) for run in runs[1:] for a, b in zip(run, runs[0]))
    odd = [f[:101, :75] for f in frames]  # yuv420p needs even sides: padded, then cropped back
    out = p.clip(odd, "v")
    assert all(o.shape == (101, 75, 3) for o in out)
    assert np.mean([_psnr(a, b) for a, b in zip(odd, out)]) > 25
