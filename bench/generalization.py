"""Does the student generalise better than its baseline to manipulations it never saw? (Tables 3 and 4, on data
that can tell.)

The benchmark: `ltm prep synth` turns real face photos (default `../shared/data/faces`, 305 photos, read in place)
into identity-disjoint train/val/test shards of real faces and five synthetic fake families with different
artefacts (SelfBlend, IdentitySwap, Upsample, ExpressionWarp, TextureRender; see data_prep/synth.py). The benchmark is
a preset of `ltm sweep` (`bench_sweep`): each (variant, seed) is a sweep point, trained in this process by the sweep's
`train_budget` with the sweep's per-point config on real + one family (`--train-family`, SelfBlend by default: the
paper's Table 3 protocol of one training manipulation) and scored by every head it has on the other four families
(unseen) and on its own (seen), frame AUC per family:

    baseline      the plain backbone + linear head (the paper's "Xception" rows)
    ltm-high      the method as configured (`high` mask, deep mixup) — heads: student (the paper's inference head),
                  teacher_cnn, teacher_vit
    ltm-random    Table 4, random mask            ltm-low      Table 4, least attended positions masked
    ltm-mixup     deep mixup on, ltm-nomixup off  (Table 3's ablation; `tiny-cpu` trains without mixup)

Schedule: epochs of `--epoch-steps` (100) optimizer steps, lr x `train.lr_gamma` (0.9, the paper's) per epoch, the
config's batch (32) and image size (tiny-cpu: 112 px). A run is trained to each budget in turn (100, 200, ...) by
resuming its own checkpoint, so every point of a learning curve is the same run, and the `--steps` point is exactly
the run a `--steps` budget trains. `--curve 200,400` extends seed 0 of `--curve-variants` past the budget
(`--curve-seeds 2`: seeds 0 and 1, the curves their mean).
The default budget is 100 steps (about 1.8 passes over real + SelfBlend's 1,776 training crops): on 2 CPU cores a
Baseline run takes 2-3 minutes and an LTM run 5-7, so 3 seeds of 5 variants fit in about 1.5 hours.
Selection (`--split val`, the default) never looks at test; `--split test` prints the final table.

    python bench/generalization.py --quick                # first look: 1 seed, ltm-high + baseline, 100 steps
    python bench/generalization.py                        # 3 seeds x 5 variants, 100 steps, val split
    python bench/generalization.py --split test --curve 200,400,800 --curve-seeds 2 --plot curves.png
    python bench/generalization.py model.mixup=false      # overrides apply to every run
    python bench/generalization.py --variants baseline,ltm-high,os16 --variant "os16:model.output_stride=16"
                                                          # a hypothesis as one more LTM variant, same seeds

Finished points are kept under --out (`<variant>-seed<k>/scores/step<N>-<split>.json`) and reused: an interrupted
benchmark continues where it stopped. Printed: per family, per head and per seed frame AUC; each variant's unseen mean
with a 95% t-interval over seeds; the student's difference to the baseline and to the teacher's CNN head (paired
by seed, 95% interval, with the sweep's verdict: better / worse / the N that would resolve 0.02); Table 4's order on
unseen families; the learning curves; last line one JSON object with `ratio` = student unseen mean / baseline unseen
mean and `target` = (baseline + 0.02) / baseline.

Where the real FaceForensics++ c23 videos of the shared media exist (`--real-ffpp`), every scored point also scores
them (112 frames of 7 videos: a small, noisy figure, printed beside the main one).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import subprocess
import sys
from pathlib import Path

from ltm.sweep.run import Sweep, point_config, provenance, train_budget
from ltm.sweep.stats import interval as t_interval
from ltm.sweep.stats import paired as paired_by_seed
from ltm.sweep.stats import verdict

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
VARIANTS = {  # name -> model overrides
    "baseline": ["model.kind=baseline"],
    "ltm-high": ["model.kind=ltm", "model.mask_strategy=high"],
    "ltm-random": ["model.kind=ltm", "model.mask_strategy=random"],
    "ltm-low": ["model.kind=ltm", "model.mask_strategy=low"],
    "ltm-mixup": ["model.kind=ltm", "model.mask_strategy=high", "model.mixup=true"],
    "ltm-nomixup": ["model.kind=ltm", "model.mask_strategy=high", "model.mixup=false"],
}
DEFAULT_VARIANTS = "baseline,ltm-high,ltm-random,ltm-low,ltm-mixup"
FAMILIES = ("SelfBlend", "IdentitySwap", "Upsample", "ExpressionWarp", "TextureRender")
HEADS = {"baseline": ("baseline",), "ltm": ("student", "teacher_cnn", "teacher_vit")}


# ------------------------------------------------------------------------------------------------- data
def ensure_synth(faces: Path, out: Path, size: int, frames: int, identity_regex: str | None,
                 shortcut: str = "none") -> Path:
    """The benchmark's shards (`ltm prep synth`), built once under `out`."""
    shards = out / (f"synth-{size}px-{frames}f" + ("" if shortcut == "none" else f"-{shortcut}"))
    if not all((shards / "synth" / s / "manifest.json").is_file() for s in ("train", "val", "test")):
        cmd = [sys.executable, "-m", "ltm.cli", "prep", "synth", "--root", str(faces), "--out", str(shards),
               "--size", str(size), "--frames", str(frames), "--shortcut", shortcut]
        if identity_regex:
            cmd += ["--identity-regex", identity_regex]
        subprocess.run(cmd, check=True)
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


# ------------------------------------------------------------------------------------------------- scoring
def head_scores(run_dir: Path, folders: list[Path]) -> dict:
    """P(fake) of every head of the run's latest checkpoint on `folders`: {"labels", "methods", head: scores}."""
    import torch

    from ltm.checkpoint.reader import load_model
    from ltm.data import build_eval_loader

    model, cfg, _ = load_model(run_dir)
    out: dict = {"labels": [], "methods": []}
    with torch.no_grad():
        for batch in build_eval_loader(cfg, [str(f) for f in folders], 0, 1, "cpu", 64):
            images = batch["images"]
            if cfg.model.kind == "baseline":
                heads = {"baseline": model.predict(images)}
            else:
                heads = model.head_probabilities(images)
            for name, probs in heads.items():
                out.setdefault(name, []).extend(probs.tolist())
            out["labels"] += batch["labels"].tolist()
            out["methods"] += list(batch["methods"])
    return out


def mask_figures(run_dir: Path, folder: Path) -> dict:
    """Where the run's mask lands on the fakes of `folder` (their region.png): `ltm.eval.mask_diagnostics.diagnose`
    over every method there, pooled: {"hit_rate", "chance_hit_rate", "masked_in_region", "region_share", "maps": {name:
    hit rate}}."""
    import torch

    from ltm.checkpoint.reader import load_model
    from ltm.eval.mask_diagnostics import diagnose

    model, cfg, _ = load_model(run_dir)
    figures, _ = diagnose(model, folder, cfg.data.image_size, 10**9, torch.device("cpu"))
    per = figures["per_method"].values()
    n = sum(d["n"] for d in per)

    def pooled(get) -> float:
        return sum(get(d) * d["n"] for d in per) / n

    out = {k: round(pooled(lambda d, k=k: d["mask"][k]), 4) for k in ("hit_rate", "chance_hit_rate",
                                                                       "masked_in_region", "region_share")}
    names = next(iter(per))["maps"]
    out["maps"] = {m: round(pooled(lambda d, m=m: d["maps"][m]["hit_rate"]), 4) for m in names}
    out["n"] = n
    return out


def family_aucs(scores: dict, heads: tuple[str, ...]) -> dict:
    """{head: {family: frame AUC of family's frames against all real frames}}."""
    from sklearn.metrics import roc_auc_score

    real = [i for i, m in enumerate(scores["methods"]) if m == "real"]
    out = {}
    for head in heads:
        s = scores[head]
        out[head] = {}
        for fam in sorted(set(scores["methods"]) - {"real"}):
            fake = [i for i, m in enumerate(scores["methods"]) if m == fam]
            idx = real + fake
            out[head][fam] = float(roc_auc_score([scores["labels"][i] for i in idx], [s[i] for i in idx]))
    return out


def calibration(scores: dict, heads: tuple[str, ...]) -> dict:
    """{head: {"real_mean": mean P(fake) of the clean reals, "ece": expected calibration error over every frame}}: a
    student trained on erased faces may rank well (AUC) and still score whole real faces as rather fake."""
    from ltm.eval.metrics import expected_calibration_error

    real = [i for i, m in enumerate(scores["methods"]) if m == "real"]
    return {head: {"real_mean": statistics.fmean(scores[head][i] for i in real),
                   "ece": expected_calibration_error(scores["labels"], scores[head])} for head in heads}


def overall_auc(scores: dict, head: str) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(scores["labels"], scores[head]))


# ------------------------------------------------------------------------------------------------- training
def bench_sweep(variants: list[str], budgets: list[int], args: argparse.Namespace) -> Sweep:
    """The benchmark as an `ltm sweep`: its variants and seeds, the synthetic shards and schedule as overrides for
    every point, run folders `<out>/<variant>-seed<k>/`. Training, each point's config and its provenance are the
    sweep's (`ltm.sweep.run`); the scoring below is the benchmark's own (per family, the shortcut, the mask)."""
    return Sweep(
        config=args.config, variants={v: VARIANTS[v] for v in variants}, seeds=list(range(args.seeds)),
        evals=[f"synth/{args.split}"], out=args.out, budgets=budgets, runs_folder="", overrides=[
            *args.overrides, f"data.root={args.shards}",
            f"data.train=[{{path: synth/train/real, weight: 1}}, {{path: synth/train/{args.train_family}, weight: 1}}]",
            "data.val=[]", f"data.test=[synth/{args.split}]", f"train.iters_per_epoch={args.epoch_steps}",
            f"train.lr_gamma={args.lr_gamma}", "train.val_every=0", "train.log_every=50", "eval.attention_samples=0"])


def run_point(sweep: Sweep, variant: str, seed: int, steps: int, args: argparse.Namespace) -> dict:
    """Train variant/seed to `steps` (resuming its own run, `ltm.sweep.run.train_budget`) and score it; cached as
    JSON beside the run."""
    from ltm.config import load_run_config, to_dict
    from ltm.train.trainer import model_differences

    run_dir = sweep.run_dir(variant, seed)
    path = run_dir / "scores" / f"step{steps:06d}-{args.split}.json"
    if steps % args.epoch_steps:
        raise SystemExit(f"budget {steps} is not a multiple of --epoch-steps {args.epoch_steps}")
    cfg = point_config(sweep, variant, seed, steps)
    stored = run_dir / "config.yaml"
    if stored.is_file():  # a kept run answers only for the model this variant now means (configs change)
        diff = model_differences(to_dict(load_run_config(stored))["model"], to_dict(cfg)["model"])
        if diff:
            raise SystemExit(f"{run_dir} was trained as another model ({'; '.join(diff)}): remove it or use "
                             "another --out")
    heads = HEADS["baseline" if cfg.model.kind == "baseline" else "ltm"]
    split_dir = args.shards / "synth" / args.split
    clean = [p for p in sorted(split_dir.iterdir()) if p.is_dir() and not p.name.endswith("Stamped")]
    if path.is_file():
        row = json.loads(path.read_text())
        if "calibration" not in row and steps == latest_step(run_dir):  # kept from before it was measured
            row["calibration"] = calibration(head_scores(run_dir, clean), heads)
            write_json(path, row)
        return row
    session = train_budget(sweep, variant, seed, steps)
    if session is not None and session["status"] != "completed":
        raise SystemExit(f"{run_dir}: training stopped at step {session['step']} of {steps} ({session['status']})")
    scores = head_scores(run_dir, clean)
    row = {"variant": variant, "seed": seed, "steps": steps, "split": args.split,
           "train_s": session["seconds"] if session else None, "trained": session, "provenance": provenance(),
           "family_auc": family_aucs(scores, heads), "auc": {h: overall_auc(scores, h) for h in heads},
           "calibration": calibration(scores, heads),
           "overrides": args.overrides, "train_family": args.train_family}
    if args.real_ffpp_folders:
        real = head_scores(run_dir, args.real_ffpp_folders)
        row["real_ffpp_auc"] = {h: overall_auc(real, h) for h in heads}
    if args.shortcut != "none":
        # the shortcut's pull: the training family's fakes with the artefact stamped on, against the same reals
        stamped = split_dir / f"{args.train_family}Stamped"
        s_scores = head_scores(run_dir, [split_dir / "real", stamped])
        row["stamped_auc"] = {h: overall_auc(s_scores, h) for h in heads}
        if cfg.model.kind == "ltm":  # does the mask land on the artefact?
            row["mask"] = mask_figures(run_dir, stamped)
    write_json(path, row)
    return row


def latest_step(run_dir: Path) -> int | None:
    """The step of the run's latest checkpoint (what `head_scores` loads)."""
    from ltm.checkpoint import CheckpointError, resolve_tag, step_of

    try:
        return step_of(resolve_tag(run_dir, None).name)
    except CheckpointError:
        return None


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval (nan half-width for one value): `ltm.sweep.stats`, the one place for them."""
    i = t_interval(values)
    return i.mean, i.lo, i.hi


def unseen_mean(row: dict, head: str, seen: str) -> float:
    return statistics.fmean(v for f, v in row["family_auc"][head].items() if f != seen)


# ------------------------------------------------------------------------------------------------- report
def plot_curves(curves: dict[tuple[str, str], dict[int, list[float]]], seen: str, path: Path) -> None:
    """One line per (variant, head): the mean over seeds, with the seeds' range shaded when there are several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    n_seeds = max(len(v) for points in curves.values() for v in points.values())
    for (variant, head), points in sorted(curves.items()):
        xs = sorted(points)
        line, = ax.plot(xs, [statistics.fmean(points[x]) for x in xs], marker="o",
                        label=head if variant.startswith("baseline") else f"{variant} {head}")
        if n_seeds > 1:
            ax.fill_between(xs, [min(points[x]) for x in xs], [max(points[x]) for x in xs], color=line.get_color(),
                            alpha=0.12, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({x for p in curves.values() for x in p}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("optimizer steps (batch 32)")
    ax.set_ylabel("unseen families, mean frame AUC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    seeds = "seed 0" if n_seeds == 1 else f"mean of {n_seeds} seeds, their range shaded"
    ax.set_title(f"Trained on real + {seen}, scored on the 4 other families\n({seeds})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"curves: {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=Path, default=SHARED / "faces", help="real face photos/videos for prep synth")
    parser.add_argument("--identity-regex", default="^[^_]+",
                        help="identity groups of --faces files (default: the shared media's source repository)")
    parser.add_argument("--size", type=int, default=112, help="crop side of the benchmark's shards (112)")
    parser.add_argument("--frames", type=int, default=4, help="views per face (4)")
    parser.add_argument("--out", type=Path, default=None,
                        help="runs and scores (runs/bench-generalization, -<shortcut> appended with --shortcut)")
    parser.add_argument("--config", default="tiny-cpu")
    parser.add_argument("--train-family", default="SelfBlend", choices=FAMILIES)
    parser.add_argument("--split", default="val", choices=["val", "test"], help="scored split (val: selection)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="the default budget in optimizer steps (100)")
    parser.add_argument("--epoch-steps", type=int, default=100, help="steps per epoch (lr decays per epoch) (100)")
    parser.add_argument("--lr-gamma", type=float, default=0.9, help="lr factor per epoch (0.9, the paper's)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of {list(VARIANTS)} "
                        f"({DEFAULT_VARIANTS}: tiny-cpu trains without mixup, so ltm-mixup is Table 3's ablation)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE ...",
                        help="define one more variant: an LTM run with these space-separated overrides "
                        "(model.kind=baseline among them makes it a Baseline)")
    parser.add_argument("--shards-out", type=Path, default=ROOT / "runs" / "bench-synth",
                        help="where the benchmark's shards are built once (shared by every --out)")
    parser.add_argument("--curve", default="", help="extra budgets for the learning curves, e.g. 400,800")
    parser.add_argument("--curve-seeds", type=int, default=1,
                        help="seeds 0..N-1 get learning curves (1); the curves are their mean")
    parser.add_argument("--curve-variants", default="baseline,ltm-high")
    parser.add_argument("--plot", type=Path, help="write the learning curves as a PNG here")
    parser.add_argument("--quick", action="store_true", help="1 seed, baseline + ltm-high, 100 steps")
    parser.add_argument("--real-ffpp", type=Path, default=SHARED / "ffpp-sample" if (SHARED / "ffpp-sample").is_dir()
                        else None, help="FF++ layout folder of real videos scored as a second unseen test (none: skip)")
    parser.add_argument("--shortcut", default="none", choices=["none", "patch"],
                        help="the visible mechanism benchmark: every training fake also carries this local artefact "
                        "(`ltm prep synth --shortcut`), val/test do not; prints each LTM variant's mask hit rate on "
                        "it and every model's AUC on stamped fakes (none)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run (e.g. model.mixup=false)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.variants = 1, 100, "baseline,ltm-high"
    for spec in args.variant:
        name, sep, overrides = spec.partition(":")
        if not sep or not name or not all("=" in o for o in overrides.split()):
            parser.error(f"--variant {spec!r}: expected NAME:key=value [key=value ...]")
        VARIANTS[name] = ["model.kind=ltm", *overrides.split()]
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    ltm_variants = [v for v in variants if v != "baseline" and "model.kind=ltm" in VARIANTS.get(v, [])]
    if unknown or "baseline" not in variants or not ltm_variants:
        parser.error(f"--variants: unknown {unknown}; baseline and an LTM variant (ltm-high) are required")
    # the student every other row is compared with: the paper's method where it is among the variants
    ref = "ltm-high" if "ltm-high" in variants else ltm_variants[0]
    if not args.faces.is_dir():
        parser.error(f"--faces {args.faces}: no such folder (a folder of real face photos or videos)")
    if args.out is None:
        args.out = ROOT / "runs" / ("bench-generalization" + ("" if args.shortcut == "none" else f"-{args.shortcut}"))
    args.out.mkdir(parents=True, exist_ok=True)
    args.shards = ensure_synth(args.faces, args.shards_out, args.size, args.frames, args.identity_regex,
                               args.shortcut)
    args.real_ffpp_folders = ensure_real_ffpp(args.real_ffpp, args.out)
    seen = args.train_family
    budgets = sorted({b for b in (args.epoch_steps, args.steps) if b <= args.steps} | set(
        range(args.epoch_steps, args.steps + 1, args.epoch_steps)))
    curve_extra = sorted(int(x) for x in args.curve.split(",") if x)

    sweep = bench_sweep(variants, budgets, args)
    rows: dict[tuple[str, int, int], dict] = {}
    for seed in range(args.seeds):
        for variant in variants:
            for steps in budgets:
                rows[variant, seed, steps] = run_point(sweep, variant, seed, steps, args)
            row = rows[variant, seed, args.steps]
            for head, fams in row["family_auc"].items():
                cells = "  ".join(f"{f} {fams[f]:.3f}" for f in FAMILIES if f in fams)
                real = row.get("real_ffpp_auc", {}).get(head)
                print(f"seed {seed} {variant:<12}{head:<12} unseen {unseen_mean(row, head, seen):.4f} | {cells}"
                      + (f" | real FF++ {real:.3f}" if real is not None else ""), flush=True)
    if curve_extra:
        for seed in range(args.curve_seeds):
            for variant in [v for v in args.curve_variants.split(",") if v in variants]:
                for steps in budgets + curve_extra:
                    if (variant, seed, steps) not in rows:  # seeds < --seeds already hold their budgets
                        rows[variant, seed, steps] = run_point(sweep, variant, seed, steps, args)

    final = {k: r for k, r in rows.items() if k[2] == args.steps}
    seeds = range(args.seeds)

    def per_seed(variant: str, head: str) -> list[float]:
        return [unseen_mean(final[variant, s, args.steps], head, seen) for s in seeds]

    print(f"\nsplit {args.split}; train: real + {seen}; {args.steps} steps; {args.seeds} seeds; unseen = mean "
          f"frame AUC over {', '.join(f for f in FAMILIES if f != seen)}")
    print(f"{'variant':<13}{'head':<12}{'unseen (95% CI)':>26}" + "".join(f"{f[:12]:>14}" for f in FAMILIES))
    summary: dict = {}
    for variant in variants:
        for head in final[variant, 0, args.steps]["family_auc"]:
            mean, lo, hi = interval(per_seed(variant, head))
            fam = {f: statistics.fmean(final[variant, s, args.steps]["family_auc"][head][f] for s in seeds)
                   for f in FAMILIES}
            summary[f"{variant}/{head}"] = {"unseen": round(mean, 4), "ci95": [round(lo, 4), round(hi, 4)]
                                            if math.isfinite(lo) else None, "per_family": {k: round(v, 4) for k, v
                                                                                           in fam.items()}}
            print(f"{variant:<13}{head:<12}{mean:>10.4f} ({lo:.4f} .. {hi:.4f})" + "".join(f"{fam[f]:>14.4f}"
                                                                                        for f in FAMILIES))

    diffs: dict = {}

    def compare(name: str, label: str, a: tuple[str, str], b: tuple[str, str]) -> None:
        """a - b paired by seed, printed with the sweep's verdict and kept in `diffs[name]`."""
        i = paired_by_seed(dict(zip(seeds, per_seed(*a))), dict(zip(seeds, per_seed(*b)))).interval
        word = verdict(i)
        diffs[name] = {"mean": round(i.mean, 4), "ci95": [round(i.lo, 4), round(i.hi, 4)] if math.isfinite(i.lo)
                       else None, "verdict": word.word, "n_needed": word.n_needed}
        print(f"{label:<22} {i.mean:+.4f} (95% CI {i.lo:+.4f} .. {i.hi:+.4f}, paired by seed): {word.text()}")

    for name, a, b in (("student-baseline", (ref, "student"), ("baseline", "baseline")),
                       ("student-teacher_cnn", (ref, "student"), (ref, "teacher_cnn")),
                       ("teacher_cnn-baseline", (ref, "teacher_cnn"), ("baseline", "baseline"))):
        compare(name, name, a, b)
    calib: dict = {}
    print("\ncalibration on whole faces (test reals' mean P(fake), ECE over every frame; 95% CI over seeds); the "
          "target: reals' mean within 0.05 of the Baseline's")
    base_real = [final["baseline", s, args.steps]["calibration"]["baseline"]["real_mean"] for s in seeds]
    for variant in variants:
        for head in final[variant, 0, args.steps]["calibration"]:
            cells = [final[variant, s, args.steps]["calibration"][head] for s in seeds]
            real, r_lo, r_hi = interval([c["real_mean"] for c in cells])
            ece, e_lo, e_hi = interval([c["ece"] for c in cells])
            shift = paired_by_seed(dict(zip(seeds, (c["real_mean"] for c in cells))),
                                   dict(zip(seeds, base_real))).interval
            calib[f"{variant}/{head}"] = {"real_mean": round(real, 4), "ece": round(ece, 4),
                                          "real_mean_minus_baseline": round(shift.mean, 4)}
            print(f"  {variant:<13}{head:<12} reals' P(fake) {real:.3f} ({r_lo:.3f} .. {r_hi:.3f})  ECE {ece:.3f} "
                  f"({e_lo:.3f} .. {e_hi:.3f})" + ("" if variant == "baseline" else
                                                   f"  vs Baseline {shift.mean:+.3f} ({shift.lo:+.3f} .. "
                                                   f"{shift.hi:+.3f})"))
    mechanism: dict = {}
    if args.shortcut != "none":
        print(f"\nshortcut `{args.shortcut}` on every training fake: AUC on {seen} fakes with it stamped on (the "
              "shortcut's pull) against the same fakes clean; for LTM variants, how often the mask covers it")
        for variant in variants:
            rows_v = [final[variant, s, args.steps] for s in seeds]
            for head in rows_v[0]["stamped_auc"]:
                st, _, _ = interval([r["stamped_auc"][head] for r in rows_v])
                cl, _, _ = interval([r["family_auc"][head][seen] for r in rows_v])
                print(f"  {variant:<13}{head:<12} stamped {st:.4f}  clean {cl:.4f}")
            if "mask" in rows_v[0]:
                hit, lo, hi = interval([r["mask"]["hit_rate"] for r in rows_v])
                chance = statistics.fmean(r["mask"]["chance_hit_rate"] for r in rows_v)
                maps = {m: round(statistics.fmean(r["mask"]["maps"][m] for r in rows_v), 3)
                        for m in rows_v[0]["mask"]["maps"]}
                mechanism[variant] = {"hit_rate": round(hit, 4), "ci95": [round(lo, 4), round(hi, 4)]
                                      if math.isfinite(lo) else None, "chance": round(chance, 4), "maps": maps}
                print(f"  {variant:<13}mask hit rate {hit:.3f} (95% CI {lo:.3f} .. {hi:.3f}; chance {chance:.3f}); "
                      "each map's hit rate: " + ", ".join(f"{m} {v:.2f}" for m, v in maps.items()))
        # the targets per LTM variant: its student against the Baseline (the reference's is printed above as
        # student-baseline) and against the random-mask student
        for variant in [v for v in ltm_variants if v != "ltm-random"]:
            for name, against in (("baseline", ("baseline", "baseline")),
                                  ("ltm-random", ("ltm-random", "student"))):
                if against[0] not in variants or (variant, name) == (ref, "baseline"):
                    continue
                compare(f"{variant}-{name}", f"student {variant} - {name}", (variant, "student"), against)
        # the reference against every other LTM variant, less the pairs the targets above already print
        for other in [v for v in ltm_variants if v not in (ref, "ltm-random") and ref != "ltm-random"]:
            compare(f"student-{other}", f"student {ref} - {other}", (ref, "student"), (other, "student"))
    ordering = None
    if {"ltm-high", "ltm-random", "ltm-low"} <= set(variants):
        h, r, lo = (statistics.fmean(per_seed(v, "student")) for v in ("ltm-high", "ltm-random", "ltm-low"))
        ordering = h > r > lo
        print(f"Table 4 order on unseen families (student), high > random > low: "
              f"{'holds' if ordering else 'does not hold'} ({h:.4f}, {r:.4f}, {lo:.4f})")

    curve_seeds = range(max(1, args.curve_seeds))
    per_seed_curves: dict[tuple[str, str], dict[int, list[float]]] = {}
    for (variant, seed, steps), row in sorted(rows.items()):
        if seed in curve_seeds:
            for head in row["family_auc"]:
                per_seed_curves.setdefault((variant, head), {}).setdefault(steps, []).append(
                    unseen_mean(row, head, seen))
    # a budget enters a curve only where every curve seed reached it
    curves = {k: {s: v for s, v in pts.items() if len(v) == len(curve_seeds)} for k, pts in per_seed_curves.items()}
    which = "seed 0" if len(curve_seeds) == 1 else f"mean of seeds 0-{curve_seeds[-1]}, each seed in brackets"
    print(f"\nlearning curves (unseen mean, {which}):")
    for (variant, head), points in sorted(curves.items()):
        print(f"  {variant:<13}{head:<12}" + "  ".join(
            f"{s}: {statistics.fmean(v):.4f}" + (f" [{', '.join(f'{x:.4f}' for x in v)}]" if len(v) > 1 else "")
            for s, v in sorted(points.items())))
    if args.plot:
        plot_curves({k: v for k, v in curves.items() if k[0] in args.curve_variants.split(",")}, seen, args.plot)

    base = statistics.fmean(per_seed("baseline", "baseline"))
    student = statistics.fmean(per_seed(ref, "student"))
    print(json.dumps({
        "bench": "generalization", "benchmark": "synth", "split": args.split, "train_family": seen,
        "config": args.config, "steps": args.steps, "seeds": args.seeds, "overrides": args.overrides,
        "summary": summary, "diffs": diffs, "table4_order_holds": ordering, "shortcut": args.shortcut,
        "mechanism": mechanism, "calibration": calib,
        "curves": {f"{v}/{h}": {s: round(statistics.fmean(x), 4) for s, x in p.items()}
                   for (v, h), p in curves.items()},
        "curve_seeds": len(curve_seeds),
        "ratio": round(student / base, 4), "target": round((base + 0.02) / base, 4),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
