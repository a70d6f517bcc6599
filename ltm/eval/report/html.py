"""report.html: one self-contained page per scored folder (every picture embedded), and `ltm eval --compare`.

The page is what a researcher opens after an evaluation: the protocol in one line, the headline table, the
low-FPR operating points, per-method AUC, the ROC curve, the robustness plot when `--robustness` ran, the teacher's
attention gallery and the most confident mistakes (the reals called fake with the highest P(fake), the fakes called
real with the lowest), each with its key. It is rebuilt from the folder's files (report.json, robustness.json and
the PNGs next to them) whenever one of them is written, so it always shows the folder's latest state.

A small script marks `<body data-images="ok:N">` once every image has decoded (`broken:K` otherwise): a headless
browser run of the page can check that nothing is missing.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

from ltm.eval.report.crossdata import html_section
from ltm.eval.report.tables import METRIC_COLUMNS, SUMMARY_COLUMNS, fmt, summary_cell, value
from ltm.files import atomic_write_text

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1200px;
       color: #1d1d1f; padding: 0 16px; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.6em;
     border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.meta { color: #555; font-size: 0.9em; line-height: 1.5; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f4f4f6; }
.better { color: #0a7d32; font-weight: 600; } .worse { color: #b3261e; font-weight: 600; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; border: 1px solid #e3e3e3; border-radius: 6px; padding: 6px; background: #fafafa; }
figure img { max-width: 100%; display: block; } figcaption { font-size: 0.8em; color: #444; margin-top: 4px;
     word-break: break-all; max-width: 420px; }
.side { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
.note { color: #777; font-style: italic; }
"""

IMAGE_CHECK = """
<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.dataset.images = broken.length ? "broken:" + broken.length : "ok:" + images.length;
});
</script>
"""

E = html.escape


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _image(folder: Path, name: str, alt: str, width: int | None = None) -> str:
    path = folder / name
    if not path.is_file():
        return f'<p class="note">picture {E(name)} is missing from {E(str(folder))}</p>'
    size = f' width="{width}"' if width else ""
    return f'<img src="{_data_uri(path)}" alt="{E(alt)}"{size}>'


def _figure(folder: Path, name: str, caption: str) -> str:
    return f"<figure>{_image(folder, name, caption)}<figcaption>{E(caption)}</figcaption></figure>"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{E(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{E(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n{body}\n{IMAGE_CHECK}</body></html>\n")


def protocol(report: dict) -> str:
    """One line: which frames, how videos are scored, which threshold, which perturbation."""
    frames = report.get("frames_per_video") or 0
    parts = [f"{frames} evenly spaced frames per video" if frames else "all frames in the shards",
             f"video score = {report.get('video_agg', 'mean')} of its frames' P(fake)",
             f"accuracy at P(fake) >= {report['threshold']:.4g}"
             + (f" (the EER threshold of {report['threshold_from']})" if report.get("threshold_from") else ""),
             f"perturbation {report['perturbation']}" if report.get("perturbation") else "clean images"]
    return "; ".join(parts)


def _report_sections(folder: Path, report: dict) -> list[str]:
    model = report["model"]
    out = [f"<h1>Evaluation: {E(report['name'])}</h1>",
           '<div class="meta">'
           f"checkpoint <code>{E(report['checkpoint'])}</code><br>data <code>{E(report['data'])}</code><br>"
           f"model {E(str(model['kind']))} ({E(str(model['backbone']))}, head {E(str(model['inference_head']))}, "
           f"{E(str(model['image_size']))} px); {report.get('world_size', 1)} rank(s), "
           f"{fmt(report.get('images_per_s'), 1)} images/s<br>protocol: {E(protocol(report))}</div>",
           "<h2>Summary</h2>",
           _table([c.title for c in SUMMARY_COLUMNS], [[E(summary_cell(report, c)) for c in SUMMARY_COLUMNS]])]
    if report.get("cross_dataset"):
        out.append(html_section(folder, report))
    low = report.get("tpr_at_fpr") or {}
    if low:
        rows = []
        for target, frame in low.items():
            video = (report.get("video_tpr_at_fpr") or {}).get(target) or {}
            frame = frame or {}
            rows.append([f"{float(target):.1%}", fmt(frame.get("tpr")), fmt(frame.get("threshold")),
                         fmt(video.get("tpr")), fmt(video.get("threshold"))])
        out += ["<p>Low false-positive operating points (the ROC point with the best TPR at FPR &le; the target):</p>",
                _table(["FPR target", "frame TPR", "frame threshold", "video TPR", "video threshold"], rows)]
    if report.get("per_method"):
        out += ["<h2>Per fake method</h2><p>each method's fakes against all real samples</p>",
                _table(["method", "fake frames", "frame AUC", "video AUC"],
                       [[E(m), str(v["n_frames"]), fmt(v["frame_auc"]), fmt(v["video_auc"])]
                        for m, v in report["per_method"].items()])]
    out += [f"<p>Real frames: {report['n_real']}, fake frames: {report['n_fake']}, videos: {report['n_videos']}.</p>",
            "<h2>ROC</h2>", _image(folder, "roc.png", "ROC curve")]
    return out


def _robustness_sections(folder: Path, result: dict) -> list[str]:
    levels = range(1, 6)
    rows = []
    for kind, by_level in result["auc"].items():
        values = [(by_level.get(str(k)) or {}).get("frame_auc") for k in levels]
        known = [v for v in values if v is not None]
        rows.append([E(kind), *(fmt(v) for v in values), fmt(sum(known) / len(known) if known else None)])
    clean = result.get("clean") or {}
    return ["<h2>Robustness</h2>",
            f"<p>Frame AUC under each perturbation at levels 1 (mild) to 5; clean frame AUC "
            f"{fmt(clean.get('frame_auc'))}, video AUC {fmt(clean.get('video_auc'))}.</p>",
            _table(["frame AUC", *(f"level {k}" for k in levels), "mean"], rows),
            _image(folder, "robustness.png", "AUC against perturbation level")]


def _gallery_sections(folder: Path, report: dict) -> list[str]:
    out = []
    if report.get("attention"):
        out += ["<h2>Teacher attention</h2><p>the crop, and the teacher's attention map upsampled over it; the "
                "grid cells the mask removes from the student's features are outlined</p>",
                '<div class="gallery">' + "".join(_figure(folder, name, Path(name).stem)
                                                  for name in report["attention"]) + "</div>"]
    diag = report.get("mask_diagnostics")
    if diag:
        h, w = diag["grid"]
        out += ["<h2>Does the mask find the manipulated region?</h2>",
                f"<p>{diag['n']} fakes with a known region; {h}x{w} grid, k = {diag['k']} cells masked "
                f"(strategy <code>{E(diag['mask_strategy'])}</code> on map <code>{E(diag['attention_map'])}</code>). "
                "Hit: one of the region's strongest cells is masked; chance: a random k-cell mask.</p>",
                _table(["method", "region", "n", "hit rate", "chance", "masked in region", "region share"],
                       [[E(m), E(", ".join(d["kinds"])), str(d["n"]), fmt(d["mask"]["hit_rate"], 3),
                         fmt(d["mask"]["chance_hit_rate"], 3), fmt(d["mask"]["masked_in_region"], 3),
                         fmt(d["mask"]["region_share"], 3)] for m, d in diag["per_method"].items()])]
        names = list(next(iter(diag["per_method"].values()))["maps"])
        out += ["<p>Hit rate of each map the teacher can rank cells by (its top k):</p>",
                _table(["method", *names], [[E(m), *(fmt(d["maps"][n]["hit_rate"], 3) for n in names)]
                                            for m, d in diag["per_method"].items()])]
        if report.get("regions"):
            out.append('<div class="gallery">' + "".join(_figure(folder, name, Path(name).stem)
                                                         for name in report["regions"]) + "</div>")
    errors = report.get("errors") or {}
    for kind, title, what in (("false_positives", "Most confident false positives", "real faces called fake, "
                               "highest P(fake) first"),
                              ("false_negatives", "Most confident false negatives", "fakes called real, lowest "
                               "P(fake) first")):
        if kind not in errors:
            continue
        out.append(f"<h2>{title}</h2><p>{what}, at threshold {report['threshold']:.4g}</p>")
        if errors[kind]:
            out.append('<div class="gallery">' + "".join(
                _figure(folder, e["picture"], f"{e['key']}  P(fake) = {e['p_fake']:.4f}") for e in errors[kind])
                + "</div>")
        else:
            out.append('<p class="note">none</p>')
    return out


def render_html(folder: str | os.PathLike) -> str:
    """The page for one report folder (report.json and/or robustness.json)."""
    folder = Path(folder)
    report = json.loads((folder / "report.json").read_text()) if (folder / "report.json").is_file() else None
    robustness = (json.loads((folder / "robustness.json").read_text())
                  if (folder / "robustness.json").is_file() else None)
    if report is None and robustness is None:
        raise FileNotFoundError(f"{folder}: holds neither report.json nor robustness.json")
    sections: list[str] = []
    if report is not None:
        sections += _report_sections(folder, report)
    else:
        sections += [f"<h1>Robustness: {E(robustness['name'])}</h1>",
                     f'<div class="meta">checkpoint <code>{E(robustness["checkpoint"])}</code><br>'
                     f'data <code>{E(robustness["data"])}</code></div>']
    if robustness is not None:
        sections += _robustness_sections(folder, robustness)
    if report is not None:
        sections += _gallery_sections(folder, report)
    return _page(f"ltm eval: {(report or robustness)['name']}", "\n".join(sections))


def write_html(folder: str | os.PathLike) -> Path:
    path = Path(folder) / "report.html"
    atomic_write_text(path, render_html(folder))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Two runs side by side
# ---------------------------------------------------------------------------------------------------------------


def report_folders(path: str | os.PathLike) -> dict[str, Path]:
    """{dataset name: report folder} of a run folder (`<run>/eval/*`), an eval root, or one report folder."""
    path = Path(path)
    if (path / "report.json").is_file():
        return {json.loads((path / "report.json").read_text())["name"]: path}
    root = path / "eval" if (path / "eval").is_dir() else path
    found = {f.name: f for f in sorted(root.glob("*")) if (f / "report.json").is_file()}
    if not found:
        raise FileNotFoundError(f"{str(path)!r}: no evaluation reports (looked for {root}/*/report.json; run "
                                "`ltm eval` first)")
    return found


def _delta(a: float | None, b: float | None, higher_is_better: bool = True) -> str:
    if a is None or b is None:
        return "n/a"
    d = b - a
    better = d > 0 if higher_is_better else d < 0
    css = "better" if d != 0 and better else "worse" if d != 0 else ""
    return f'<span class="{css}">{d:+.4f}</span>'


def render_compare(run_a: str | os.PathLike, run_b: str | os.PathLike) -> str:
    a, b = report_folders(run_a), report_folders(run_b)
    shared = [name for name in a if name in b]
    if not shared:
        raise ValueError(f"--compare: {str(run_a)!r} ({', '.join(a)}) and {str(run_b)!r} ({', '.join(b)}) have no "
                         "evaluated dataset in common")
    name_a, name_b = E(str(run_a)), E(str(run_b))
    sections = [f"<h1>Comparison</h1><div class='meta'>A: <code>{name_a}</code><br>B: <code>{name_b}</code><br>"
                f"datasets evaluated by both: {E(', '.join(shared))}"
                + (f"; only A: {E(', '.join(sorted(set(a) - set(b))))}" if set(a) - set(b) else "")
                + (f"; only B: {E(', '.join(sorted(set(b) - set(a))))}" if set(b) - set(a) else "") + "</div>"]
    for name in shared:
        ra = json.loads((a[name] / "report.json").read_text())
        rb = json.loads((b[name] / "report.json").read_text())
        rows = [[c.title, fmt(value(ra, c.key)), fmt(value(rb, c.key)),
                 _delta(value(ra, c.key), value(rb, c.key), c.higher_is_better)] for c in METRIC_COLUMNS]
        for method in sorted(set(ra.get("per_method", {})) | set(rb.get("per_method", {}))):
            fa = (ra.get("per_method", {}).get(method) or {}).get("frame_auc")
            fb = (rb.get("per_method", {}).get(method) or {}).get("frame_auc")
            rows.append([f"{E(method)} frame AUC", fmt(fa), fmt(fb), _delta(fa, fb)])
        sections += [f"<h2>{E(name)}</h2>",
                     f"<p class='meta'>A: {E(protocol(ra))}<br>B: {E(protocol(rb))}</p>",
                     _table(["metric", "A", "B", "B - A"], rows),
                     "<div class='side'>" + _figure(a[name], "roc.png", "A: ROC") + _figure(b[name], "roc.png",
                                                                                           "B: ROC") + "</div>"]
        if (a[name] / "robustness.png").is_file() and (b[name] / "robustness.png").is_file():
            sections.append("<div class='side'>" + _figure(a[name], "robustness.png", "A: robustness")
                            + _figure(b[name], "robustness.png", "B: robustness") + "</div>")
    return _page("ltm eval: comparison", "\n".join(sections))


def write_compare(run_a: str | os.PathLike, run_b: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """The comparison page at `out` (default `<A>/eval/compare-<B's folder name>.html`)."""
    if out is None:
        root = Path(run_a) / "eval" if (Path(run_a) / "eval").is_dir() else Path(run_a)
        out = root / f"compare-{Path(run_b).resolve().name}.html"
    page = render_compare(run_a, run_b)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)
    return Path(out)
