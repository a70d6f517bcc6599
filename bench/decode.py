"""The GPU check's decode and agree legs: the two decode paths (nvJPEG against DALI's CPU decoder with CUDA, DALI's
CPU decoder against the reference loader's PIL without) timed over the same shards, and their pixels compared per
perturbation type against stated tolerances (docs/gpu-check.md). bench/gpu.py runs them; tests/test_gpu_check.py plants
a difference to see the agreement fail.
"""

from __future__ import annotations

import itertools
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from checkdata import with_overrides  # bench/checkdata.py (bench/ is on sys.path, as for every bench script)

from ltm.config import Config

# The agree leg: per type (largest absolute pixel difference, mean absolute difference), in levels 0-255, that two
# decode paths may differ by over the same crops, stored at the loader's size (no resize). "clean": no perturbation;
# "clean420": clean decode of 4:2:0 JPEGs (prep writes 4:4:4; other tools write 4:2:0); the per-crop types of
# ltm.data.perturb at levels 1 and 5, the worse level counting. Video compression is left out: it runs on the host
# (PyAV) before either pipeline, which receive the same decoded frames.
AGREE_LEVELS = (1, 5)
AGREE_SAMPLES = 256  # crops per agreement split at GPU sizes (the CPU mode's `samples` below that)
AGREE_TOLERANCE: dict[str, dict[str, tuple[int, float]]] = {
    # Measured on the CPU (tests/test_perturb_loaders.py holds the same bounds): DALI's CPU decoder and PIL are both
    # libjpeg-turbo with fancy upsampling (0 difference, also for 4:2:0); DALI's CPU JPEG distortion is a real
    # libjpeg-turbo encode/decode as PIL's (0); saturation and noise round at .5 differently (1 / < 0.001); blur
    # and pixelate differ by OpenCV's 8-bit fixed-point weights (2 / 0.104, 2 / 0.246).
    "cpu vs reference": {"clean": (0, 0.0), "clean420": (0, 0.0), "saturation": (1, 0.01), "contrast": (0, 0.0),
                         "block": (0, 0.0), "noise": (1, 0.01), "blur": (2, 0.15), "pixelate": (2, 0.3),
                         "jpeg": (0, 0.0)},
    # Not yet measured (no GPU so far; docs/gpu.md "What the GPU run must still confirm"). nvJPEG's inverse DCT
    # differs from libjpeg-turbo's integer one by a level or two at some pixels (DALI's own test holds its mixed
    # decoder with fancy upsampling to a mean of 1 level against its CPU decoder): clean (6, 1.0); 4:2:0 adds the
    # chroma upsampling's rounding (8, 1.0). The per-crop types run the same DALI operators on both backends (their
    # CUDA and CPU kernels round alike within a level) on images that already differ by the decode's amount, so
    # they get the decode's bound plus one level. jpeg is the exception: on the GPU, fn.jpeg_compression_distortion
    # is DALI's CUDA emulation of JPEG's lossy steps (YCbCr, 4:2:0 chroma averaging, 8x8 float DCT, quantisation
    # with the quality's tables, back), not a libjpeg encode/decode as on the CPU: at quality 10 its float DCT and
    # chroma handling move pixels near block and colour edges by tens of levels, so its bound is wide (64, 4.0).
    "mixed vs cpu": {"clean": (6, 1.0), "clean420": (8, 1.0), "saturation": (7, 1.0), "contrast": (7, 1.0),
                     "block": (7, 1.0), "noise": (7, 1.0), "blur": (7, 1.0), "pixelate": (7, 1.0),
                     "jpeg": (64, 4.0)},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_pass(loader, device: torch.device) -> tuple[float, int, list[str], list[float]]:
    """(steady seconds, images after the first batch, keys, labels) of one pass over an eval loader."""
    keys, labels, n, first = [], [], 0, None
    for batch in loader:
        sync(device)
        if first is None:
            first = time.perf_counter()
        else:
            n += len(batch["keys"])
        keys += batch["keys"]
        labels += batch["labels"].cpu().tolist()
    sync(device)
    return time.perf_counter() - (first or time.perf_counter()), n, keys, labels


# the decode paths compared: config overrides of each
DECODE_PATHS = {"mixed": ["data.loader=dali", "data.device=gpu"], "cpu": ["data.loader=dali", "data.device=cpu"],
                "reference": ["data.loader=reference"]}


def decode_pair(cuda: bool) -> tuple[str, str]:
    """The two decode paths compared: nvJPEG (`mixed`) against DALI's CPU decoder with CUDA; without CUDA (no
    nvJPEG) the same code compares DALI's CPU decoder with the reference loader's PIL decode."""
    return ("mixed", "cpu") if cuda else ("cpu", "reference")


def eval_loader(cfg: Config, path: str, split: Path, device: torch.device, batch: int, extra: list[str] = ()):
    """The eval loader of decode path `path` over `split`; refuses a loader that fell back to another kind (DALI
    missing), which would compare one path with itself."""
    from ltm.data import build_eval_loader

    loader = build_eval_loader(with_overrides(cfg, [*DECODE_PATHS[path], *extra]), [split], 0, 1, device, batch)
    got = "reference" if loader.kind == "reference" else getattr(loader, "decode", loader.kind)
    if got != path:
        raise RuntimeError(f"decode path {path!r} asked, the loader built {got!r}: nothing would be compared")
    return loader


def pixels(batch: dict) -> torch.Tensor:
    """An eval batch's images as integer levels 0-255 on the CPU (the loaders hand out floats in [0, 1])."""
    return (batch["images"].float().cpu() * 255.0).round().to(torch.int16)


def compare_loaders(a: Any, b: Any, plant: int = 0) -> dict:
    """Two eval loaders over the same samples: the largest and the mean absolute pixel difference (levels 0-255),
    the images compared, and whether both gave the same keys and labels in the same order (a difference stops the
    comparison). `plant` levels are added to b's pixels: the fault the tests plant to see the check fail."""
    largest, total, count, images, same = 0, 0.0, 0, 0, True
    for x, y in itertools.zip_longest(a, b):
        if x is None or y is None or x["keys"] != y["keys"] or not torch.equal(x["labels"].cpu(), y["labels"].cpu()):
            same = False
            break
        d = (pixels(x) - (pixels(y) + plant)).abs()
        largest, total = max(largest, int(d.max())), total + float(d.sum(dtype=torch.float64))
        count, images = count + d.numel(), images + len(x["keys"])
    return {"max": largest, "mean": total / count if count else 0.0, "images": images, "same_keys": same}


def decode_check(cfg: Config, split: Path, cuda: bool, batch: int, passes: int,
                 threads_also: int | None = None) -> dict:
    """Images/s of both decode paths (and of the DALI ones at `threads_also` threads), their order and pixels."""
    device = torch.device("cuda") if cuda else torch.device("cpu")
    a, b = decode_pair(cuda)
    out: dict[str, Any] = {"decode_threads": cfg.data.num_threads}
    loaders, orders = {}, {}
    for kind in (a, b):
        loaders[kind] = eval_loader(cfg, kind, split, device, batch)
        runs = [decode_pass(loaders[kind], device) for _ in range(passes)]
        out[f"decode_{kind}_images_per_s"] = round(statistics.median(n / s for s, n, _, _ in runs if s > 0), 1)
        orders[kind] = (runs[-1][2], runs[-1][3])
    for kind in (a, b):
        if threads_also and threads_also != cfg.data.num_threads and kind != "reference":
            loader = eval_loader(cfg, kind, split, device, batch, [f"data.num_threads={threads_also}"])
            runs = [decode_pass(loader, device) for _ in range(passes)]
            out[f"decode_{kind}_images_per_s_at_{threads_also}_threads"] = round(
                statistics.median(n / s for s, n, _, _ in runs if s > 0), 1)
            del loader
    out["decode_pair"] = f"{a} vs {b}"
    diff = compare_loaders(loaders[a], loaders[b])
    out["decode_same_keys_and_labels"] = orders[a] == orders[b] and diff["same_keys"]
    out["decode_max_pixel_diff"] = diff["max"]
    out["decode_mean_pixel_diff"] = round(diff["mean"], 4)
    out["decode_images"] = sum(len(src) for src in loaders[a].sources)
    return out


# ------------------------------------------------------------------------------------------------ 2b. agree


def decode_agreement(cfg: Config, splits: dict[str, Path], cuda: bool, batch: int, kinds: list[str] | None = None,
                     levels: tuple[int, ...] = AGREE_LEVELS, plant: int = 0) -> dict:
    """GPU against CPU decode per perturbation type: each type of AGREE_TOLERANCE (or `kinds`) through both decode
    paths of `decode_pair` over the same crops (`splits["444"]`, and `splits["420"]` for clean420), the largest and
    mean absolute pixel difference of the worse level, and each held to its tolerance. `plant`: see
    compare_loaders. Figures: agree_<type>_max_diff / _mean_diff, agree_within_tolerance, agree_outside (the types
    over their bound, or whose keys or labels differed)."""
    device = torch.device("cuda") if cuda else torch.device("cpu")
    a, b = decode_pair(cuda)
    pair = f"{a} vs {b}"
    tolerance = AGREE_TOLERANCE[pair]
    out: dict[str, Any] = {"agree_pair": pair, "agree_levels": list(levels)}
    outside = []
    for kind in kinds or list(tolerance):
        if kind.startswith("clean"):
            cases = [(splits["420" if kind == "clean420" else "444"], [])]
        else:
            cases = [(splits["444"], [f"eval.perturb={kind}:{level}"]) for level in levels]
        largest, mean, same, images = 0, 0.0, True, 0
        for folder, extra in cases:
            r = compare_loaders(eval_loader(cfg, a, folder, device, batch, extra),
                                eval_loader(cfg, b, folder, device, batch, extra), plant)
            largest, mean = max(largest, r["max"]), max(mean, r["mean"])
            same, images = same and r["same_keys"] and r["images"] > 0, images + r["images"]
        bound, mean_bound = tolerance[kind]
        out[f"agree_{kind}_max_diff"], out[f"agree_{kind}_mean_diff"] = largest, round(mean, 4)
        if not (same and largest <= bound and mean <= mean_bound):
            outside.append(kind)
    out["agree_within_tolerance"], out["agree_outside"] = not outside, outside
    return out


def agreement_targets(fig: dict) -> dict[str, tuple[str, float]]:
    """The agree leg's figures' targets (the tolerances of the pair it compared), as TARGETS holds the others."""
    tolerance = AGREE_TOLERANCE.get(fig.get("agree_pair", ""), {})
    out: dict[str, tuple[str, float]] = {}
    for kind, (bound, mean_bound) in tolerance.items():
        if f"agree_{kind}_max_diff" in fig:
            out[f"agree_{kind}_max_diff"] = ("<=", bound)
            out[f"agree_{kind}_mean_diff"] = ("<=", mean_bound)
    return out
