"""The sample dataset: a small real-face dataset in the FaceForensics++ layout, built offline from packaged photos.

`ltm prep sample --out DIR` writes

    DIR/original_sequences/youtube/c23/videos/<id>.mp4            real: camera-like motion over a real face photo
    DIR/manipulated_sequences/SelfBlend/c23/videos/<a>_<b>.mp4    a's face blended back onto itself (jittered)
    DIR/manipulated_sequences/FaceSwap/c23/videos/<a>_<b>.mp4     b's face blended into a's scene
    DIR/splits/{train,val,test}.json                              official FF++ format: lists of [a, b] id pairs
    DIR/SOURCES.json                                              which photo each id shows, the settings, and
                                                                  the digest of every video (`videos_digest`)

and `ltm prep ffpp --root DIR --splits DIR/splits --out DIR/shards` turns it into shards (dataset `ffpp_c23`).

Faces come from photos that installed packages ship: scikit-image's `astronaut` and `lfw_subset` (real LFW faces,
25x25 grey, tinted per identity), matplotlib's `grace_hopper`. Every id is one identity; ids of the val and test
pairs never appear in train. Videos are H.264 at crf 23 (x264's quality of FF++ "c23"), 25 fps.

Deterministic: the same identities, length, frame size, seed and crf give byte-identical videos on every run and
machine, built straight through or killed and resumed: each video draws from its own generator keyed by (seed,
target, source, method), and x264 runs single-threaded on its C-exact code (`data_prep.video.X264_OPTIONS`).

Fakes carry real blending artifacts, as face-swap pipelines leave them:
- SelfBlend (after self-blended images): the scene's own face, colour-shifted, rescaled through a lower
  resolution and slightly warped, is blended back through a soft elliptical mask.
- FaceSwap: another identity's face, resized to the target's face box and only partly colour-matched, blended in
  through the same kind of mask.
Each video moves a virtual camera over its (real or manipulated) scene: smooth pan, zoom and a small rotation,
plus sensor noise per frame.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import cv2
import numpy as np

from data_prep.shards import sha256_file, write_json_atomic
from data_prep.video import write_video

log = logging.getLogger(__name__)

FAKE_METHODS = ("SelfBlend", "FaceSwap")
SCENE = 256  # scene side before the camera moves over it
GRAIN = 16.0  # grain amplitude (grey levels, std) and feature size (pixels) in every scene
GRAIN_SIZE = 0.8


# ---------------------------------------------------------------- sources: real face photos from installed packages
def _colour_photos() -> list[tuple[str, np.ndarray, tuple[float, float, float, float]]]:
    """(name, RGB photo, face box x0, y0, x1, y1). Boxes measured once with MTCNN on these exact files."""
    import matplotlib.cbook
    import skimage.data

    out = [("skimage:astronaut", skimage.data.astronaut(), (181.0, 62.0, 268.0, 172.0))]
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        from PIL import Image

        out.append(("matplotlib:grace_hopper", np.asarray(Image.open(f).convert("RGB")), (174.0, 120.0, 356.0, 340.0)))
    return out


def _lfw_faces() -> np.ndarray:
    import skimage.data

    return skimage.data.lfw_subset()[:100]  # the first 100 of lfw_subset are faces, the rest are not


def _scene_from_photo(photo: np.ndarray, box) -> tuple[np.ndarray, np.ndarray]:
    """A SCENE x SCENE view of a colour photo with the face about 0.38 of the width, and the face box in it."""
    x0, y0, x1, y1 = box
    s = 0.38 * SCENE / max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    m = np.array([[s, 0, SCENE / 2 - s * cx], [0, s, SCENE * 0.45 - s * cy]], np.float32)
    scene = cv2.warpAffine(photo, m, (SCENE, SCENE), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT)
    fb = np.array([m[0, 0] * x0 + m[0, 2], m[1, 1] * y0 + m[1, 2], m[0, 0] * x1 + m[0, 2], m[1, 1] * y1 + m[1, 2]])
    return scene, fb


def _scene_from_lfw(face: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An LFW face (25x25 grey) enlarged, tinted like a colour photo, on a soft background of its own border."""
    g = (face * 255).astype(np.uint8)
    side = 112
    big = cv2.resize(g, (side, side), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    tint = np.array([1.0 + rng.uniform(0.08, 0.22), 1.0, 1.0 - rng.uniform(0.05, 0.2)], np.float32)  # skin-like
    rgb = np.clip(big[..., None] * tint * rng.uniform(0.9, 1.1), 0, 255).astype(np.uint8)
    pad = (SCENE - side) // 2
    scene = cv2.copyMakeBorder(rgb, pad, SCENE - side - pad, pad, SCENE - side - pad, cv2.BORDER_REPLICATE)
    scene = cv2.GaussianBlur(scene, (0, 0), 0.6)
    # the face fills the LFW crop but for a thin margin (measured with MTCNN: x 7-93 %, y 0-97 %)
    fb = np.array([pad + 0.08 * side, pad + 0.02 * side, pad + 0.92 * side, pad + 0.97 * side])
    return scene, fb


def _grain(scene: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fine static texture over the whole scene, like film grain and skin pores: real frames carry it everywhere;
    a face that went through a generator's lower resolution loses it inside the blend mask."""
    g = rng.normal(0, 1.0, scene.shape[:2]).astype(np.float32)
    g = cv2.GaussianBlur(g, (0, 0), GRAIN_SIZE)
    g = g / g.std() * GRAIN
    return np.clip(scene.astype(np.float32) + g[..., None], 0, 255).astype(np.uint8)


def identities(n: int, seed: int = 0) -> list[dict]:
    """`n` identities: the colour photos first, then LFW faces; each {name, scene, box}."""
    rng = np.random.default_rng(seed)
    out = []
    for name, photo, box in _colour_photos():
        scene, fb = _scene_from_photo(photo, box)
        out.append({"name": name, "scene": _grain(scene, rng), "box": fb})
    lfw = _lfw_faces()
    order = rng.permutation(len(lfw))
    for i in order:
        if len(out) >= n:
            break
        scene, fb = _scene_from_lfw(lfw[i], rng)
        out.append({"name": f"skimage:lfw_subset[{int(i)}]", "scene": _grain(scene, rng), "box": fb})
    if len(out) < n:
        raise ValueError(f"only {len(out)} packaged face photos are available; asked for {n} identities")
    return out[:n]


# ---------------------------------------------------------------- manipulations
def _soft_mask(shape, box, rng: np.random.Generator) -> np.ndarray:
    """A soft elliptical mask over the inner face (the region face-swap methods replace), values in [0, 1]."""
    h, w = shape[:2]
    x0, y0, x1, y1 = box
    fw, fh = x1 - x0, y1 - y0
    cx = (x0 + x1) / 2 + rng.uniform(-0.03, 0.03) * fw
    cy = y0 + fh * rng.uniform(0.52, 0.6)
    axes = (int(fw * rng.uniform(0.34, 0.44)), int(fh * rng.uniform(0.38, 0.48)))
    mask = np.zeros((h, w), np.float32)
    cv2.ellipse(mask, (int(cx), int(cy)), axes, rng.uniform(-8, 8), 0, 360, 1.0, -1)
    # elastic wobble of the outline, then a blur whose width varies as across blending methods
    dx = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 12) * fw * 0.6
    dy = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 12) * fh * 0.6
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    mask = cv2.remap(mask, (gx + dx).astype(np.float32), (gy + dy).astype(np.float32), cv2.INTER_LINEAR)
    sigma = max(1.0, fw * rng.uniform(0.02, 0.05))
    mask = cv2.GaussianBlur(mask, (0, 0), sigma)
    return np.clip(mask / max(mask.max(), 1e-6), 0, 1) * rng.uniform(0.9, 1.0)


def _colour_jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-channel gain and offset with a guaranteed minimum shift (a blend of identical colours hides nothing)."""
    gain = 1.0 + rng.choice([-1, 1], 3) * rng.uniform(0.08, 0.2, 3)
    offset = rng.choice([-1, 1]) * rng.uniform(10, 24) + rng.uniform(-6, 6, 3)
    return np.clip(img.astype(np.float32) * gain + offset, 0, 255)


def _resample(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A generator's output resolution: the face goes down to 1/2-1/3 of its size and comes back through a
    nearest-neighbour upsampling (the blocky, periodic pattern of transposed convolutions), lightly smoothed.
    The fine grain of the frame around it is lost."""
    h, w = img.shape[:2]
    f = rng.uniform(0.3, 0.5)
    small = cv2.resize(img, (max(8, int(w * f)), max(8, int(h * f))), interpolation=cv2.INTER_AREA)
    up = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
    return cv2.GaussianBlur(up, (0, 0), 0.6)


def self_blend(scene: np.ndarray, box, rng: np.random.Generator) -> np.ndarray:
    h, w = scene.shape[:2]
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    src = _resample(_colour_jitter(scene, rng), rng)
    # scale / shift / rotation jitter of the source face: misaligned facial features at the blend boundary
    s = rng.uniform(0.94, 1.06)
    m = cv2.getRotationMatrix2D((cx, cy), rng.uniform(-4, 4), s)
    m[:, 2] += rng.uniform(-0.04, 0.04, 2) * (x1 - x0)
    src = cv2.warpAffine(src, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    mask = _soft_mask(scene.shape, box, rng)[..., None]
    return np.clip(mask * src + (1 - mask) * scene.astype(np.float32), 0, 255).astype(np.uint8)


def face_swap(scene: np.ndarray, box, donor: np.ndarray, donor_box, rng: np.random.Generator) -> np.ndarray:
    h, w = scene.shape[:2]
    # map the donor's face box onto the target's (similarity transform from the two boxes)
    dx0, dy0, dx1, dy1 = donor_box
    x0, y0, x1, y1 = box
    sx, sy = (x1 - x0) / (dx1 - dx0), (y1 - y0) / (dy1 - dy0)
    m = np.array([[sx, 0, x0 - sx * dx0], [0, sy, y0 - sy * dy0]], np.float32)
    src = cv2.warpAffine(donor, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT).astype(np.float32)
    # partial colour transfer inside the face: swaps rarely match skin tone exactly
    ix0, iy0, ix1, iy1 = (int(v) for v in box)
    t = scene[iy0:iy1, ix0:ix1].reshape(-1, 3).astype(np.float32)
    d = src[iy0:iy1, ix0:ix1].reshape(-1, 3)
    k = rng.uniform(0.3, 0.75)
    matched = (src - d.mean(0)) / (d.std(0) + 1e-3) * t.std(0) + t.mean(0)
    src = k * matched + (1 - k) * src
    src = _resample(src, rng)
    mask = _soft_mask(scene.shape, box, rng)[..., None]
    return np.clip(mask * src + (1 - mask) * scene.astype(np.float32), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- camera
def camera_frames(scene: np.ndarray, n: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`n` frames of a virtual camera over the scene: smooth pan, zoom and small rotation, sensor noise."""
    h, w = scene.shape[:2]
    phase = rng.uniform(0, 2 * math.pi, 4)
    speed = rng.uniform(0.5, 1.5, 4)
    base_zoom = size / w * rng.uniform(1.0, 1.15)
    frames = []
    for t in range(n):
        u = t / 25.0
        zoom = base_zoom * (1 + 0.06 * math.sin(speed[0] * u * 2 + phase[0]))
        angle = 3.0 * math.sin(speed[1] * u * 1.5 + phase[1])
        tx = 0.04 * size * math.sin(speed[2] * u * 1.7 + phase[2])
        ty = 0.03 * size * math.sin(speed[3] * u * 1.3 + phase[3])
        m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, zoom)
        m[:, 2] += (size / 2 - w / 2 + tx, size / 2 - h / 2 + ty)
        frame = cv2.warpAffine(scene, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        noise = rng.normal(0, 2.0, frame.shape).astype(np.float32)
        frames.append(np.clip(frame.astype(np.float32) + noise, 0, 255).astype(np.uint8))
    return frames


# ---------------------------------------------------------------- the dataset
def split_pairs(n: int) -> dict[str, list[list[str]]]:
    """Ids 000..n-1 paired (2k, 2k+1); 1/8 of the pairs (at least one) for val and for test, the rest train."""
    if n < 6 or n % 2:
        raise ValueError(f"the sample dataset needs an even number of identities >= 6, got {n}")
    ids = [f"{i:03d}" for i in range(n)]
    pairs = [[ids[2 * k], ids[2 * k + 1]] for k in range(n // 2)]
    k = max(1, round(len(pairs) / 8))
    return {"train": pairs[: len(pairs) - 2 * k], "val": pairs[len(pairs) - 2 * k: len(pairs) - k],
            "test": pairs[len(pairs) - k:]}


VIDEO_DIRS = {"real": Path("original_sequences/youtube/c23/videos"),
              **{m: Path(f"manipulated_sequences/{m}/c23/videos") for m in FAKE_METHODS}}


def _plan(n_identities: int) -> list[tuple[str, Path, int, int]]:
    """Every video of the sample as (method, path relative to the root, target id, source id), in writing order."""
    out = [("real", VIDEO_DIRS["real"] / f"{i:03d}.mp4", i, i) for i in range(n_identities)]
    for pairs in split_pairs(n_identities).values():
        for a, b in pairs:
            for t, s in ((a, b), (b, a)):
                out += [(m, VIDEO_DIRS[m] / f"{t}_{s}.mp4", int(t), int(s)) for m in FAKE_METHODS]
    return out


def _settings(n_identities: int, length: int, frame_size: int, seed: int, crf: int) -> dict:
    """What decides the videos' bytes (SOURCES.json): a rerun with other values must not resume into the folder."""
    return {"identities_count": n_identities, "length": length, "frame_size": frame_size, "seed": seed, "crf": crf,
            "methods": list(FAKE_METHODS),
            # X264_OPTIONS name the architecture's way to the C code's bytes (asm=SSE2 or asm=0): the record does not
            "encoder": {"codec": "libx264", "preset": "fast", "pix_fmt": "yuv420p", "fps": 25, "threads": 1,
                        "simd": "C-exact"}}


def _check_resume(sources: Path, mine: dict) -> None:
    if not sources.is_file():
        return
    try:
        old = json.loads(sources.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{sources}: not valid JSON ({exc}); remove {sources.parent} to rebuild the sample") from None
    diff = [f"{k}: {old.get(k)} -> {v}" for k, v in mine.items() if old.get(k) != v]
    if diff:
        raise ValueError(f"{sources.parent} holds a sample built with other settings ({'; '.join(diff)}); its videos "
                         f"would mix with new ones: choose another --out or remove {sources.parent}")


def videos_digest(root: str | Path, paths: list[Path]) -> str:
    """sha256 over `<relative path> <sha256 of the file>` lines, in the given order: one name for the whole set of
    videos, the same for any two byte-identical builds."""
    h = hashlib.sha256()
    for rel in paths:
        h.update(f"{rel.as_posix()} {sha256_file(Path(root) / rel)}\n".encode())
    return h.hexdigest()


def build_sample(out: str | Path, n_identities: int = 48, length: int = 32, frame_size: int = 192,
                 seed: int = 0, crf: int = 23) -> dict:
    """Write the sample dataset under `out`; returns a summary with the videos' digest.

    Existing videos are kept (a rerun resumes): every video draws from its own generator, keyed by (seed, target,
    source, method), and x264 runs with `X264_OPTIONS`, so a resumed build equals one built straight through, byte
    for byte. A folder built with other settings is refused.
    """
    out = Path(out)
    plan = _plan(n_identities)  # checks the identity count before anything is written
    mine = _settings(n_identities, length, frame_size, seed, crf)
    _check_resume(out / "SOURCES.json", mine)
    people = identities(n_identities, seed)
    record = {**mine, "identities": {f"{i:03d}": p["name"] for i, p in enumerate(people)}}
    write_json_atomic(out / "SOURCES.json", record)  # first: a resumed run checks its settings against it
    for d in VIDEO_DIRS.values():  # videos a killed run left half-written
        for tmp in (out / d).glob(".*.tmp*.mp4"):
            tmp.unlink()
    written = 0
    for method, rel, t, s in plan:
        path = out / rel
        if path.exists():
            continue
        target = people[t]
        scene = target["scene"]
        if method != "real":
            frng = np.random.default_rng([seed, t, s, FAKE_METHODS.index(method)])
            if method == "SelfBlend":
                scene = self_blend(scene, target["box"], frng)
            else:
                scene = face_swap(scene, target["box"], people[s]["scene"], people[s]["box"], frng)
        # the camera of the target's real video: a fake and its real differ only in the face
        cam = np.random.default_rng(seed * 100003 + t)
        write_video(path, camera_frames(scene, length, frame_size, cam), crf=crf)
        written += 1
    for name, pairs in split_pairs(n_identities).items():
        write_json_atomic(out / "splits" / f"{name}.json", pairs)
    digest = videos_digest(out, [rel for _, rel, _, _ in plan])
    write_json_atomic(out / "SOURCES.json", {**record, "videos": len(plan), "digest": digest})
    log.info("sample dataset in %s: %d identities, %d videos (%d written now), digest %s", out, n_identities,
             len(plan), written, digest)
    return {"root": str(out), "identities": n_identities, "videos": len(plan), "videos_written": written,
            "digest": digest, "splits": {k: len(v) for k, v in split_pairs(n_identities).items()}}
