"""Collecting a table: our AUC (the mean over seeds, with its 95% t-interval from `ltm.sweep.stats`) from the
points' records, beside the paper's, as Markdown and JSON."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from ltm.eval.report.tables import markdown_table
from ltm.reproduce.configs import map_path
from ltm.reproduce.paper import Cell, Table
from ltm.reproduce.plan import write_atomic
from ltm.sweep import stats
from ltm.sweep.run import Sweep, is_done, read_record


def report_path(run_dir: Path, head: str, heads: list[str], data: str) -> Path:
    """The `report.json` a sweep's scoring of `data` wrote in the run folder (`ltm.sweep.run.run_point` with
    `full_reports`: `<run>/eval/[<head>/]<dataset>-<split>/`, named as `ltm.eval.evaluate.dataset_name` does)."""
    eval_dir = run_dir / "eval" if len(heads) == 1 else run_dir / "eval" / head
    return eval_dir / "-".join(Path(data).parts) / "report.json"


def _video_auc(record: dict[str, Any], cell: Cell, data: str, mapping: dict[str, str], run_dir: Path) -> float | None:
    """The cell's video AUC (a fraction) from the report the point's scoring wrote, None without one. The sweep
    record keeps frame AUCs only; the report's frame AUC must be the record's, or it came from another scoring."""
    head = record["heads"][0]
    path = report_path(run_dir, head, record["heads"], data)
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    frame = record["test"][head][data]
    if report.get("frame_auc") is None or not math.isclose(float(report["frame_auc"]), float(frame), rel_tol=1e-9):
        raise ValueError(f"{path}: frame AUC {report.get('frame_auc')} there, {frame} in the point's record: the "
                         "report is from another scoring (rescore the point, or remove the report)")
    if cell.method is None:
        return report.get("video_auc")
    method = mapping.get(cell.method, cell.method)
    return (report.get("per_method") or {}).get(method, {}).get("video_auc")


def _point_auc(record: dict[str, Any], cell: Cell, data: str, mapping: dict[str, str], where: Path,
               run_dir: Path) -> float | None:
    """The cell's AUC (in %) in one point's record, None where it was not scored (or undefined)."""
    head = record["heads"][0]
    if data not in record["test"].get(head, {}):
        return None
    if cell.metric == "video":
        value = _video_auc(record, cell, data, mapping, run_dir)
        return None if value is None else 100.0 * float(value)
    if cell.method is None:
        value = record["test"][head][data]
    else:
        method = mapping.get(cell.method, cell.method)
        per_method = record.get("test_methods", {}).get(head, {}).get(data, {})
        if method not in per_method:
            raise ValueError(f"{where}: no per-method AUC {method!r} on {data} (has {sorted(per_method)})")
        value = per_method[method]
    return 100.0 * float(value)  # sklearn's AUC is a fraction; the paper prints percent


def _summary(per_seed: dict[int, float]) -> dict[str, Any]:
    iv = stats.interval(list(per_seed.values()))
    finite = math.isfinite(iv.lo)
    return {"ours": iv.mean, "lo": iv.lo if finite else None, "hi": iv.hi if finite else None, "n": iv.n,
            "per_seed": {str(k): round(v, 4) for k, v in sorted(per_seed.items())}}


def collect(table: Table, sweep: Sweep, mapping: dict[str, str] | None = None) -> dict[str, Any]:
    """Our AUC next to the paper's for every cell, over the sweep's seeds; missing points are listed, not fatal."""
    mapping = mapping or {}
    records = {}
    for run, seed in sweep.points():
        record = read_record(sweep.record_path(run, seed))
        if is_done(record):
            records[run, seed] = record
    rows, missing = [], []
    for row in table.rows:
        cells: dict[str, dict[str, Any]] = {}
        seeds_of: dict[str, dict[int, float]] = {}
        for col in table.columns:
            cell = row.cells.get(col)
            if cell is None:
                continue
            entry: dict[str, Any] = {"paper": cell.paper, "ours": None, "diff": None, "run": cell.run}
            if col in table.average and not row.cited:
                parts = [seeds_of.get(c, {}) for c in table.average[col]]
                common = set.intersection(*(set(p) for p in parts)) if parts else set()
                complete = all(cells.get(c, {}).get("status") == "ok" for c in table.average[col])
                entry["status"] = "ok" if complete and common else "missing"
                if entry["status"] == "ok":  # per seed first, so the interval is over seeds
                    entry.update(_summary({s: statistics.fmean(p[s] for p in parts) for s in sorted(common)}))
            elif cell.run is None:
                entry["status"] = "cited"
            else:
                data = map_path(cell.data or "", mapping)
                per_seed = {}
                for seed in sweep.seeds:
                    where = sweep.record_path(cell.run, seed)
                    auc = _point_auc(records[cell.run, seed], cell, data, mapping, where,
                                     sweep.run_dir(cell.run, seed)) if (cell.run, seed) in records else None
                    if auc is None:
                        missing.append(f"{cell.run} seed {seed}: {data}")
                    else:
                        per_seed[seed] = auc
                entry.update(data=data, method=cell.method, metric=cell.metric)
                entry["status"] = "ok" if len(per_seed) == len(sweep.seeds) else "missing"
                if entry["status"] == "ok":
                    entry.update(_summary(per_seed))
                    seeds_of[col] = per_seed
            if entry["ours"] is not None and cell.paper is not None:
                entry["diff"] = entry["ours"] - cell.paper
            cells[col] = entry
        rows.append({"key": row.key, "label": row.label, "train": row.train, "cited": row.cited, "cells": cells})
    return {
        "table": table.name,
        "caption": table.caption,
        "metric": table.metric,
        "reference": table.reference,
        "seeds": list(sweep.seeds),
        "row_header": table.row_header,
        "columns": table.columns,
        "rows": rows,
        "missing": list(dict.fromkeys(missing)),
        "map": mapping,
    }


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _ours(c: dict[str, Any]) -> str:
    if c["status"] == "missing":
        return "missing"
    if c.get("lo") is None:
        return _num(c["ours"])
    return f"{c['ours']:.2f} ({c['lo']:.2f} .. {c['hi']:.2f})"


def results_markdown(result: dict[str, Any]) -> str:
    name = result["table"]
    title = name.replace("table", "Table ") if name.startswith("table") else name.capitalize()
    ref = result.get("reference", "paper")
    theirs = "the paper's" if ref == "paper" else f"the {ref} figure"
    seeds = result.get("seeds") or [0]
    over = (f"the mean over {len(seeds)} seeds ({', '.join(map(str, seeds))}) with its 95% t-interval"
            if len(seeds) > 1 else f"one seed ({seeds[0]}; `--seeds N` gives intervals)")
    lines = [
        f"# {title}: {result['caption']}",
        "",
        f"{result['metric']}: ours ({over}), {theirs}, and ours − {ref}. `missing`: not scored yet; "
        + ("`—`: nothing to show (a number the paper cites from another paper, or `-` in the paper)." if ref == "paper"
           else f"`—`: nothing to show (a row of {ref} figures only, or no {ref} figure there)."),
    ]
    if result.get("map"):
        lines.append("Shard names mapped: " + ", ".join(f"{k} → {v}" for k, v in result["map"].items()) + ".")
    has_train = any(r["train"] for r in result["rows"])
    header = [result["row_header"]] + (["Train"] if has_train else [])
    for label in result["columns"].values():
        header += [f"{label} ours", f"{label} {ref}", "Δ"]
    rows = []
    for row in result["rows"]:
        out = [row["label"]] + ([row["train"]] if has_train else [])
        for col in result["columns"]:
            c = row["cells"].get(col)
            out += ["", "", ""] if c is None else [_ours(c), _num(c["paper"]), _num(c["diff"], signed=True)]
        rows.append(out)
    lines += [""] + markdown_table(header, rows, align="l" * len(header))
    if result["missing"]:
        lines += ["", f"Not scored yet ({len(result['missing'])}):"] + [f"- {p}" for p in result["missing"]]
    return "\n".join(lines) + "\n"


def write_collected(result: dict[str, Any], runs: Path) -> tuple[Path, Path]:
    runs.mkdir(parents=True, exist_ok=True)
    md, js = runs / f"{result['table']}.md", runs / f"{result['table']}.json"
    write_atomic(js, json.dumps(result, indent=2) + "\n")
    write_atomic(md, results_markdown(result))
    return md, js
