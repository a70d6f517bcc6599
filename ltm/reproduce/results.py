"""Collecting a table: our AUC from each run's reports beside the paper's, as Markdown and JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ltm.paper_results import Cell, Table
from ltm.reproduce.configs import map_path
from ltm.reproduce.plan import report_dir, write_atomic


def _read_auc(run_dir: Path, cell: Cell, mapping: dict[str, str]) -> tuple[float | None, Path]:
    path = report_dir(run_dir, map_path(cell.data or "", mapping)) / "report.json"
    if not path.is_file():
        return None, path
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    if cell.method is None:
        value = report.get("frame_auc")
    else:
        method = mapping.get(cell.method, cell.method)
        per_method = report.get("per_method") or {}
        if method not in per_method:
            raise ValueError(f"{path}: no per_method entry {method!r} (has {sorted(per_method)})")
        value = per_method[method].get("frame_auc")
    if value is None:
        return None, path  # AUC undefined (one class only): shown as missing
    return 100.0 * float(value), path  # sklearn's AUC is a fraction; the paper prints percent


def collect(table: Table, runs: str | os.PathLike, mapping: dict[str, str] | None = None) -> dict[str, Any]:
    """Our AUC next to the paper's for every cell; missing reports are listed, not fatal."""
    runs = Path(runs)
    mapping = mapping or {}
    rows, missing = [], []
    for row in table.rows:
        cells: dict[str, dict[str, Any]] = {}
        for col in table.columns:
            cell = row.cells.get(col)
            if cell is None:
                continue
            entry: dict[str, Any] = {"paper": cell.paper, "ours": None, "diff": None, "run": cell.run}
            if col in table.average and not row.cited:
                parts = [cells.get(c, {}).get("ours") for c in table.average[col]]
                entry["status"] = "ok" if all(p is not None for p in parts) else "missing"
                if entry["status"] == "ok":
                    entry["ours"] = sum(parts) / len(parts)
            elif cell.run is None:
                entry["status"] = "cited"
            else:
                auc, path = _read_auc(runs / cell.run, cell, mapping)
                entry.update(ours=auc, report=str(path), data=cell.data, method=cell.method)
                entry["status"] = "ok" if auc is not None else "missing"
                if auc is None:
                    missing.append(str(path))
            if entry["ours"] is not None and cell.paper is not None:
                entry["diff"] = entry["ours"] - cell.paper
            cells[col] = entry
        rows.append({"key": row.key, "label": row.label, "train": row.train, "cited": row.cited, "cells": cells})
    return {
        "table": table.name,
        "caption": table.caption,
        "metric": "frame-level AUC (%)",
        "row_header": table.row_header,
        "columns": table.columns,
        "rows": rows,
        "missing": missing,
        "map": mapping,
    }


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def render_markdown(result: dict[str, Any]) -> str:
    title = result["table"].replace("table", "Table ")
    lines = [
        f"# {title}: {result['caption']}",
        "",
        f"{result['metric']}: ours, the paper's, and ours − paper. `missing`: no evaluation report yet; "
        "`—`: nothing to show (a number the paper cites from another paper, or `-` in the paper).",
    ]
    if result.get("map"):
        lines.append("Shard names mapped: " + ", ".join(f"{k} → {v}" for k, v in result["map"].items()) + ".")
    has_train = any(r["train"] for r in result["rows"])
    header = [result["row_header"]] + (["Train"] if has_train else [])
    for label in result["columns"].values():
        header += [f"{label} ours", f"{label} paper", "Δ"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result["rows"]:
        out = [row["label"]] + ([row["train"]] if has_train else [])
        for col in result["columns"]:
            c = row["cells"].get(col)
            if c is None:
                out += ["", "", ""]
                continue
            ours = "missing" if c["status"] == "missing" else _num(c["ours"])
            out += [ours, _num(c["paper"]), _num(c["diff"], signed=True)]
        lines.append("| " + " | ".join(out) + " |")
    if result["missing"]:
        lines += ["", f"Missing reports ({len(result['missing'])}):"] + [f"- `{p}`" for p in result["missing"]]
    return "\n".join(lines) + "\n"


def write_collected(result: dict[str, Any], runs: Path) -> tuple[Path, Path]:
    runs.mkdir(parents=True, exist_ok=True)
    md, js = runs / f"{result['table']}.md", runs / f"{result['table']}.json"
    write_atomic(js, json.dumps(result, indent=2) + "\n")
    write_atomic(md, render_markdown(result))
    return md, js
