"""Evaluation reports: report.json, report.md, scores.csv, roc.png, attention pictures; each file written atomically.

Each file goes to a temporary name in the same folder and is renamed into place, so a report folder never holds a
half-written file (a killed job leaves the previous report or none).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from ltm.eval.metrics import video_scores  # noqa: E402
from ltm.eval.report.crossdata import link, summary  # noqa: E402
from ltm.eval.report.html import write_html  # noqa: E402
from ltm.eval.report.tables import SUMMARY_COLUMNS, fmt, markdown_table, summary_cell  # noqa: E402
from ltm.files import atomic_write_bytes, atomic_write_text, safe_filename  # noqa: E402

SCORE_COLUMNS = ("key", "video", "method", "label", "score")


def atomic_savefig(fig: plt.Figure, path: str | os.PathLike, dpi: int = 110) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------

def report_markdown(report: dict, pictures: Sequence[str] = ()) -> str:
    lines = [f"# Evaluation: {report['name']}", ""]
    lines += [f"- checkpoint: `{report['checkpoint']}`", f"- data: `{report['data']}`",
              f"- model: {report['model']['kind']} ({report['model']['backbone']}, "
              f"head {report['model']['inference_head']}, {report['model']['image_size']} px)",
              f"- video score: {report['video_agg']} of its frames' P(fake); accuracy at P(fake) >= "
              f"{report['threshold']:.4g}" + (f" (the EER threshold of `{report['threshold_from']}`)"
                                             if report.get("threshold_from") else ""),
              "- frames: " + (f"{report['frames_per_video']} evenly spaced frames per video"
                              if report.get("frames_per_video") else "all frames in the shards")
              + (f"; perturbation `{report['perturbation']}`" if report.get("perturbation") else ""), ""]
    if report.get("cross_dataset"):
        lines += [f"Cross-dataset table of this evaluation (every set and the mean): [{link(report, 'md')}]"
                  f"({link(report, 'md')})", ""]
    lines += markdown_table([c.title for c in SUMMARY_COLUMNS], [[summary_cell(report, c) for c in SUMMARY_COLUMNS]],
                            align="r") + [""]
    low = [(f, report.get("tpr_at_fpr", {}).get(f), report.get("video_tpr_at_fpr", {}).get(f))
           for f in report.get("tpr_at_fpr", {})]
    if low:
        lines += ["Low false-positive operating points (the ROC point with the best TPR at FPR <= the target; "
                  "threshold on P(fake)):", ""]
        lines += markdown_table(["FPR target", "frame TPR", "frame threshold", "video TPR", "video threshold"],
                                [[f"{float(target):.1%}", fmt((frame or {}).get("tpr")),
                                  fmt((frame or {}).get("threshold")), fmt((video or {}).get("tpr")),
                                  fmt((video or {}).get("threshold"))] for target, frame, video in low], align="r")
        lines.append("")
    if report["per_method"]:
        lines += ["Per fake method, against all real samples:", ""]
        lines += markdown_table(["method", "fake frames", "frame AUC", "video AUC"],
                                [[method, m["n_frames"], fmt(m["frame_auc"]), fmt(m["video_auc"])]
                                 for method, m in report["per_method"].items()])
        lines.append("")
    lines += [f"Real frames: {report['n_real']}, fake frames: {report['n_fake']}.", "", "![ROC](roc.png)", ""]
    if pictures:
        lines += ["Teacher attention (left: face crop; right: attention map, masked grid cells outlined):", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in pictures]
        lines.append("")
    if report.get("mask_diagnostics"):
        from ltm.eval.mask_diagnostics import diagnostics_markdown

        lines += diagnostics_markdown(report["mask_diagnostics"])
        lines += [f"![{Path(p).stem}]({p})" for p in report.get("regions") or []] + [""]
    errors = report.get("errors") or {}
    for kind, title in (("false_positives", "Most confident false positives (real called fake)"),
                        ("false_negatives", "Most confident false negatives (fake called real)")):
        if errors.get(kind):
            lines += [f"{title}:", ""] + [f"- `{e['key']}` P(fake) {e['p_fake']:.4f}: ![{e['key']}]({e['picture']})"
                                          for e in errors[kind]] + [""]
    return "\n".join(lines)


def print_table(reports: Sequence[dict]) -> None:
    """The cross-dataset table: one row per scored folder."""
    from rich.console import Console
    from rich.table import Table

    # the terminal keeps one low-FPR point, and leaves calibration to report.md
    columns = [c for c in SUMMARY_COLUMNS if c.title not in ("TPR@0.1%FPR", "ECE")]
    table = Table(title="ltm eval", show_lines=False)
    table.add_column("data", style="bold", no_wrap=True)
    for column in columns:
        table.add_column(column.title, justify="right", no_wrap=True)
    table.add_column("per-method frame AUC")
    for r in reports:
        per_method = ", ".join(f"{m} {fmt(v['frame_auc'], 3)}" for m, v in r["per_method"].items())
        table.add_row(r["name"], *(summary_cell(r, c) for c in columns), per_method)
    if len(reports) > 1:
        mean = summary(reports)["mean"]
        table.add_row("mean", *(fmt(mean.get(c.key)) if c.key in ("frame_auc", "video_auc") else "" for c in columns),
                      "")
    console = Console(width=max(140, Console().width))
    console.print(table)
    for r in reports:
        diag = r.get("mask_diagnostics")
        if diag:  # where fakes carry their manipulated region: does Eq. 4's mask land on it?
            per = [f"{m} hit rate {d['mask']['hit_rate']:.3f} (random mask {d['mask']['chance_hit_rate']:.3f}), "
                   f"masked in region {d['mask']['masked_in_region']:.3f} (region share "
                   f"{d['mask']['region_share']:.3f})" for m, d in diag["per_method"].items()]
            console.print(f"{r['name']}: the mask on known manipulated regions ({diag['n']} fakes, {diag['k']} of "
                          f"{diag['grid'][0] * diag['grid'][1]} cells masked): " + "; ".join(per), highlight=False)


# ---------------------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------------------


def plot_roc(path: str | os.PathLike, report: dict, rows: Sequence[Any]) -> None:
    labels = np.array([r.label for r in rows], dtype=np.float64)
    scores = np.array([r.score for r in rows], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    if report["frame_auc"] is not None:
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"frames (AUC {fmt(report['frame_auc'])})", lw=2)
        _, v_labels, v_scores = video_scores([r.video for r in rows], [r.method for r in rows], labels, scores,
                                             report["video_agg"])
        if report["video_auc"] is not None:
            fpr, tpr, _ = roc_curve(v_labels, v_scores)
            ax.plot(fpr, tpr, label=f"videos, {report['video_agg']} (AUC {fmt(report['video_auc'])})", lw=2)
    else:
        ax.text(0.5, 0.5, "one class only: ROC undefined", ha="center", va="center")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (real called fake)",
           ylabel="true positive rate (fake caught)", title=report["name"])
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    atomic_savefig(fig, path)


def level_aucs(result: dict, kind: str) -> list[float]:
    """A robustness result's frame AUC of `kind` at levels 1-5, NaN where it is undefined (one class scored)."""
    values = [result["auc"][kind][str(level)]["frame_auc"] for level in range(1, 6)]
    return [np.nan if v is None else float(v) for v in values]


def write_robustness(folder: str | os.PathLike, result: dict) -> None:
    """robustness.json, robustness.md (AUC per type and level) and robustness.png (AUC against level, one line per
    type, the clean AUC as a dashed reference) for one scored folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kinds = list(result["auc"])
    lines = [f"# Robustness: {result['name']}", "", f"- checkpoint: `{result['checkpoint']}`",
             f"- clean frame AUC {fmt(result['clean']['frame_auc'])}, video AUC {fmt(result['clean']['video_auc'])}",
             "- perturbations after DeeperForensics-1.0 (`ltm/data/perturb.py`), levels 1 (mild) to 5", "",
             "| frame AUC | " + " | ".join(f"level {k}" for k in range(1, 6)) + " | mean |", "|---|" + "---:|" * 6]
    for kind in kinds:
        values = [result["auc"][kind][str(k)]["frame_auc"] for k in range(1, 6)]
        known = [v for v in values if v is not None]
        mean = float(np.mean(known)) if known else None
        lines.append(f"| {kind} | " + " | ".join(fmt(v) for v in values) + f" | {fmt(mean)} |")
    atomic_write_text(folder / "robustness.md", "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    # types often share a value (every level at the clean AUC): each gets its own marker shape, the earlier ones
    # drawn larger, so a line under another still shows
    for i, kind in enumerate(kinds):
        ax.plot(range(1, 6), level_aucs(result, kind), marker="osD^v<>Px"[i % 9],
                markersize=max(3.0, 10.0 - 0.8 * i), label=kind)
    if result["clean"]["frame_auc"] is not None:
        ax.axhline(result["clean"]["frame_auc"], color="black", ls="--", lw=1, label="clean")
    ax.set(xlabel="perturbation level", ylabel="frame AUC", xticks=range(1, 6), title=result["name"])
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the axes: no line hidden
    atomic_savefig(fig, folder / "robustness.png")
    atomic_write_text(folder / "robustness.json", json.dumps(result, indent=2) + "\n")
    write_html(folder)  # the page shows the robustness plot beside the report (or alone)


def plot_attention(path: str | os.PathLike, image: torch.Tensor, attention: torch.Tensor | None,
                   mask: torch.Tensor | None, title: str, region: torch.Tensor | None = None) -> None:
    """Face crop beside the teacher's attention A (Eq. 2) upsampled over it, masked cells (M = 0, Eq. 4) outlined;
    the crop alone for a model without attention (Baseline). A known manipulated region (H, W) in [0, 1] is drawn
    as a contour at half strength on both panels."""
    img = image.permute(1, 2, 0).clamp(0, 1).numpy()
    if attention is None:
        fig, ax = plt.subplots(1, 1, figsize=(2.9, 3.1))
        ax.imshow(img)
        ax.set_title("face crop (no teacher attention)", fontsize=8)
        ax.set_axis_off()
        fig.suptitle(title, fontsize=8)
        atomic_savefig(fig, path)
        return
    size_h, size_w = img.shape[:2]
    grid_h, grid_w = attention.shape
    up = F.interpolate(attention[None, None].float(), size=(size_h, size_w), mode="bilinear", align_corners=False)
    up = up[0, 0].numpy()
    up = (up - up.min()) / (up.max() - up.min() + 1e-12)
    fig, axes = plt.subplots(1, 2, figsize=(5.6, 3.1))
    axes[0].imshow(img)
    axes[0].set_title("face crop", fontsize=8)
    axes[1].imshow(img)
    axes[1].imshow(up, cmap="jet", alpha=0.45)
    cell_h, cell_w = size_h / grid_h, size_w / grid_w
    for i, j in zip(*np.nonzero(mask.numpy() == 0)):
        axes[1].add_patch(Rectangle((j * cell_w - 0.5, i * cell_h - 0.5), cell_w, cell_h, fill=False,
                                    edgecolor="white", lw=1.5, ls="--"))
    axes[1].set_title(f"attention, {int((mask == 0).sum())}/{grid_h * grid_w} cells masked", fontsize=8)
    if region is not None and float(region.max()) > 0:
        level = 0.5 * float(region.max())
        for ax in axes:
            ax.contour(region.float().numpy(), levels=[level], colors="lime", linewidths=1.2)
        axes[0].set_title("face crop, manipulated region outlined", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=8)
    atomic_savefig(fig, path)


def write_attention(folder: str | os.PathLike, pictures: Sequence[tuple]) -> list[str]:
    """pictures: (key, label, image, attention, mask, p_fake); returns file names relative to the report folder."""
    names = []
    for n, (key, label, image, attention, mask, p_fake) in enumerate(pictures):
        kind = "fake" if label else "real"
        name = f"attention/{n:02d}_{kind}_{safe_filename(key)}.png"
        plot_attention(Path(folder) / name, image, attention, mask, f"{key} ({kind}) P(fake) = {p_fake:.3f}")
        names.append(name)
    return names


def write_regions(folder: str | os.PathLike, pictures: Sequence[tuple]) -> list[str]:
    """pictures: (method, key, image, mask map, mask, region) from `ltm.eval.mask_diagnostics.diagnose`; the mask's map
    with its masked cells and the true region outlined. Returns file names relative to the report folder."""
    names = []
    for n, (method, key, image, attention, mask, region) in enumerate(pictures):
        name = f"regions/{n:02d}_{safe_filename(method)}_{safe_filename(key)}.png"
        plot_attention(Path(folder) / name, image, attention, mask, f"{key} ({method})", region)
        names.append(name)
    return names


def write_mistakes(folder: str | os.PathLike, mistakes: Sequence[tuple], threshold: float) -> dict[str, list[dict]]:
    """The most confident false positives (label 0) and false negatives (label 1) as pictures under errors/;
    returns `{"false_positives": [{key, p_fake, picture}], "false_negatives": [...]}` in order of confidence."""
    out: dict[str, list[dict]] = {"false_positives": [], "false_negatives": []}
    for key, label, image, attention, mask, p_fake in mistakes:
        kind = "false_negatives" if label else "false_positives"
        short = "fn" if label else "fp"
        name = f"errors/{short}{len(out[kind]):02d}_{safe_filename(key)}.png"
        what = "fake called real" if label else "real called fake"
        plot_attention(Path(folder) / name, image, attention, mask,
                       f"{key}: {what}, P(fake) = {p_fake:.3f} (threshold {threshold:.3g})")
        out[kind].append({"key": key, "p_fake": p_fake, "picture": name})
    return out


# ---------------------------------------------------------------------------------------------------------------
# The report folder
# ---------------------------------------------------------------------------------------------------------------


def write_scores(path: str | os.PathLike, rows: Sequence[Any]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SCORE_COLUMNS)
    for r in rows:
        writer.writerow((r.key, r.video, r.method, r.label, f"{r.score:.8f}"))
    atomic_write_text(path, buf.getvalue())


def read_scores(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as f:
        return [dict(row, label=int(row["label"]), score=float(row["score"])) for row in csv.DictReader(f)]


def _drop_stale(folder: Path, sub: str, keep: Sequence[str]) -> None:
    for old in (folder / sub).glob("*.png"):  # pictures of an earlier evaluation of this folder
        if f"{sub}/{old.name}" not in keep:
            old.unlink()


def write_report(folder: str | os.PathLike, report: dict, rows: Sequence[Any], pictures: Sequence[tuple] = (),
                 mistakes: Sequence[tuple] = (), region_pictures: Sequence[tuple] = ()) -> None:
    """Everything for one scored folder; report.json, then report.html, last, so that report.json's presence means
    the folder is complete."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_scores(folder / "scores.csv", rows)
    plot_roc(folder / "roc.png", report, rows)
    picture_names = write_attention(folder, pictures)
    _drop_stale(folder, "attention", picture_names)
    report["attention"] = picture_names
    report["errors"] = write_mistakes(folder, mistakes, report["threshold"])
    report["regions"] = write_regions(folder, region_pictures)
    _drop_stale(folder, "regions", report["regions"])
    _drop_stale(folder, "errors", [e["picture"] for kind in report["errors"].values() for e in kind])
    atomic_write_text(folder / "report.md", report_markdown(report, picture_names))
    atomic_write_text(folder / "report.json", json.dumps(report, indent=2) + "\n")
    write_html(folder)
