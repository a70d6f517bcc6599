"""Does LTM generalise better than its own baseline? Train on real vs SelfBlend only, score a method never seen.

On the sample dataset (`ltm prep sample` + `ltm prep ffpp`, as `make demo` builds it), for each seed: LTM with the
`high` mask (the paper's method), LTM with `low` and `random` masks (Table 4) and the Baseline (same backbone, same
pretrained weights, same steps, batch and schedule) are trained by `ltm.engine.train` in this process on
`real` + `SelfBlend`, then `ltm.evaluate` scores the test split: FaceSwap frames are the unseen method, SelfBlend the
seen one. Printed: per-seed frame AUCs, the mean difference LTM(high) - Baseline on the unseen method with a 95%
t-interval over seeds, whether Table 4's ordering high > random > low holds on unseen data, and as the last line one
JSON object with `ratio` = mean unseen AUC of LTM / Baseline and `target` 1.03.

    python bench/generalization.py                       # 3 seeds x 4 variants on the sample dataset (CPU)
    python bench/generalization.py --seeds 1 --steps 20  # a quick look

Finished runs are kept under --out and reused: an interrupted benchmark continues where it stopped.

Where the real FaceForensics++ c23 videos of the shared test media exist (`--real-ffpp`, default
`../shared/data/ffpp-sample`: 3 real videos and one each of Deepfakes, Face2Face, FaceSwap, NeuralTextures), they
are prepped once into `<out>/real-ffpp-shards` (read, never copied) and every run also scores them: a second unseen
test whose artefacts come from the real manipulation methods, not from the sample's generator (112 frames of 7
videos: a small, noisy figure, printed beside the main one, not part of `ratio`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> model overrides
    "ltm-high": ["model.kind=ltm", "model.mask_strategy=high"],
    "ltm-random": ["model.kind=ltm", "model.mask_strategy=random"],
    "ltm-low": ["model.kind=ltm", "model.mask_strategy=low"],
    "baseline": ["model.kind=baseline"],
}
SEEN, UNSEEN = "SelfBlend", "FaceSwap"
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def ensure_sample(sample: Path, identities: int) -> Path:
    """The sample dataset's shards, built as `make demo` builds them when missing."""
    shards = sample / "shards"
    if not (shards / "ffpp_c23" / "test" / "manifest.json").is_file():
        ltm = [sys.executable, "-m", "ltm.cli"]
        subprocess.run([*ltm, "prep", "sample", "--out", str(sample), "--identities", str(identities)], check=True)
        subprocess.run([*ltm, "prep", "ffpp", "--root", str(sample), "--splits", str(sample / "splits"), "--out",
                        str(shards), "--frames", "16", "--size", "112", "--workers", "2", "--no-progress"],
                       check=True)
    return shards


def ensure_real_ffpp(root: Path | None, out: Path) -> list[Path]:
    """The shared real FF++ videos as shard folders (every split they fall in), or [] where they are absent."""
    if root is None or not (root / "original_sequences").is_dir():
        return []
    shards = out / "real-ffpp-shards"
    splits = root.parent / "ffpp-splits" if (root.parent / "ffpp-splits").is_dir() else root / "splits"
    if not any(shards.glob("ffpp_c23/*/manifest.json")):
        subprocess.run([sys.executable, "-m", "ltm.cli", "prep", "ffpp", "--root", str(root), "--splits",
                        str(splits), "--out", str(shards), "--frames", "16", "--size", "112", "--workers", "2",
                        "--no-progress"], check=True)
    return sorted(p.parent for p in shards.glob("ffpp_c23/*/manifest.json"))


def score_folders(run_dir: Path, folders: list[Path]) -> float:
    """Frame AUC of the run's inference head over all frames of `folders` together."""
    import torch
    from sklearn.metrics import roc_auc_score

    from ltm.data import build_eval_loader
    from ltm.evaluate import load_model

    model, cfg, _ = load_model(run_dir)
    scores, labels = [], []
    with torch.no_grad():
        for batch in build_eval_loader(cfg, [str(f) for f in folders], 0, 1, "cpu", 64):
            scores += model.predict(batch["images"]).tolist()
            labels += batch["labels"].tolist()
    return float(roc_auc_score(labels, scores))


def run_variant(name: str, seed: int, args: argparse.Namespace, shards: Path) -> dict:
    """Train one variant (or reuse its finished run) and score the test split; returns per-method frame AUCs."""
    from ltm.config import load_config
    from ltm.engine import train
    from ltm.evaluate import evaluate

    run_dir = args.out / f"{name}-seed{seed}"
    report = run_dir / "eval" / "report.json"
    if report.is_file():
        out = json.loads(report.read_text())
        if args.real_ffpp_folders and "real_ffpp_auc" not in out:  # a run from before the real-video test
            out["real_ffpp_auc"] = score_folders(run_dir, args.real_ffpp_folders)
            write_json(report, out)
        return out
    epochs = 2
    overrides = [
        *VARIANTS[name], *args.overrides, f"data.root={shards}",
        f"data.train=[{{path: ffpp_c23/train/real, weight: 1}}, {{path: ffpp_c23/train/{SEEN}, weight: 1}}]",
        "data.val=[]", "data.test=[ffpp_c23/test]", f"train.run_dir={run_dir}", f"train.seed={seed}",
        f"data.seed={seed}", f"train.epochs={epochs}", f"train.iters_per_epoch={math.ceil(args.steps / epochs)}",
        "train.val_every=0", "train.log_every=10", "eval.attention_samples=0",
    ]
    cfg = load_config(args.config, overrides)
    started = time.perf_counter()
    train(cfg, resume="auto")
    seconds = time.perf_counter() - started
    (result,) = evaluate(run_dir, ["ffpp_c23/test"], out_dir=run_dir / "eval" / "reports")
    out = {"variant": name, "seed": seed, "train_s": round(seconds, 1),
           "seen_auc": result["per_method"][SEEN]["frame_auc"], "unseen_auc": result["per_method"][UNSEEN]["frame_auc"],
           "frame_auc": result["frame_auc"]}
    if args.real_ffpp_folders:
        out["real_ffpp_auc"] = score_folders(run_dir, args.real_ffpp_folders)
    write_json(report, out)
    return out


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval of per-seed differences (nan half-width for one seed)."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, float("nan"), float("nan")
    half = T_975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", type=Path, default=ROOT / "sample", help="sample dataset folder (built if missing)")
    parser.add_argument("--identities", type=int, default=48)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-generalization")
    parser.add_argument("--config", default="tiny-cpu")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run (batch: the config's)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    shared = ROOT.parent / "shared" / "data" / "ffpp-sample"
    parser.add_argument("--real-ffpp", type=Path, default=shared if shared.is_dir() else None,
                        help="FF++ layout folder of real videos scored as a second unseen test (none: skip)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run (e.g. model.mixup=false)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    variants = args.variants.split(",")
    for needed in ("ltm-high", "baseline"):
        if needed not in variants:
            parser.error(f"--variants must include {needed}")
    shards = ensure_sample(args.sample, args.identities)
    args.real_ffpp_folders = ensure_real_ffpp(args.real_ffpp, args.out)

    rows = []
    for seed in range(args.seeds):
        for name in variants:
            row = run_variant(name, seed, args, shards)
            rows.append(row)
            real = f"   real FF++ AUC {row['real_ffpp_auc']:.4f}" if "real_ffpp_auc" in row else ""
            print(f"seed {seed}  {name:<11} unseen {UNSEEN} AUC {row['unseen_auc']:.4f}   seen {SEEN} AUC "
                  f"{row['seen_auc']:.4f}{real}   ({row['train_s']:.0f} s training)", flush=True)

    def mean_unseen(name: str) -> float:
        return statistics.fmean(r["unseen_auc"] for r in rows if r["variant"] == name)

    def mean_real(name: str) -> float | None:
        values = [r["real_ffpp_auc"] for r in rows if r["variant"] == name and "real_ffpp_auc" in r]
        return statistics.fmean(values) if values else None

    print(f"\n{'variant':<12}{'unseen ' + UNSEEN:>18}{'seen ' + SEEN:>18}{'real FF++':>12}   (mean over "
          f"{args.seeds} seeds)")
    for name in variants:
        seen = statistics.fmean(r["seen_auc"] for r in rows if r["variant"] == name)
        real = mean_real(name)
        print(f"{name:<12}{mean_unseen(name):>18.4f}{seen:>18.4f}{'' if real is None else f'{real:12.4f}'}")
    by_seed = {(r["variant"], r["seed"]): r["unseen_auc"] for r in rows}
    diffs = [by_seed["ltm-high", s] - by_seed["baseline", s] for s in range(args.seeds)]
    mean, low, high = interval(diffs)
    print(f"\nLTM(high) - Baseline on unseen {UNSEEN}: {mean:+.4f} (95% CI {low:+.4f} .. {high:+.4f}, "
          f"{args.seeds} seeds)")
    ordering = None
    if {"ltm-high", "ltm-random", "ltm-low"} <= set(variants):
        h, r, lo = mean_unseen("ltm-high"), mean_unseen("ltm-random"), mean_unseen("ltm-low")
        ordering = h > r > lo
        print(f"Table 4 ordering on unseen data, high > random > low: {'holds' if ordering else 'does not hold'} "
              f"({h:.4f}, {r:.4f}, {lo:.4f})")
    ratio = mean_unseen("ltm-high") / mean_unseen("baseline")
    print(json.dumps({
        "bench": "generalization", "config": args.config, "steps": args.steps, "seeds": args.seeds,
        "overrides": args.overrides, "unseen": UNSEEN, "seen": SEEN,
        "mean_unseen_auc": {name: round(mean_unseen(name), 4) for name in variants},
        "mean_real_ffpp_auc": {name: round(mean_real(name), 4) for name in variants if mean_real(name) is not None},
        "diff_ltm_baseline": round(mean, 4),
        "diff_ci95": [round(x, 4) if math.isfinite(x) else None for x in (low, high)],
        "table4_order_holds": ordering, "runs": rows, "ratio": round(ratio, 4), "target": 1.03,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
