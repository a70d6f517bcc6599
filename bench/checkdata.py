"""The GPU check's data: shards written from photos that scikit-image ships, and a config that trains and tests on
them. bench/gpu.py and bench/step.py both measure on these shards, so the writer sits in a module of its own.

The shards follow the shard format (docs/shards.md; data_prep's shard writer): `<root>/<name>/train/{real,fake}/`,
square crops of the photos at the loader's size, 4:4:4 JPEGs as prep writes them or 4:2:0 ones as other tools do.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from ltm.config import Config, load_config

log = logging.getLogger("bench.gpu")


def packaged_photos() -> list[np.ndarray]:
    """RGB photos that scikit-image ships in its wheel (no download), and its LFW faces (grey, enlarged)."""
    import skimage.data

    photos = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                 "colorwheel"):
        try:
            img = np.asarray(getattr(skimage.data, name)())
        except Exception as exc:  # noqa: BLE001 - a photo missing from this scikit-image build is only skipped
            log.debug("skimage.data.%s: %s", name, exc)
            continue
        if img.ndim == 3 and img.shape[2] >= 3:
            photos.append(np.ascontiguousarray(img[..., :3]).astype(np.uint8))
    faces = skimage.data.lfw_subset()[:100]  # the first 100 are faces
    photos += [np.repeat((f * 255).astype(np.uint8)[..., None], 3, axis=2) for f in faces[:20]]
    if len(photos) < 3:
        raise SystemExit("scikit-image ships fewer than 3 usable photos here; pass --data <shard split folder>")
    return photos


def encode_420(pixels: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes with 4:2:0 chroma (PIL's default, as cameras, ffmpeg and OpenCV write), unlike prep's 4:4:4."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality, subsampling=2)
    return buf.getvalue()


def write_check_shards(root: Path, samples: int, size: int, name: str = "gpucheck", chroma: str = "444") -> Path:
    """`<root>/<name>/train/{real,fake}/` shards (+ .idx, manifest.json) of random square crops of the photos,
    `size` px, written by data_prep's shard writer (docs/shards.md, "Shard format"); `chroma` "420" encodes them with
    4:2:0 chroma instead of prep's 4:4:4. Returns the split folder."""
    from PIL import Image

    from data_prep.shards import jpeg_bytes, write_json_atomic, write_shards

    encode = encode_420 if chroma == "420" else jpeg_bytes

    photos = packaged_photos()
    rng = np.random.default_rng(0)
    by_method: dict[str, list[dict]] = {"real": [], "fake": []}
    for i in range(samples):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(min(h, w) * rng.uniform(0.35, 1.0))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.BILINEAR)
        method = "fake" if i % 2 else "real"
        video = f"{method}{i // 8:04d}"
        by_method[method].append({
            "__key__": f"{video}-{i:06d}", "jpg": encode(np.asarray(crop)), "cls": i % 2,
            "json": {"dataset": name, "split": "train", "video": video, "frame": i, "label": i % 2,
                     "method": method, "compression": "raw", "bbox": [left, top, left + side, top + side],
                     "source": "skimage.data"}})
    split = root / name / "train"
    shards = []
    for method, items in by_method.items():
        records = write_shards(items, split / method, f"{name}-train-{method}", max_samples=256)
        shards += [{k: r[k] for k in ("name", "samples", "bytes", "sha256")} | {"method": method} for r in records]
    write_json_atomic(split / "manifest.json", {
        "format": 1, "settings": {"size": size, "quality": 95, "chroma": chroma},
        "source": "bench/gpu.py: scikit-image photos",
        "shards": shards, "totals": {m: len(v) for m, v in by_method.items()}, "skipped": []})
    return split


def method_folders(split: Path) -> list[Path]:
    from ltm.data.shards import method_folders as folders

    return folders(split)


def configure(base: str, split: Path, run_dir: Path, overrides: list[str]) -> Config:
    train = ", ".join(f"{{path: {m}, weight: 1}}" for m in method_folders(split))
    return load_config(base, [f"data.train=[{train}]", "data.val=[]", f"data.test=[{split}]",
                              f"train.run_dir={run_dir}", *overrides])


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """`cfg` with more key=value overrides, through a YAML file (the config's own loading and checks)."""
    from ltm.config import save_config

    with tempfile.TemporaryDirectory(prefix="ltm-gpu-check-cfg-") as folder:
        path = Path(folder) / "config.yaml"
        save_config(cfg, path)
        return load_config(path, overrides)
