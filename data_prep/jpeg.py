"""JPEG as the shards hold it: prep's encoding and the loaders' decoding, with no other dependency than PIL.

`ltm predict` runs a face crop through both, so that a model sees the same pixels as from the shards; it imports
this module alone (no webdataset, no DALI) when scoring with an exported model."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def jpeg_bytes(image: np.ndarray, quality: int = 95) -> bytes:
    """Encode an RGB uint8 array (H, W, 3) as JPEG (PIL, 4:4:4 chroma so crops keep colour detail)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def decode_jpeg(data: bytes, size: int) -> np.ndarray:
    """JPEG bytes -> uint8 (size, size, 3) RGB; resized (bilinear, antialiased) only when the stored size differs
    (size 0: as stored). PIL's own error when the bytes are not a readable JPEG."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if size and im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return np.array(im)  # writable copy: torch.from_numpy needs one


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """The loaders' resize (PIL bilinear, antialiased) of a uint8 RGB array, only when its size differs."""
    if pixels.shape[:2] == (size, size):
        return pixels
    return np.array(Image.fromarray(pixels).resize((size, size), Image.BILINEAR))
