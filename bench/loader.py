"""Loader throughput: the DALI CPU pipeline vs the reference loader (PIL + DataLoader) vs a bare PIL loop.

Writes a few thousand 224x224 JPEG (q95, 4:4:4, as data_prep writes them) face crops cut with random jitter from
the real photos in ../shared/data/faces (scikit-image's astronaut where that folder is absent) into shards through
`data_prep.shards`, in three training sources weighted 2:1:1 and one eval folder. Then, interleaved over several
rounds, images/s of:

  dali_train       DALI train loader: weighted sources, `state_dict()` taken every batch (resumable state)
  dali_eval        DALI eval loader: keys, videos, methods from every sample's `json` / source info
  reference_train  webdataset/PIL reference loader, DataLoader with as many workers as cores
  reference_eval   the same for eval
  bare             one process decoding + converting to float CHW with PIL, no loader; times the core count

Last line: one JSON object with the raw figures, "ratio" (DALI train / reference train, target 3.0) and
"ratio_vs_bare" (DALI train / bare loop scaled to the cores, target 0.9).

    .venv/bin/python bench/loader.py [--images 3000] [--rounds 3] [--batch 32] [--root DIR]
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.shards import jpeg_bytes, write_shards  # noqa: E402
from ltm.config import load_config  # noqa: E402
from ltm.data import build_eval_loader, build_train_loader  # noqa: E402

FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"
SIZE = 224
LOADER = {"dali_train": "dali", "dali_eval": "dali", "ref_train": "reference", "ref_eval": "reference"}
SOURCES = {"real": (0, 2.0), "Deepfakes": (1, 1.0), "FaceSwap": (1, 1.0)}


def _photos() -> list[np.ndarray]:
    photos = []
    for p in sorted(FACES.glob("*")) if FACES.is_dir() else []:
        try:
            with Image.open(p) as im:
                if min(im.size) >= 128:
                    photos.append(np.asarray(im.convert("RGB")))
        except OSError:
            continue
    if not photos:
        from skimage import data

        photos = [data.astronaut()]
    return photos


def _crops(n: int, seed: int):
    """Square crops around the centre of real portraits (scale and position jitter), resized to 224, JPEG q95."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    for i in range(n):
        img = photos[int(rng.integers(len(photos)))]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.35, 0.8))
        cy = int(h / 2 + rng.uniform(-0.15, 0.15) * (h - side))
        cx = int(w / 2 + rng.uniform(-0.15, 0.15) * (w - side))
        y0, x0 = max(0, min(h - side, cy - side // 2)), max(0, min(w - side, cx - side // 2))
        crop = Image.fromarray(img[y0 : y0 + side, x0 : x0 + side]).resize((SIZE, SIZE), Image.BILINEAR)
        yield i, jpeg_bytes(np.asarray(crop), quality=95)


def write_dataset(root: Path, n: int) -> list[bytes]:
    per = n // (len(SOURCES) + 1)
    jpgs = []
    for s, (method, (label, _)) in enumerate([*SOURCES.items(), ("eval", (0, 0))]):
        folder = root / "bench" / ("test/real" if method == "eval" else f"train/{method}")
        if folder.is_dir() and any(folder.glob("*.tar")):
            continue
        samples = []
        for i, jpg in _crops(per, seed=s):
            video = f"{method}_{i // 10:04d}"
            meta = {"video": video, "frame": i % 10, "label": label, "method": method if label else "real"}
            samples.append({"__key__": f"{video}-{i % 10:06d}", "jpg": jpg, "cls": label, "json": meta})
            jpgs.append(jpg)
        write_shards(samples, folder, f"bench-{method}", max_samples=500)
    return jpgs


def _cfg(root: Path, loader: str, batch: int, threads: int):
    train = ", ".join(f"{{path: bench/train/{m}, weight: {w}}}" for m, (_, w) in SOURCES.items())
    return load_config(
        None,
        [
            f"data.root={root}",
            f"data.loader={loader}",
            f"data.image_size={SIZE}",
            f"data.num_threads={threads}",
            "data.device=cpu",
            f"data.train=[{train}]",
            f"train.batch_size={batch}",
        ],
    )


def cpu_seconds(pids: list[int] = ()) -> float:
    """CPU time of this process (all its threads), of its finished children, and of the running processes `pids`."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def _worker_pids(loader) -> list[int]:
    # the reference loader's DataLoader workers (a private attribute; measured while they run)
    it = getattr(loader, "_it", None)
    return [w.pid for w in getattr(it, "_workers", [])] if loader.kind == "reference" else []


def time_train(cfg, images: int, device: str = "cpu") -> tuple[float, float]:
    """(images per wall second, images per CPU second) over the timed batches, after a warm-up."""
    loader = build_train_loader(cfg, 0, 1, device)
    for _ in range(3):  # warm-up: pipeline build, shuffle buffer fill, worker start
        next(loader)
    pids = _worker_pids(loader)
    n, t, c = 0, time.perf_counter(), cpu_seconds(pids)
    while n < images:
        x, _ = next(loader)
        if device != "cpu":
            torch.cuda.synchronize()
        loader.state_dict()  # what a checkpointing run pays
        n += x.shape[0]
    wall, cpu = time.perf_counter() - t, cpu_seconds(pids) - c
    loader.close()
    del loader, x
    gc.collect()
    return n / wall, n / cpu


def time_eval(cfg, batch: int) -> tuple[float, float]:
    loader = build_eval_loader(cfg, ["bench/test"], 0, 1, "cpu", batch)
    n, t, c = 0, time.perf_counter(), cpu_seconds()
    for b in loader:
        n += len(b["keys"])
    wall = time.perf_counter() - t
    assert n == loader.num_samples, "eval loader lost samples"
    del loader, b
    gc.collect()
    time.sleep(0.5)
    return n / wall, n / (cpu_seconds() - c)


def time_bare(jpgs: list[bytes], images: int) -> tuple[float, float]:
    n, t, c = 0, time.perf_counter(), cpu_seconds()
    while n < images:
        for data in jpgs[: images - n]:
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert("RGB")
                if im.size != (SIZE, SIZE):
                    im = im.resize((SIZE, SIZE), Image.BILINEAR)
                torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div_(255.0)
            n += 1
    return n / (time.perf_counter() - t), n / (cpu_seconds() - c)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=3000, help="JPEG crops written (split over 4 folders)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--measure", type=int, default=1500, help="images timed per loader per round")
    ap.add_argument("--root", type=Path, default=None, help="shard folder to keep (default: a temp folder)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(1)
    tmp = None
    root = args.root
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="ltm-bench-loader-")
        root = Path(tmp.name)
    t = time.perf_counter()
    jpgs = write_dataset(root, args.images)
    print(f"wrote {args.images} crops of {SIZE}x{SIZE} (q95) in {time.perf_counter() - t:.1f}s under {root}")
    if not jpgs:  # reused root: read some JPEGs back for the bare loop
        from data_prep.shards import read_shard

        jpgs = [s["jpg"] for tar in sorted((root / "bench/test/real").glob("*.tar")) for s in read_shard(tar)]

    names: tuple[str, ...] = ("dali_train", "ref_train", "bare", "dali_eval", "ref_eval")
    if torch.cuda.is_available():  # nvJPEG ("mixed") decode where a GPU is present
        names += ("dali_mixed_train",)
    runs: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.rounds):
        for name in names:
            if name == "dali_mixed_train":
                cfg = _cfg(root, "dali", args.batch, cores)
                cfg.data.device = "gpu"
                wall, per_cpu = time_train(cfg, args.measure, "cuda")
            elif name == "bare":
                wall, per_cpu = time_bare(jpgs, min(args.measure, len(jpgs)))
            elif name.endswith("train"):
                wall, per_cpu = time_train(_cfg(root, LOADER[name], args.batch, cores), args.measure)
            else:
                wall, per_cpu = time_eval(_cfg(root, LOADER[name], args.batch, cores), args.batch)
            runs[name].append(wall)
            cpu[name].append(per_cpu)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in runs.items()), flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    bare_scaled = med["bare"] * cores
    print(
        f"\n{'images/s, median of ' + str(args.rounds):<36}{'train':>8}{'eval':>8}{'train/CPU-s':>13}{'eval/CPU-s':>12}"
    )
    rows = [("DALI CPU (weighted, resumable)", "dali"), (f"reference, {cores} DataLoader workers", "ref")]
    for label, k in rows:
        print(
            f"{label:<36}{med[k + '_train']:>8.0f}{med[k + '_eval']:>8.0f}"
            f"{med_cpu[k + '_train']:>13.0f}{med_cpu[k + '_eval']:>12.0f}"
        )
    print(f"{'bare PIL loop x ' + str(cores) + ' cores':<36}{bare_scaled:>8.0f}{'':>8}{med_cpu['bare']:>13.0f}")
    ratio = med["dali_train"] / med["ref_train"]
    ratio_bare = med["dali_train"] / bare_scaled
    ratio_cpu = med_cpu["dali_train"] / med_cpu["ref_train"]
    ratio_bare_cpu = med_cpu["dali_train"] / med_cpu["bare"]
    print(
        f"DALI / reference: train {ratio:.2f}x, eval {med['dali_eval'] / med['ref_eval']:.2f}x, "
        f"per CPU-second {ratio_cpu:.2f}x (target >= 3.0)"
    )
    print(
        f"DALI / bare loop: train {ratio_bare:.2f}x, eval {med['dali_eval'] / bare_scaled:.2f}x, "
        f"per CPU-second {ratio_bare_cpu:.2f}x (target >= 0.9)"
    )
    load = os.getloadavg()[0]
    if load > cores:
        print(
            f"note: load average {load:.1f} on {cores} cores: other processes share the CPU; the per-CPU-second "
            "figures are the fairer comparison"
        )
    result = {
        "cores": cores,
        "batch": args.batch,
        "images": args.images,
        "load_avg": round(load, 2),
        "dali_train_img_s": round(med["dali_train"], 1),
        "dali_eval_img_s": round(med["dali_eval"], 1),
        "reference_train_img_s": round(med["ref_train"], 1),
        "reference_eval_img_s": round(med["ref_eval"], 1),
        "bare_pil_img_s_one_core": round(med["bare"], 1),
        "bare_pil_img_s_scaled": round(bare_scaled, 1),
        "img_per_cpu_s": {k: round(v, 1) for k, v in med_cpu.items()},
        "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "ratio": round(ratio, 3),
        "target": 3.0,
        "ratio_vs_bare": round(ratio_bare, 3),
        "target_vs_bare": 0.9,
        "ratio_per_cpu_s": round(ratio_cpu, 3),
        "ratio_vs_bare_per_cpu_s": round(ratio_bare_cpu, 3),
    }
    if "dali_mixed_train" in med:
        print(f"DALI mixed (nvJPEG) decode, train: {med['dali_mixed_train']:.0f} images/s")
        result["dali_mixed_train_img_s"] = round(med["dali_mixed_train"], 1)
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
