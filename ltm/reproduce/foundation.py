"""The foundation-model table: LTM on CLIP ViT-L/14 and its Baselines beside the field's published figures.

    ltm reproduce foundation --runs runs/foundation --estimate            # GPU hours, no shards needed
    ltm reproduce foundation --shards /data/shards --runs runs/foundation --seeds 3

Trained on FF++ c23 (all four methods), scored on Celeb-DF v2, DFDC, DFDC-Preview and DFD as the field does:
32 evenly spaced frames per video, frame AUC and video AUC (a video's score is the mean of its frames' P(fake);
`eval.frames_per_video` and `eval.video_agg` of the `clip-l14` config). Every run is an experiment config under
`ltm/configs/experiments/foundation/` on the `clip-l14` base, so the table is one sweep with one budget.

Frame cells read the sweep record (as the paper's tables); video cells read the `report.json` the same scoring wrote
in the run folder (`ltm.reproduce.results`). The reference column holds the published figures (AUC in %); a figure
the source prints at another level than the column's, or not at all, is `—`.
"""

from __future__ import annotations

from ltm.reproduce.paper import TABLES, Cell, Row, Table

# (column key prefix, header, shard split folder of our evaluation): the field's four cross-dataset sets
DATASETS = (
    ("celebdf", "Celeb-DF v2", "celebdf_v2/test"),
    ("dfdc", "DFDC", "dfdc/test"),
    ("dfdcp", "DFDC-P", "dfdcp/test"),
    ("dfd", "DFD", "dfd_c23/test"),
)
LEVELS = ("frame", "video")
TRAIN = "FF++ c23"

# Published AUC (%) per source and level, datasets in DATASETS order; None where the source prints none.
PUBLISHED: dict[str, dict[str, tuple[float | None, ...]]] = {
    # Effort (ICML 2025): CLIP ViT-L/14 with a rank-1 SVD residual of q/k/v/out in every block, and a head. Its
    # cross-dataset table compares against video-level detectors; its figures sit in the video columns.
    "effort": {"video": (95.6, 84.3, 90.9, 96.5)},
    # Forensics Adapter (CVPR 2025): frozen CLIP ViT-L/14 with a side adapter; frame-level table, and video-level
    # Celeb-DF v2.
    "forensics_adapter": {"frame": (90.0, 84.3, 89.0, 93.3), "video": (95.7, None, None, None)},
    # DeepfakeBench's Xception (frame-level).
    "deepfakebench_xception": {"frame": (73.7, 70.8, 73.7, 81.6)},
    # The LTM paper's Xception student trained on FF-DF (c23) only (Table 3), Celeb-DF v2 frame AUC.
    "ltm_paper": {"frame": (81.41, None, None, None)},
}

COLUMNS: dict[str, str] = {f"{key}_{level}": f"{name} {level}" for key, name, _ in DATASETS for level in LEVELS}
COLUMNS.update({f"avg_{level}": f"Mean {level}" for level in LEVELS})
AVERAGE: dict[str, list[str]] = {f"avg_{level}": [f"{key}_{level}" for key, _, _ in DATASETS] for level in LEVELS}

# Our runs: row key -> (label as printed, experiment name)
OURS = {
    "ltm_clip": ("LTM-CLIP (ViT-L/14 student and teacher)", "ffpp_c23_clip_l14"),
    "baseline_clip": ("Baseline-CLIP (ViT-L/14, LayerNorms: GenD's recipe, CE only)", "ffpp_c23_clip_l14_baseline"),
    "ltm_dinov2": ("LTM-DINOv2 (ViT-B/14 student and teacher)", "ffpp_c23_dinov2_b14"),
}


def _ours(key: str, label: str, run: str) -> Row:
    cells = {f"{k}_{level}": Cell(run, data, None, None, level) for k, _, data in DATASETS for level in LEVELS}
    cells.update({avg: Cell(None) for avg in AVERAGE})  # ours: the mean of the row's cells (see `average`)
    return Row(key, label, cells, train=TRAIN)


def _published(key: str, label: str, train: str = TRAIN) -> Row:
    figures = PUBLISHED[key]
    cells: dict[str, Cell] = {}
    for level in LEVELS:
        values = figures.get(level, (None,) * len(DATASETS))
        for (k, _, _), value in zip(DATASETS, values, strict=True):
            cells[f"{k}_{level}"] = Cell(None, paper=value, metric=level)
        cells[f"avg_{level}"] = Cell(None, metric=level)  # a mean none of the sources prints: `—`
    return Row(key, label, cells, train=train)


FOUNDATION = Table(
    name="foundation",
    caption="Foundation models trained on FF++ (c23), tested on Celeb-DF v2, DFDC, DFDC-P and DFD.",
    columns=COLUMNS,
    rows=[
        *(_ours(key, label, run) for key, (label, run) in OURS.items()),
        _published("effort", "Effort (ICML 2025; CLIP ViT-L/14, SVD residual)"),
        _published("forensics_adapter", "Forensics Adapter (CVPR 2025; frozen CLIP ViT-L/14 + adapter)"),
        _published("deepfakebench_xception", "Xception (DeepfakeBench)"),
        _published("ltm_paper", "LTM paper (Xception student)", train="FF-DF (c23)"),
    ],
    average=AVERAGE,
    metric="AUC (%): frame-level, and video-level with a video's score the mean of its 32 frames' P(fake)",
    reference="published",
)

# Every table `ltm reproduce` runs: the paper's five, then this one.
ALL_TABLES: dict[str, Table] = {**TABLES, FOUNDATION.name: FOUNDATION}
