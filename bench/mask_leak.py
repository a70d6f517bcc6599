"""Does the place of the erased cells tell the student the label? (the `--shortcut patch` benchmark's runs)

With `model.mask_at=input` the student trains on images with the mask's cells erased. If the teacher's map puts the
mask on the planted artefact's cell in fakes and elsewhere in reals, "an erased cheek" is itself a label, and the
student can learn it as a new shortcut. Measured on clean real frames of the split (no artefact, no erasing in
training data): the scored head's mean P(fake) with the artefact's usual cell erased (the cell holding most of the
artefact in most of the split's `SelfBlendStamped` fakes), minus its mean over every other single cell erased. About
0 for a model that never saw erased cells (the Baseline) or saw them at label-blind places; clearly positive when an
erased artefact cell meant "fake" in training.

    python bench/mask_leak.py --variants baseline,ltm-sal-in,ltm-occ-in,ltm-occ-in-pair --seeds 5

Reads the points `bench/generalization.py --shortcut patch` keeps under --out (`<variant>-seed<k>/`); prints per
variant and seed the shift and the real frames' P(fake) unerased, each variant's mean with a 95% t-interval over
seeds, and each variant's difference to the first (paired by seed).
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

from ltm.sweep.stats import interval, paired


def artefact_cell(folder: Path, image_size: int, grid: tuple[int, int]) -> int:
    """The flat index of the cell that most of `folder`'s region samples (stamped fakes) have most of the region in."""
    from ltm.eval.mask_diagnostics import cell_coverage, region_samples

    samples = region_samples(folder, image_size, 10**9)
    if not samples:
        raise SystemExit(f"{folder}: no samples with region.png (a --shortcut patch build has <Family>Stamped folders)")
    counts = collections.Counter(int(cell_coverage(s.region[None], grid).flatten().argmax()) for s in samples)
    return counts.most_common(1)[0][0]


@torch.no_grad()
def erased_cell_shift(run_dir: Path, split: str, frames: int) -> dict:
    """{"shift", "clean", "cell"} of one run: see the module docstring."""
    from ltm.checkpoint.reader import load_model
    from ltm.data import build_eval_loader
    from ltm.models.masking import decisions_with_each_cell_erased

    model, cfg, _ = load_model(run_dir)
    model.eval()
    cnn = model.backbone if cfg.model.kind == "baseline" else model.student_cnn
    split_dir = Path(cfg.data.root) / "synth" / split
    grid = cnn.grid(cfg.data.image_size)
    cell = artefact_cell(split_dir / "SelfBlendStamped", cfg.data.image_size, grid)
    images = []
    for batch in build_eval_loader(cfg, [str(split_dir / "real")], 0, 1, "cpu", 64):
        images.append(batch["images"])
        if sum(len(x) for x in images) >= frames:
            break
    x = torch.cat(images)[:frames]
    per_cell = decisions_with_each_cell_erased(model.predict, x, grid, cnn.mean).mean(dim=0).flatten().tolist()
    others = [p for c, p in enumerate(per_cell) if c != cell]
    return {"shift": per_cell[cell] - sum(others) / len(others), "clean": float(model.predict(x).mean()),
            "cell": cell}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-generalization-patch"))
    parser.add_argument("--variants", default="baseline,ltm-sal-in")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument("--frames", type=int, default=256, help="clean real frames of the split")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    shifts: dict[str, dict[int, float]] = {}
    for variant in variants:
        for seed in range(args.seeds):
            run = args.out / f"{variant}-seed{seed}"
            if not (run / "checkpoints" / "latest").exists():
                print(f"{variant} seed {seed}: no trained run at {run}, skipped", file=sys.stderr)
                continue
            r = erased_cell_shift(run, args.split, args.frames)
            shifts.setdefault(variant, {})[seed] = r["shift"]
            print(f"{variant:18s} seed {seed}  real P(fake) {r['clean']:.3f}  artefact cell {r['cell']} erased: "
                  f"{r['shift']:+.3f} over the other cells", flush=True)
    print()
    for variant, by_seed in shifts.items():
        print(f"{variant:18s} shift {interval(list(by_seed.values())).text(signed=True, digits=3)}")
    first = variants[0]
    for variant in variants[1:]:
        if first in shifts and variant in shifts:
            print(f"{variant} - {first}: {paired(shifts[variant], shifts[first]).interval.text(signed=True, digits=3)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
