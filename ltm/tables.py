"""Number formatting and the headline columns shared by report.md, the terminal table and report.html.

Its own module because the three renderers (`ltm.report`, `ltm.report_html`) sit at different levels: report.py
writes a folder and then asks report_html for its page, so what both format with lives below both.
"""

from __future__ import annotations

import math
from typing import Any

# (column title, report key or a path into nested dicts)
SUMMARY_COLUMNS = (("frames", "n_frames"), ("videos", "n_videos"), ("frame AUC", "frame_auc"),
                   ("video AUC", "video_auc"), ("AP", "ap"), ("EER", "eer"), ("acc", "acc"),
                   ("TPR@1%FPR", ("tpr_at_fpr", "0.01", "tpr")), ("TPR@0.1%FPR", ("tpr_at_fpr", "0.001", "tpr")))


def fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def summary_cell(report: dict, key: str | tuple[str, ...]) -> str:
    """One SUMMARY_COLUMNS cell of a report: counts as integers, metrics with `fmt`."""
    if isinstance(key, tuple):  # a path into nested dicts; a missing level (older reports) reads as n/a
        value: Any = report
        for part in key:
            value = value.get(part) if isinstance(value, dict) else None
        return fmt(value)
    value = report.get(key)
    return str(value) if key.startswith("n_") else fmt(value)
