"""The paper's Tables 1-5 as data: which of our runs fills each cell, and the number the paper reports there.

Every cell names the experiment config that trains it (`ltm/configs/experiments/<run>.yaml`, the run folder is
`<runs>/<run>/`), the shard split folder its evaluation job scores (report in `<run>/eval/<dataset>-<split>/`),
and, for the per-method tables, the fake method whose AUC against the reals of that split is the cell
(`report.json` -> `per_method[<method>].frame_auc`); otherwise the cell is the split's overall `frame_auc`.
All numbers are frame-level AUC in percent, as printed in the paper (Sec. 4, Tables 1-5).

Runs shared between tables are trained once: Table 4's `high` row is Table 2's FF++ (c23) and WDF runs and
Table 3's FF-DF run; Table 5's Xception / Xception cell is Table 2's FF++ (c23) run — the paper prints the same
numbers there (98.59, 86.70, 81.41). Rows of other methods that the paper cites from their own papers have no run
(`run=None`); they are printed for comparison only.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Cell:
    run: str | None  # experiment name; None: a number the paper cites from another paper (no run of ours)
    data: str | None = None  # split folder relative to the shard root, e.g. "ffpp_c23/test"
    method: str | None = None  # per_method key of report.json; None = the split's overall frame_auc
    paper: float | None = None  # the paper's AUC in %, None where it prints "-"
    metric: str = "frame"  # frame: report.json's frame_auc | video: its video_auc (the foundation table)


@dataclass(frozen=True)
class Row:
    key: str  # short id for --rows
    label: str  # as printed in the paper
    cells: dict[str, Cell]  # column key -> cell
    train: str = ""  # the paper's "Train" column (Table 3)

    @property
    def cited(self) -> bool:
        return all(c.run is None for c in self.cells.values())


@dataclass(frozen=True)
class Table:
    name: str  # table1 .. table5
    caption: str
    columns: dict[str, str]  # column key -> header as printed
    rows: list[Row]
    row_header: str = "Methods"
    average: dict[str, list[str]] = field(default_factory=dict)  # derived column -> the columns it averages
    metric: str = "frame-level AUC (%)"  # what the cells are, as the collected table says
    reference: str = "paper"  # whose numbers the reference column holds

    def runs(self) -> list[str]:
        """Our runs in this table, in row order, each once."""
        seen: dict[str, None] = {}
        for row in self.rows:
            for cell in row.cells.values():
                if cell.run is not None:
                    seen.setdefault(cell.run, None)
        return list(seen)


def _cited(key: str, label: str, values: dict[str, float | None], train: str = "") -> Row:
    return Row(key, label, {c: Cell(None, paper=v) for c, v in values.items()}, train=train)


FF_METHODS = {"df": "Deepfakes", "f2f": "Face2Face", "fs": "FaceSwap", "nt": "NeuralTextures"}

# Table 1: FF++ (c40) in-dataset, one training per manipulation method.
TABLE1 = Table(
    name="table1",
    caption="Overall performances on FF++ (c40) in-dataset evaluation.",
    columns={"df": "DF", "f2f": "F2F", "fs": "FS", "nt": "NT"},
    rows=[
        Row("baseline", "Xception [11]", {
            m: Cell(f"ffpp_c40_{m}_baseline", "ffpp_c40/test", full, p)
            for (m, full), p in zip(FF_METHODS.items(), (99.08, 93.77, 97.42, 84.23))
        }),
        _cited("spsl", "SPSL [15]", {"df": 98.50, "f2f": 94.62, "fs": 98.10, "nt": 80.49}),
        Row("ltm", "Ours-Xception", {
            m: Cell(f"ffpp_c40_{m}_ltm", "ffpp_c40/test", full, p)
            for (m, full), p in zip(FF_METHODS.items(), (99.54, 96.42, 98.79, 85.93))
        }),
    ],
)

# Table 2: in-dataset on FF++ (c23), Celeb-DF v2 and WildDeepfake.
TABLE2 = Table(
    name="table2",
    caption="Performances of in-dataset evaluation on FF++ (c23), CelebDF, and WDF.",
    columns={"ffpp_c23": "FF++ (c23)", "celebdf": "CelebDF", "wdf": "WDF", "avg": "Avg"},
    rows=[
        _cited("spsl", "SPSL [15]", {"ffpp_c23": 95.32, "celebdf": None, "wdf": None, "avg": None}),
        _cited("rfm", "RFM [16]", {"ffpp_c23": 98.79, "celebdf": 99.94, "wdf": 83.92, "avg": 94.21}),
        _cited("addnet", "Add-Net [13]", {"ffpp_c23": 97.74, "celebdf": 99.55, "wdf": 86.17, "avg": 94.48}),
        _cited("f3net", "F3-Net [17]", {"ffpp_c23": 98.10, "celebdf": 98.93, "wdf": 87.53, "avg": 94.85}),
        Row("ltm", "Ours-Xception", {
            "ffpp_c23": Cell("ffpp_c23_ltm", "ffpp_c23/test", None, 98.59),
            "celebdf": Cell("celebdf_v2_ltm", "celebdf_v2/test", None, 99.45),
            "wdf": Cell("wdf_ltm", "wdf/test", None, 86.70),
            "avg": Cell(None, paper=94.91),  # ours: the mean of the three cells (see `average`)
        }),
    ],
    average={"avg": ["ffpp_c23", "celebdf", "wdf"]},
)


def _t3(key: str, label: str, run: str, method: str | None, train: str, paper: tuple[float, float]) -> Row:
    return Row(key, label, {
        "in": Cell(run, "ffpp_c23/test", method, paper[0]),
        "celebdf": Cell(run, "celebdf_v2/test", None, paper[1]),
    }, train=train)


# Table 3: trained on (subsets of) FF++ (c23), tested in-dataset and on Celeb-DF v2 (unseen).
TABLE3 = Table(
    name="table3",
    caption="Cross evaluations on CelebDF, our method is trained on the subset of FF++.",
    columns={"in": "In-dataset", "celebdf": "CelebDF"},
    rows=[
        _t3("baseline", "Xception [11]", "ffpp_c23_baseline", None, "FF++", (99.70, 65.30)),
        _cited("spsl", "SPSL [11]", {"in": 99.80, "celebdf": 67.40}, train="FF++"),
        _t3("df", "Ours", "ffpp_c23_df_ltm", "Deepfakes", "FF-DF", (99.90, 81.41)),
        _t3("df_nomixup", "Ours -w/o mixup", "ffpp_c23_df_ltm_nomixup", "Deepfakes", "FF-DF", (99.91, 80.04)),
        _t3("f2f", "Ours", "ffpp_c23_f2f_ltm", "Face2Face", "FF-F2F", (99.62, 74.92)),
        _t3("f2f_nomixup", "Ours -w/o mixup", "ffpp_c23_f2f_ltm_nomixup", "Face2Face", "FF-F2F", (99.65, 72.48)),
        _t3("nt", "Ours", "ffpp_c23_nt_ltm", "NeuralTextures", "FF-NT", (98.54, 76.52)),
        _t3("nt_nomixup", "Ours -w/o mixup", "ffpp_c23_nt_ltm_nomixup", "NeuralTextures", "FF-NT", (98.75, 76.39)),
    ],
)


def _t4(strategy: str, paper: tuple[float, float, float]) -> Row:
    suffix = "" if strategy == "high" else f"_{strategy}"
    return Row(strategy, strategy, {
        "ffpp_c23": Cell(f"ffpp_c23_ltm{suffix}", "ffpp_c23/test", None, paper[0]),
        "wdf": Cell(f"wdf_ltm{suffix}", "wdf/test", None, paper[1]),
        "celebdf": Cell(f"ffpp_c23_df_ltm{suffix}", "celebdf_v2/test", None, paper[2]),  # trained on FF-DF (c23)
    })


# Table 4: masking strategy (ratio 0.25 throughout).
TABLE4 = Table(
    name="table4",
    caption="Effectiveness of the proposed method with different masking strategies.",
    row_header="Strategy",
    columns={"ffpp_c23": "FF++ (c23)", "wdf": "WDF", "celebdf": "CelebDF"},
    rows=[
        _t4("high", (98.59, 86.70, 81.41)),
        _t4("low", (99.10, 87.32, 77.48)),
        _t4("random", (99.04, 87.44, 80.95)),
    ],
)

BACKBONES = {"resnet18": "ResNet18", "resnet34": "ResNet34", "xception": "Xception"}
_T5 = {  # student -> teacher -> paper
    "resnet18": {"resnet18": 95.59, "resnet34": 96.10, "xception": 96.02},
    "resnet34": {"resnet18": 96.31, "resnet34": 96.24, "xception": 96.52},
    "xception": {"resnet18": 98.64, "resnet34": 98.69, "xception": 98.59},
}


def _t5_run(student: str, teacher: str) -> str:
    return "ffpp_c23_ltm" if student == teacher == "xception" else f"ffpp_c23_ltm_s-{student}_t-{teacher}"


# Table 5: student (rows) x teacher (columns) backbones, FF++ (c23) in-dataset.
TABLE5 = Table(
    name="table5",
    caption="Effectiveness of different architectures for student and teacher networks.",
    row_header="Student \\ Teacher",
    columns={t: f"Teacher {label}" for t, label in BACKBONES.items()},
    rows=[
        Row(s, f"Student {BACKBONES[s]}", {
            t: Cell(_t5_run(s, t), "ffpp_c23/test", None, _T5[s][t]) for t in BACKBONES
        })
        for s in BACKBONES
    ],
)

TABLES: dict[str, Table] = {t.name: t for t in (TABLE1, TABLE2, TABLE3, TABLE4, TABLE5)}
