"""The one table renderer and the headline metric columns, for every table ltm writes.

report.md, the terminal table, report.html, the comparison page, the cross-dataset table, the mask diagnostics, the
sweep's and the paper reproduction's tables all format numbers with `fmt` and lay Markdown tables out with
`markdown_table`; which metrics a report's summary shows, and which way each is better, is `SUMMARY_COLUMNS`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Column:
    title: str
    key: str | tuple[str, ...]  # a report key, or a path into nested dicts
    higher_is_better: bool = True


COUNT_COLUMNS = (Column("frames", "n_frames"), Column("videos", "n_videos"))
METRIC_COLUMNS = (Column("frame AUC", "frame_auc"), Column("video AUC", "video_auc"), Column("AP", "ap"),
                  Column("EER", "eer", higher_is_better=False), Column("acc", "acc"),
                  Column("ECE", "ece", higher_is_better=False),
                  Column("TPR@1%FPR", ("tpr_at_fpr", "0.01", "tpr")),
                  Column("TPR@0.1%FPR", ("tpr_at_fpr", "0.001", "tpr")))
SUMMARY_COLUMNS = COUNT_COLUMNS + METRIC_COLUMNS


def fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def value(report: dict, key: str | tuple[str, ...]) -> Any:
    """A column's value in a report; a missing level of a nested path (older reports) reads as None."""
    if isinstance(key, str):
        return report.get(key)
    found: Any = report
    for part in key:
        found = found.get(part) if isinstance(found, dict) else None
    return found


def summary_cell(report: dict, column: Column) -> str:
    """One SUMMARY_COLUMNS cell of a report: counts as integers, metrics with `fmt`."""
    found = value(report, column.key)
    return str(found) if column in COUNT_COLUMNS else fmt(found)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | Sequence[str] = "l") -> list[str]:
    """A Markdown table as lines. `align`: one letter per column ("l" or "r"), or one letter for the first column
    with every later column right-aligned (numbers)."""
    if isinstance(align, str) and len(align) == 1:
        align = [align] + ["r"] * (len(header) - 1)
    if len(align) != len(header):
        raise ValueError(f"markdown_table: {len(align)} alignments for {len(header)} columns")
    rule = {"l": "---", "r": "---:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule[a] for a in align) + "|"]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"markdown_table: a row of {len(row)} cells under {len(header)} columns: {row}")
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return lines
