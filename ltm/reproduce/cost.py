"""What a table costs: GPU hours per run from the model's FLOPs and the frames each run reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from ltm.config import Config
from ltm.models.flops import model_gflops


class PlannedRun(Protocol):
    """What an estimate reads of a run's plan (`ltm.reproduce.plan.RunPlan`)."""

    name: str
    state: str
    cfg: Config
    data: list[str]


FRAMES_PER_VIDEO = 32  # `ltm prep` default (--frames)


NOMINAL_VIDEOS = {  # videos (WDF: face sequences) per split folder where no manifest is there to count
    ("ffpp", "val"): 140, ("ffpp", "test"): 140,  # per method folder; the official 70 pairs -> 140 videos
    ("celebdf_v2", "test"): 518,  # List_of_testing_videos.txt: 178 real, 340 fake
    ("wdf", "test"): 1460,  # assumed: about a fifth of WildDeepfake's 7,314 sequences
    ("dfdc", "test"): 5000,  # the public test set's labels.csv
    ("dfdcp", "test"): 780,  # assumed: DFDC-Preview's test set
    ("dfd", "test"): 3431,  # 363 actor videos and 3,068 DeepFakeDetection videos, all in the test split
}


FFPP_METHODS_IN_SPLIT = 5  # real + the paper's four methods


def split_frames(root: Path, folder: str) -> int:
    """Frames in a split (or method) folder: the manifest's totals when the shards exist, else a nominal count."""
    parts = Path(folder).parts
    dataset, split = parts[0], parts[1] if len(parts) > 1 else "test"
    method = parts[2] if len(parts) > 2 else None
    manifest = root / dataset / split / "manifest.json"
    if manifest.is_file():
        by_method = json.loads(manifest.read_text()).get("totals", {}).get("by_method", {})
        if by_method:
            return int(by_method.get(method, 0) if method else sum(by_method.values()))
    family = "ffpp" if dataset.startswith("ffpp") else "dfd" if dataset.startswith("dfd_") else dataset
    videos = NOMINAL_VIDEOS.get((family, split), 0)
    if family == "ffpp" and method is None:
        videos *= FFPP_METHODS_IN_SPLIT
    return videos * FRAMES_PER_VIDEO


DEFAULT_TFLOPS = 25.0  # sustained bf16 TFLOP/s per GPU for Xception-sized models on an A100 (docs/reproduce-cost.md)


def run_cost(cfg: Config, test_folders: list[str], tflops: float = DEFAULT_TFLOPS) -> dict[str, Any]:
    """GPU hours of one run from FLOPs: training steps at 3x the forward cost (forward + backward), validation and
    evaluation of `test_folders` forward-only, all at `tflops` sustained TFLOP/s."""
    fwd, pred = model_gflops(cfg)
    root = Path(cfg.data.root)
    images = cfg.train.epochs * cfg.train.iters_per_epoch * cfg.train.batch_size
    total_steps = cfg.train.epochs * cfg.train.iters_per_epoch
    passes = max(total_steps // cfg.train.val_every, cfg.train.epochs) if cfg.train.val_every else cfg.train.epochs
    val_frames = sum(split_frames(root, f) for f in cfg.data.val)
    if cfg.train.val_batches:
        val_frames = min(val_frames, cfg.train.val_batches * cfg.eval.batch_size)
    test_frames = sum(split_frames(root, f) for f in test_folders)
    pflop = {"train": 3 * fwd * images / 1e6, "val": pred * val_frames * (passes if cfg.data.val else 0) / 1e6,
             "eval": pred * test_frames / 1e6}
    hours = sum(pflop.values()) * 1e15 / (tflops * 1e12) / 3600
    return {"train_images": images, "train_gflop_per_image": 3 * fwd, "predict_gflop_per_image": pred,
            "val_frames": val_frames, "val_passes": passes, "test_frames": test_frames, "pflop": pflop,
            "gpu_hours": hours}


def estimate(plans: list[PlannedRun], tflops: float = DEFAULT_TFLOPS) -> list[dict[str, Any]]:
    """`run_cost` of every run of a table."""
    return [{"run": plan.name, "state": plan.state, **run_cost(plan.cfg, plan.data, tflops)} for plan in plans]


def print_estimate(rows: list[dict[str, Any]], tflops: float) -> None:
    print(f"{'run':<38} {'GFLOP/img':>9} {'train PFLOP':>11} {'val PFLOP':>9} {'eval PFLOP':>10} {'GPU h':>6}")
    for r in rows:
        p = r["pflop"]
        print(f"{r['run']:<38} {r['train_gflop_per_image']:>9.1f} {p['train']:>11.2f} {p['val']:>9.2f} "
              f"{p['eval']:>10.3f} {r['gpu_hours']:>6.2f}")
    todo = sum(r["gpu_hours"] for r in rows if r["state"] != "done")
    print(f"total {sum(r['gpu_hours'] for r in rows):.1f} GPU hours ({todo:.1f} still to run) at {tflops:g} TFLOP/s "
          "sustained per GPU; training = 3x forward FLOPs (FlopCounterMode), validation/eval forward only")
