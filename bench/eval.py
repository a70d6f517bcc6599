"""Evaluation throughput: the real `ltm eval` scoring path against forward-only on the same batches.

The eval path is what `ltm.evaluate.evaluate` runs per data folder: the eval loader (shard reading, JPEG decode,
resize, batching, device copy), `model.predict`, the row bookkeeping and the exactly-once gather, and the metrics.
Forward-only runs `model.predict` over the very same batches, already decoded and in memory (no loader). Both are
timed interleaved (eval, forward, eval, forward, ...) so machine noise hits both alike. The loader should hide
behind the model: target eval images/s >= 0.9 x forward-only images/s.

Shards: `--data <shard folder>` (e.g. sample/shards/ffpp_c23/test after `make demo`), or by default a temporary
split written with data_prep's shard writer from the real face photos in ../shared/data/faces.

    python bench/eval.py                                   # tiny-cpu LTM, 112 px, reference loader on CPU
    python bench/eval.py --data sample/shards/ffpp_c23/test
    python bench/eval.py --config paper --device cuda --loader dali --samples 2048
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
from ltm.evaluate import gather_rows, score_folder, scoring_accelerator
from ltm.metrics import compute_metrics
from ltm.models import build_model

FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"


def write_face_shards(root: Path, samples: int, size: int) -> Path:
    """`<root>/bench/test/{real,fake}` shards of real face photos, center-cropped (labels alternate, by folder)."""
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
        crops.append(jpeg_bytes(np.asarray(img.crop((left, top, left + s, top + s)).resize((size, size)))))
    by_method: dict[str, list[dict]] = {"real": [], "fake": []}
    for i in range(samples):
        method = "fake" if i % 2 else "real"
        video = f"{method}{i // 8:04d}"
        by_method[method].append({"__key__": f"{video}-{i:06d}", "jpg": crops[i % len(crops)], "cls": int(i % 2),
                                  "json": {"dataset": "bench", "split": "test", "video": video, "frame": i,
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
                    perturb: str | None = None) -> dict:
    """`ltm eval`'s scoring path against forward-only on the same batches, timed interleaved (median of rounds).

    Both run under the accelerator's autocast (bf16 on CUDA for a bf16 config), as `ltm eval` does.
    """
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

    import dataclasses

    perturbed = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, perturb=perturb)) if perturb else None
    eval_path()  # warm-up: worker start, allocator, first-call costs
    forward_only()
    eval_s, fwd_s, pert_s = [], [], []
    for _ in range(rounds):
        seconds, n = eval_path()
        assert n == n_images, f"eval scored {n} images, the loader gave {n_images}"
        eval_s.append(seconds)
        fwd_s.append(forward_only())
        if perturbed is not None:
            pert_s.append(eval_path(perturbed)[0])
    eval_ips = n_images / statistics.median(eval_s)
    fwd_ips = n_images / statistics.median(fwd_s)
    out = {"images": n_images, "eval_s": eval_s, "forward_s": fwd_s, "eval_images_per_s": round(eval_ips, 2),
           "forward_images_per_s": round(fwd_ips, 2), "ratio": round(eval_ips / fwd_ips, 4)}
    if perturbed is not None:  # a perturbed evaluation's time over the clean one's (target <= 1.25)
        out.update({"perturb": perturb, "perturbed_s": pert_s,
                    "perturbed_over_clean_time": round(statistics.median(pert_s) / statistics.median(eval_s), 4)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny-cpu")
    parser.add_argument("--data", default=None, help="shard folder to score (default: temporary face shards)")
    parser.add_argument("--samples", type=int, default=512, help="samples in the temporary shards")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--loader", default=None, help="dali | reference (default: dali with CUDA, else reference)")
    parser.add_argument("--perturb", metavar="TYPE:LEVEL", action="append", default=[],
                        help="also time `ltm eval --perturb` (repeatable; `all`: every type at level 3)")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    cuda = torch.cuda.is_available() and args.device != "cpu"
    loader = args.loader or ("dali" if cuda else "reference")
    cfg = load_config(args.config, [f"data.loader={loader}", "eval.attention_samples=0", *args.overrides])
    tmp = tempfile.TemporaryDirectory(prefix="ltm-bench-eval-")
    folder = Path(args.data) if args.data else write_face_shards(Path(tmp.name), args.samples, cfg.data.image_size)
    with scoring_accelerator(cfg.train.precision, "cuda" if cuda else "cpu") as accelerator:
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.data.image_size).to(accelerator.device).eval()
        r = eval_throughput(model, cfg, folder, accelerator, args.batch, args.rounds)
        from ltm.perturb import LEVELS

        specs = [f"{k}:3" for k in LEVELS] if args.perturb == ["all"] else args.perturb
        r["perturbed"] = {spec: eval_throughput(model, cfg, folder, accelerator, args.batch, args.rounds, spec)
                          ["perturbed_over_clean_time"] for spec in specs}
        device = accelerator.device

    print(f"model {cfg.model.kind} {cfg.model.backbone} at {cfg.data.image_size} px, batch {args.batch}, "
          f"{r['images']} images from {folder}, loader {cfg.data.loader}, device {device}, "
          f"{torch.get_num_threads()} torch threads, {args.rounds} interleaved rounds (median)")
    print(f"{'path':<14}{'median s':>10}{'images/s':>12}")
    print(f"{'ltm eval':<14}{statistics.median(r['eval_s']):>10.3f}{r['eval_images_per_s']:>12.1f}")
    print(f"{'forward only':<14}{statistics.median(r['forward_s']):>10.3f}{r['forward_images_per_s']:>12.1f}")
    print(f"ratio eval / forward-only = {r['ratio']:.3f} (target >= 0.9)")
    for spec, ratio in r["perturbed"].items():
        print(f"--perturb {spec}: {ratio:.3f} x the clean evaluation's time (target <= 1.25)")
    print(json.dumps({"bench": "eval", "batch": args.batch, "device": str(device), "loader": cfg.data.loader,
                      "model": f"{cfg.model.kind}/{cfg.model.backbone}", "image_size": cfg.data.image_size,
                      **r, "target": 0.9}))
    tmp.cleanup()


if __name__ == "__main__":
    main()
