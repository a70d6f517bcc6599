"""The cross-dataset table of the generalization papers: one row per scored set (frame and video AUC) and their mean,
with the protocol that made it stated above the table.

`ltm eval --data A --data B ...` writes it beside the per-set report folders, in the eval root:
`cross-dataset.json`, `cross-dataset.md` and `cross-dataset.html` (each by temp + rename); every set's report.md and
report.html then show the same table and link to the page. `--protocol NAME` fixes how the numbers are made
(PROTOCOLS: frames per video, video aggregation) so that a table says exactly what it compares; without it the table
states the settings in force.

    PROTOCOLS: {name: {"frames_per_video": N or None, "video_agg": ..., "about": ...}}
    protocol_overrides(name) -> ["eval.frames_per_video=N", "eval.video_agg=..."]
    summary(reports, protocol=None) -> dict (rows, mean, protocol text)
    crossdata_markdown(table) -> str;  render_html(table) -> str;  html_section(folder, report) -> str (report.html)
    write(out_root, reports, protocol=None) -> dict (the table, with the paths written)
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from ltm.eval.report.tables import fmt, markdown_table
from ltm.files import atomic_write_text

NAME = "cross-dataset"

# The field's cross-dataset protocols. DeepfakeBench (Yan et al., 2023) scores 32 evenly spaced frames per test
# video and reports frame-level AUC, video-level AUC from the mean of the frames' scores; "all-frames" scores every
# crop in the shards (as many as prep wrote, 32 by default) with the same aggregation.
PROTOCOLS: dict[str, dict] = {
    "deepfakebench": {"frames_per_video": 32, "video_agg": "mean",
                      "about": "DeepfakeBench: 32 evenly spaced frames per video, video score = mean of its frames' "
                               "P(fake)"},
    "frames32-max": {"frames_per_video": 32, "video_agg": "max",
                     "about": "32 evenly spaced frames per video, video score = max of its frames' P(fake)"},
    "all-frames": {"frames_per_video": None, "video_agg": "mean",
                   "about": "every frame in the shards, video score = mean of its frames' P(fake)"},
}


def protocol_overrides(name: str) -> list[str]:
    """The config overrides that a protocol preset stands for."""
    if name not in PROTOCOLS:
        raise ValueError(f"--protocol {name!r}: expected one of {sorted(PROTOCOLS)}")
    p = PROTOCOLS[name]
    frames = p["frames_per_video"]
    return [f"eval.frames_per_video={frames if frames else 0}", f"eval.video_agg={p['video_agg']}"]


def _describe(frames: int | None, agg: str) -> str:
    how = f"{frames} evenly spaced frames per video" if frames else "all frames in the shards"
    return f"{how}, video score = {agg} of its frames' P(fake)"


def _num(v) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def summary(reports: Sequence[dict], protocol: str | None = None) -> dict:
    """One row per report (name, data, frame/video AUC, frames, videos) and the mean over the rows that have a
    value; `protocol` names the preset, else the protocol is read off the reports. Sets scored under different
    settings are flagged: their mean compares unlike numbers."""
    rows = [{"name": r["name"], "data": r.get("data"), "frame_auc": _num(r.get("frame_auc")),
             "video_auc": _num(r.get("video_auc")), "n_frames": r.get("n_frames"), "n_videos": r.get("n_videos"),
             "frames_per_video": r.get("frames_per_video") or None, "video_agg": r.get("video_agg", "mean"),
             "perturbation": r.get("perturbation")} for r in reports]
    mean = {}
    for key in ("frame_auc", "video_auc"):
        vals = [row[key] for row in rows if row[key] is not None]
        mean[key] = sum(vals) / len(vals) if vals else None
        mean[f"n_{key}"] = len(vals)
    settings = {(row["frames_per_video"], row["video_agg"], row["perturbation"]) for row in rows}
    if protocol is not None:
        text = PROTOCOLS[protocol]["about"]
    elif len(settings) == 1:
        frames, agg, _ = next(iter(settings))
        text = _describe(frames, agg)
    else:
        text = "mixed: " + "; ".join(f"{row['name']}: {_describe(row['frames_per_video'], row['video_agg'])}"
                                     for row in rows)
    perturb = {row["perturbation"] for row in rows} - {None}
    # the protocol asks for N frames per video; a set whose shards hold fewer is named, never passed off as N
    short = [row["name"] for row in rows if row["frames_per_video"] and row["n_videos"]
             and row["n_frames"] < row["frames_per_video"] * row["n_videos"]]
    return {"protocol": protocol, "protocol_text": text, "consistent": len(settings) == 1, "short_of_protocol": short,
            "perturbation": sorted(perturb), "rows": rows, "mean": mean,
            "checkpoint": reports[0].get("checkpoint") if reports else None}


def _per_video(row: dict) -> str:
    return f"{row['n_frames'] / row['n_videos']:.1f}" if row.get("n_videos") else "n/a"


def crossdata_markdown(table: dict) -> str:
    lines = ["# Cross-dataset evaluation", "",
             f"- protocol: {table['protocol'] + ' — ' if table['protocol'] else ''}{table['protocol_text']}; "
             "frame AUC over every scored frame, video AUC over videos",
             f"- checkpoint: `{table['checkpoint']}`"]
    if table["perturbation"]:
        lines.append(f"- perturbation: {', '.join(table['perturbation'])}")
    if not table["consistent"]:
        lines.append("- **the sets were scored under different settings: the mean mixes unlike numbers**")
    if table.get("short_of_protocol"):
        lines.append(f"- fewer frames per video than the protocol asks in: {', '.join(table['short_of_protocol'])} "
                     "(see frames/video)")
    m = table["mean"]
    rows = [[r["name"], fmt(r["frame_auc"]), fmt(r["video_auc"]), r["n_frames"], r["n_videos"], _per_video(r)]
            for r in table["rows"]]
    rows.append(["**mean**", f"**{fmt(m['frame_auc'])}**", f"**{fmt(m['video_auc'])}**", "", "", ""])
    lines += [""] + markdown_table(["data", "frame AUC", "video AUC", "frames", "videos", "frames/video"], rows)
    lines += ["",
              "frames/video: the frames actually scored per video on average (fewer than the protocol's where prep "
              "found no face on some frames: the prep manifest's `frames.short` lists those videos).", ""]
    return "\n".join(lines)


def _table_html(table: dict) -> str:
    """The table, its protocol line and its warnings, as an HTML fragment (the page, and each set's report.html)."""
    e = html.escape
    rows = "".join(f"<tr><td>{e(r['name'])}</td><td>{fmt(r['frame_auc'])}</td><td>{fmt(r['video_auc'])}</td>"
                   f"<td>{r['n_frames']}</td><td>{r['n_videos']}</td><td>{_per_video(r)}</td></tr>"
                   for r in table["rows"])
    m = table["mean"]
    rows += (f'<tr class="mean"><td>mean</td><td>{fmt(m["frame_auc"])}</td><td>{fmt(m["video_auc"])}</td>'
             "<td></td><td></td><td></td></tr>")
    warn = ("" if table["consistent"] else
            '<p class="warn">The sets were scored under different settings: the mean mixes unlike numbers.</p>')
    if table.get("short_of_protocol"):
        warn += (f'<p class="warn">Fewer frames per video than the protocol asks in: '
                 f"{e(', '.join(table['short_of_protocol']))} (see frames/video).</p>")
    proto = (f"{e(table['protocol'])} — " if table["protocol"] else "") + e(table["protocol_text"])
    return (f'<p class="meta" id="protocol">protocol: {proto}; frame AUC over every scored frame, video AUC over '
            f"videos<br>checkpoint <code>{e(str(table['checkpoint']))}</code></p>{warn}"
            '<table id="cross-dataset"><thead><tr><th>data</th><th>frame AUC</th><th>video AUC</th><th>frames</th>'
            f"<th>videos</th><th>frames/video</th></tr></thead><tbody>{rows}</tbody></table>"
            '<p class="meta">frames/video: the frames actually scored per video on average (fewer than the '
            "protocol's where prep found no face on some frames: the prep manifest's frames.short lists those "
            "videos)</p>")


def render_html(table: dict) -> str:
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>ltm eval: cross-dataset</title>'
            "<style>body{font-family:system-ui,sans-serif;margin:24px auto;max-width:900px;padding:0 16px}"
            "table{border-collapse:collapse}th,td{border:1px solid #ddd;padding:4px 10px;text-align:right}"
            "th:first-child,td:first-child{text-align:left}th{background:#f4f4f6}tr.mean td{font-weight:600}"
            ".warn{color:#b3261e}.meta{color:#555}</style></head><body>\n"
            f"<h1>Cross-dataset evaluation</h1>{_table_html(table)}\n</body></html>\n")


def _stored(folder: Path, report: dict) -> dict | None:
    """The eval root's table when it covers this report's set (never a table from another evaluation)."""
    f = Path(folder).parent / f"{NAME}.json"
    if not report.get("cross_dataset") or not f.is_file():
        return None
    try:
        table = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return table if any(r.get("name") == report.get("name") for r in table.get("rows", [])) else None


def html_section(folder: str | os.PathLike, report: dict) -> str:
    """For a set's report.html: the cross-dataset table of its evaluation, once written, with a link to its page."""
    table = _stored(Path(folder), report)
    head = f'<h2>Cross-dataset</h2><p><a href="{link(report, "html")}">the table on its own page</a></p>'
    return head + (_table_html(table) if table else "")


MARK = "<!-- cross-dataset -->"


def _embed_markdown(report_md: Path, table: dict) -> None:
    """The table at the end of a set's report.md, replacing the one an earlier write put there."""
    text = report_md.read_text()
    text = text.split(MARK)[0].rstrip("\n") + "\n\n"
    body = crossdata_markdown(table).replace("# Cross-dataset evaluation", "## Cross-dataset table", 1)
    atomic_write_text(report_md, text + MARK + "\n" + body)


def write(out_root: str | os.PathLike, reports: Sequence[dict], protocol: str | None = None) -> dict:
    """cross-dataset.{json,md,html} in the eval root (each by temp + rename; the JSON last)."""
    out_root = Path(out_root)
    table = summary(reports, protocol)
    atomic_write_text(out_root / f"{NAME}.md", crossdata_markdown(table))
    atomic_write_text(out_root / f"{NAME}.html", render_html(table))
    atomic_write_text(out_root / f"{NAME}.json", json.dumps(table, indent=2) + "\n")
    for folder in report_folders(out_root, reports):  # each set's report.md shows the table too, now all are scored
        if (folder / "report.md").is_file():
            _embed_markdown(folder / "report.md", table)
    return {**table, "paths": [str(out_root / f"{NAME}.{ext}") for ext in ("json", "md", "html")]}


def report_folders(out_root: str | os.PathLike, reports: Sequence[dict]) -> list[Path]:
    """Each set's report folder. The caller rebuilds their report.html after `write` (ltm.eval.report.html renders this
    module's section, so this module does not call it)."""
    return [Path(r.get("report_dir") or Path(out_root) / r["name"]) for r in reports]


def link(report: dict, ext: str) -> str | None:
    """The relative link from a set's report folder to the eval root's table, when the run wrote one."""
    return f"../{NAME}.{ext}" if report.get("cross_dataset") else None
