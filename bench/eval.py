"""Evaluation throughput: the real `ltm eval` scoring path against forward-only on the same batches.

The eval path is what `ltm.eval.evaluate.evaluate` runs per data folder: the eval loader (shard reading, JPEG decode,
resize, batching, device copy), `model.predict`, the row bookkeeping and the exactly-once gather, and the metrics.
Forward-only runs `model.predict` over the very same batches, already decoded and in memory (no loader). Both are
timed interleaved (eval, forward, eval, forward, ...) so machine noise hits both alike. The loader should hide
behind the model: target eval images/s >= 0.9 x forward-only images/s.

Shards: `--data <shard folder>` (e.g. sample/shards/ffpp_c23/test after `make demo`), or by default a temporary
split written with data_prep's shard writer from the real face photos in ../shared/data/faces.

    python bench/eval.py                                   # tiny-cpu LTM, 112 px, reference loader on CPU
    python bench/eval.py --data sample/shards/ffpp_c23/test
    python bench/eval.py --config paper --device cuda --loader dali --samples 2048
    python bench/eval.py --perturb all --rounds 3 --samples 256   # + every perturbation type, both loaders

With `--perturb` every round also scores the folder under each perturbation (`all`: every type at level 3), with
each loader (`--loader both`, the default then), and prints each perturbed evaluation's time over the clean one's
of the same rounds: the target is <= 1.25, except video compression (H.264 re-encoding on the host), which is
measured and stated.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ltm.config import load_config
from ltm.eval.evaluate import gather_rows, score_folder, scoring_accelerator
from ltm.eval.metrics import compute_metrics
from ltm.models import build_model

FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"


def write_face_shards(root: Path, samples: int, size: int) -> Path:
    """`<root>/bench/test/{real,fake}` shards of real face photos, center-cropped (labels alternate, by folder).

    Each video is 8 frames of one photo drifting sideways by a pixel a frame, so that video compression encodes
    something like a clip and not a cut on every frame."""
    from PIL import Image

    from data_prep.shards import jpeg_bytes, write_shards

    photos = sorted(p for p in FACES.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not photos:
        raise SystemExit(f"no face photos in {FACES}; pass --data <shard folder>")
    crops = []
    for p in photos[: min(len(photos), 128)]:
        img = Image.open(p).convert("RGB")
        s = min(img.size)
        left, top = (img.width - s) // 2, (img.height - s) // 2
        crops.append(np.asarray(img.crop((left, top, left + s, top + s)).resize((size, size))))
    by_method: dict[str, list[dict]] = {"real": [], "fake": []}
    for i in range(samples):
        method = "fake" if i % 2 else "real"
        v, frame = divmod(i // 2, 8)
        video = f"{method}{v:04d}"
        pixels = np.roll(crops[(2 * v + i % 2) % len(crops)], frame, axis=1)
        by_method[method].append({"__key__": f"{video}-{frame:06d}", "jpg": jpeg_bytes(pixels), "cls": int(i % 2),
                                  "json": {"dataset": "bench", "split": "test", "video": video, "frame": frame,
                                           "label": i % 2, "method": method}})
    for method, items in by_method.items():
        folder = root / "bench" / "test" / method
        folder.mkdir(parents=True, exist_ok=True)
        write_shards(items, folder, f"bench-test-{method}", max_samples=256)
    return root / "bench" / "test"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def eval_throughput(model: torch.nn.Module, cfg, folder: Path, accelerator, batch: int, rounds: int,
                    perturb: list[str] | tuple[str, ...] = ()) -> dict:
    """`ltm eval`'s scoring path against forward-only on the same batches, timed interleaved (median of rounds);
    with `perturb` specs, each round also scores the folder under every one of them, so that every perturbed
    evaluation's time is compared with the clean evaluation's of the same rounds (`perturbed_over_clean_time`).

    All passes run under the accelerator's autocast (bf16 on CUDA for a bf16 config), as `ltm eval` does.
    """
    import dataclasses

    from ltm.data import build_eval_loader

    device = accelerator.device

    def eval_path(setting=cfg) -> tuple[float, int]:
        sync(device)
        start = time.perf_counter()
        rows, _, counts = score_folder(model, setting, folder, accelerator, batch)
        rows = gather_rows(rows, counts)
        compute_metrics([r.video for r in rows], [r.method for r in rows], [r.label for r in rows],
                        [r.score for r in rows], cfg.eval.video_agg)
        sync(device)
        return time.perf_counter() - start, len(rows)

    # the same batches, decoded once and kept in memory on the device
    batches = [b["images"] for b in build_eval_loader(cfg, [folder], accelerator.process_index,
                                                      accelerator.num_processes, device, batch)]
    n_images = sum(len(b) for b in batches)

    def forward_only() -> float:
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode(), accelerator.autocast():
            for images in batches:
                model.predict(images).float().cpu()
        sync(device)
        return time.perf_counter() - start

    def loader_only(setting) -> float:  # the data path alone: read, decode, perturb, resize, batch
        sync(device)
        start = time.perf_counter()
        for b in build_eval_loader(setting, [folder], accelerator.process_index, accelerator.num_processes, device,
                                   batch):
            b["images"].sum()
        sync(device)
        return time.perf_counter() - start

    settings = {spec: dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, perturb=spec)) for spec in perturb}
    eval_path()  # warm-up: worker start, allocator, first-call costs
    forward_only()
    for setting in settings.values():  # and each perturbation's first pipeline build
        eval_path(setting)
    eval_s, fwd_s = [], []
    pert_s: dict[str, list[float]] = {spec: [] for spec in settings}
    load_s: dict[str | None, list[float]] = {spec: [] for spec in [None, *settings]}
    for _ in range(rounds):
        seconds, n = eval_path()
        assert n == n_images, f"eval scored {n} images, the loader gave {n_images}"
        eval_s.append(seconds)
        fwd_s.append(forward_only())
        for spec, setting in settings.items():
            pert_s[spec].append(eval_path(setting)[0])
        if settings:
            load_s[None].append(loader_only(cfg))
            for spec, setting in settings.items():
                load_s[spec].append(loader_only(setting))
    eval_ips = n_images / statistics.median(eval_s)
    fwd_ips = n_images / statistics.median(fwd_s)
    out = {"images": n_images, "eval_s": eval_s, "forward_s": fwd_s, "eval_images_per_s": round(eval_ips, 2),
           "forward_images_per_s": round(fwd_ips, 2), "ratio": round(eval_ips / fwd_ips, 4)}
    if settings:  # each perturbed evaluation's time over the clean one's (target <= 1.25; video: the exception)
        out["perturbed_s"] = pert_s
        out["perturbed_over_clean_time"] = {spec: round(statistics.median(t) / statistics.median(eval_s), 4)
                                            for spec, t in pert_s.items()}
        # the data path alone (no model), clean and perturbed: what a perturbation costs before the model hides it
        out["loader_s"] = {spec or "clean": round(statistics.median(t), 4) for spec, t in load_s.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny-cpu")
    parser.add_argument("--data", default=None, help="shard folder to score (default: temporary face shards)")
    parser.add_argument("--samples", type=int, default=512, help="samples in the temporary shards")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--loader", default=None,
                        help="dali | reference | both (default: both with --perturb; else dali with CUDA, "
                             "reference without)")
    parser.add_argument("--perturb", metavar="TYPE:LEVEL", action="append", default=[],
                        help="also time `ltm eval --perturb` (repeatable; `all`: every type at level 3)")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from ltm.data.perturb import LEVELS

    specs = [f"{k}:3" for k in LEVELS] if args.perturb == ["all"] else args.perturb
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.loader == "both" or (args.loader is None and specs):
        loaders = ["dali", "reference"]
    else:
        loaders = [args.loader or ("dali" if cuda else "reference")]
    cfgs = {name: load_config(args.config, [f"data.loader={name}", "eval.attention_samples=0", *args.overrides])
            for name in loaders}
    cfg = cfgs[loaders[0]]
    tmp = tempfile.TemporaryDirectory(prefix="ltm-bench-eval-")
    folder = Path(args.data) if args.data else write_face_shards(Path(tmp.name), args.samples, cfg.data.image_size)
    results = {}
    with scoring_accelerator(cfg.train.precision, "cuda" if cuda else "cpu") as accelerator:
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.data.image_size).to(accelerator.device).eval()
        for name in loaders:
            results[name] = eval_throughput(model, cfgs[name], folder, accelerator, args.batch, args.rounds, specs)
        device = accelerator.device

    r = results[loaders[0]]
    print(f"model {cfg.model.kind} {cfg.model.backbone} at {cfg.data.image_size} px, batch {args.batch}, "
          f"{r['images']} images from {folder}, device {device}, {torch.get_num_threads()} torch threads, "
          f"{args.rounds} interleaved rounds (median)")
    print(f"{'loader':<11}{'path':<14}{'median s':>10}{'images/s':>12}{'eval / forward':>16}")
    for name, res in results.items():
        print(f"{name:<11}{'ltm eval':<14}{statistics.median(res['eval_s']):>10.3f}"
              f"{res['eval_images_per_s']:>12.1f}{res['ratio']:>16.3f}")
        print(f"{'':<11}{'forward only':<14}{statistics.median(res['forward_s']):>10.3f}"
              f"{res['forward_images_per_s']:>12.1f}")
    print("target: eval / forward-only >= 0.9")
    perturbed = {spec: {name: res["perturbed_over_clean_time"][spec] for name, res in results.items()}
                 for spec in specs}
    loader_s = {name: res.get("loader_s", {}) for name, res in results.items()}
    if specs:
        print("\nperturbed evaluation time / clean evaluation time (same rounds; target <= 1.25, video compression "
              "the stated exception), and the loader alone (no model), median seconds:")
        print(f"{'--perturb':<14}" + "".join(f"{name:>11}" for name in loaders)
              + "".join(f"{name + ' data s':>18}" for name in loaders))
        print(f"{'(clean)':<14}" + "".join(f"{1.0:>11.3f}" for _ in loaders)
              + "".join(f"{loader_s[name]['clean']:>18.3f}" for name in loaders))
        for spec, by_loader in perturbed.items():
            print(f"{spec:<14}" + "".join(f"{by_loader[name]:>11.3f}" for name in loaders)
                  + "".join(f"{loader_s[name][spec]:>18.3f}" for name in loaders)
                  + ("   (exception)" if spec.startswith("video:") else ""))
    print(json.dumps({"bench": "eval", "batch": args.batch, "device": str(device), "loader": loaders[0],
                      "model": f"{cfg.model.kind}/{cfg.model.backbone}", "image_size": cfg.data.image_size,
                      **{k: v for k, v in r.items()
                         if k not in ("perturbed_s", "perturbed_over_clean_time", "loader_s")},
                      "loaders": {name: {k: res[k] for k in ("eval_images_per_s", "forward_images_per_s", "ratio")}
                                  for name, res in results.items()},
                      "perturbed": perturbed, "loader_s": loader_s, "target": 0.9}))
    tmp.cleanup()


if __name__ == "__main__":
    main()
