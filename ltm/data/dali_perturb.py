"""The per-crop perturbations of `ltm.data.perturb` as DALI operators, for the DALI eval pipeline.

Each type runs on the decoded crop at its stored size, before the loader's resize (the reference loader's order),
on the device the decoder put it on (GPU with CUDA, CPU otherwise); every operator used has both backends:

    saturation  fn.coord_transform, M = f I + (1 - f) 1 y^T (y = BT.601 luma row): the reference's
                RGB -> YCbCr -> chroma x f -> RGB collapsed into one 3x3 matrix, rounded to uint8
    contrast    arithmetic: floor(RGB x f) cast to uint8 (truncation, as the reference's astype)
    block       fn.erase with fill 128 at the anchors `ltm.data.perturb.block_anchors` draws from the sample's key
                (drawn on the host, fed as argument inputs)
    noise       the standard normal field `ltm.data.perturb.noise_field` draws from the sample's key (drawn on the host,
                fed as an external source), mapped YCbCr -> RGB by fn.coord_transform (255 sqrt(v) x the inverse
                BT.601 matrix) and added; rounded and clamped to uint8
    blur        fn.gaussian_blur with OpenCV's window and sigma (kernel k, sigma k / 6; both reflect-101 borders)
    pixelate    fn.resize (linear, no antialias) to (w // f, h // f), at least 1, and back
    jpeg        fn.jpeg_compression_distortion at the quality (4:2:0)

So the random draws are the reference loader's own, and what differs is arithmetic rounding: tests compare the two
loaders per type (tests/test_perturb_loaders.py). Video compression is not here: it runs on the host (PyAV).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath

from ltm.data.perturb import BLOCK, FROM_YCBCR, GREY, TO_YCBCR, Perturbation, block_anchors, noise_field

# the external sources a type reads besides the crop: name -> (dtype, ndim, layout)
INPUTS: dict[str, dict[str, tuple[Any, int, str | None]]] = {
    "block": {"block_anchor": (types.FLOAT, 1, None), "block_shape": (types.FLOAT, 1, None)},
    "noise": {"noise": (types.FLOAT, 3, "HWC")},
}


def saturation_matrix(factor: float) -> np.ndarray:
    """The 3x3 RGB matrix of the reference's chroma scaling: f I + (1 - f) (1, 1, 1)^T y."""
    luma = TO_YCBCR[0].astype(np.float64)
    return (factor * np.eye(3) + (1.0 - factor) * np.outer(np.ones(3), luma)).astype(np.float32)


def apply(p: Perturbation, image: Any, shape: Any, gpu: bool) -> Any:
    """`image` (uint8 HWC, at the stored size) perturbed by `p` inside a DALI pipeline definition; `shape` is its
    (H, W, C) as a CPU node; `gpu`: the image lives on the GPU (external inputs are moved there)."""
    kind, param = p.kind, p.param
    if kind == "saturation":
        return fn.coord_transform(image, M=saturation_matrix(param).flatten().tolist(), dtype=types.UINT8)
    if kind == "contrast":
        return fn.cast(dmath.floor(image * np.float32(param)), dtype=types.UINT8)
    if kind == "block":
        anchor = fn.external_source(name="block_anchor", dtype=types.FLOAT, ndim=1)
        size = fn.external_source(name="block_shape", dtype=types.FLOAT, ndim=1)
        return fn.erase(image, anchor=anchor, shape=size, axis_names="HW", fill_value=GREY)
    if kind == "noise":
        field = fn.external_source(name="noise", dtype=types.FLOAT, ndim=3, layout="HWC", no_copy=True)
        if gpu:
            field = field.gpu()
        m = (255.0 * np.sqrt(param) * FROM_YCBCR.astype(np.float64)).astype(np.float32)
        return fn.cast(image + fn.coord_transform(field, M=m.flatten().tolist()), dtype=types.UINT8)
    if kind == "blur":
        k = int(param)
        return fn.gaussian_blur(image, window_size=k, sigma=k / 6)
    if kind == "pixelate":
        f = int(param)
        h, w = shape[0], shape[1]
        small = fn.resize(image, resize_x=fn.cast(dmath.max(w // f, 1), dtype=types.FLOAT),
                          resize_y=fn.cast(dmath.max(h // f, 1), dtype=types.FLOAT),
                          interp_type=types.INTERP_LINEAR, antialias=False)
        return fn.resize(small, resize_x=fn.cast(w, dtype=types.FLOAT), resize_y=fn.cast(h, dtype=types.FLOAT),
                         interp_type=types.INTERP_LINEAR, antialias=False)
    if kind == "jpeg":
        return fn.jpeg_compression_distortion(image, quality=int(param))
    raise ValueError(f"perturbation {p.name!r} has no DALI form")


def stored_size(data: bytes | np.ndarray, where: str) -> tuple[int, int]:
    """(height, width) of an encoded crop, from its header only."""
    from PIL import Image

    from ltm.data.shards import ShardError

    raw = data.tobytes() if isinstance(data, np.ndarray) else data
    try:
        with Image.open(io.BytesIO(raw)) as im:
            return im.height, im.width
    except Exception as exc:  # PIL raises several types for a broken header; all mean "not a readable JPEG"
        raise ShardError(f"{where}: corrupt JPEG ({type(exc).__name__}: {exc})") from exc


def feed(p: Perturbation, keys: list[str], sizes: list[tuple[int, int]],
         where: list[str] | None = None) -> dict[str, list[np.ndarray]]:
    """The external inputs of `p` for one batch: per sample (its raw key, its stored (h, w)), the draws the
    reference loader makes for that key; `where` names the samples in errors."""
    from ltm.data.perturb import PerturbationError
    from ltm.data.shards import ShardError

    if p.kind == "block":
        anchors, shapes = [], []
        for i, (key, (h, w)) in enumerate(zip(keys, sizes)):
            try:
                drawn = block_anchors(h, w, p.param, p.rng(key))
            except PerturbationError as exc:
                raise ShardError(f"{where[i] if where else f'key {key!r}'}: {exc}") from exc
            a = drawn.astype(np.float32).reshape(-1)
            anchors.append(a)
            shapes.append(np.full(a.shape, BLOCK, dtype=np.float32))
        return {"block_anchor": anchors, "block_shape": shapes}
    if p.kind == "noise":
        return {"noise": [noise_field((h, w, 3), p.rng(key)) for key, (h, w) in zip(keys, sizes)]}
    return {}
