"""Test-time perturbations (ltm.perturb): each type against its definition on a real face photo, determinism per
key, and `ltm eval --perturb` scoring the perturbed crops."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from shared_data import SHARED_DATA

from ltm.perturb import LEVELS, PerturbationError, perturbation

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
    for kind in LEVELS:
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
    for spec in ("fog:2", "blur", "blur:0", "blur:6"):
        with pytest.raises(PerturbationError, match="expected TYPE:LEVEL"):
            perturbation(spec)
    with pytest.raises(PerturbationError, match="not a per-crop operation"):
        perturbation("video:1")
    assert perturbation(None) is None and perturbation("") is None
