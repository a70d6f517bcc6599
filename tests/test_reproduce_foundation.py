"""`ltm reproduce foundation` and its recipes: clip-l14, clip-l14-baseline, dinov2-b14 (fast, no training)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ltm.cli import main
from ltm.config import load_config, to_dict
from ltm.reproduce import collect, experiment_path, results_markdown, run_config, table_sweep
from ltm.reproduce.foundation import ALL_TABLES, DATASETS, FOUNDATION, OURS
from ltm.reproduce.paper import TABLES
from ltm.reproduce.results import report_path
from ltm.sweep.run import fingerprint, write_json

RECIPES = ("clip-l14", "clip-l14-baseline", "dinov2-b14")
TEST_SPLITS = ["celebdf_v2/test", "dfdc/test", "dfdcp/test", "dfd_c23/test"]

# The published AUCs (%) as the sources print them, (row, column) -> figure; written out here, not derived from the
# module, so that a figure moved to another row, dataset or level fails.
PUBLISHED = {
    ("effort", "celebdf_video"): 95.6, ("effort", "dfdc_video"): 84.3, ("effort", "dfdcp_video"): 90.9,
    ("effort", "dfd_video"): 96.5,
    ("forensics_adapter", "celebdf_frame"): 90.0, ("forensics_adapter", "celebdf_video"): 95.7,
    ("forensics_adapter", "dfdc_frame"): 84.3, ("forensics_adapter", "dfdcp_frame"): 89.0,
    ("forensics_adapter", "dfd_frame"): 93.3,
    ("deepfakebench_xception", "celebdf_frame"): 73.7, ("deepfakebench_xception", "dfdc_frame"): 70.8,
    ("deepfakebench_xception", "dfdcp_frame"): 73.7, ("deepfakebench_xception", "dfd_frame"): 81.6,
    ("ltm_paper", "celebdf_frame"): 81.41,
}


def _model(cfg) -> dict:
    return to_dict(cfg)["model"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_with_the_field_protocol(name: str) -> None:
    cfg = load_config(name)
    m, t, e = cfg.model, cfg.train, cfg.eval
    assert (m.mask_at, m.mask_fill, m.mask_block, m.tune) == ("tokens", "drop", 0, "ln")
    assert m.backbone == m.teacher_backbone and m.backbone.startswith(("vit_large_patch14_clip_224.openai",
                                                                      "vit_base_patch14_dinov2"))
    assert m.pretrained == "imagenet"
    assert (t.optimizer, t.lr, t.schedule, t.precision, t.batch_size) == ("adamw", 3e-4, "cosine", "bf16", 32)
    assert 0 < t.warmup_steps < t.epochs * t.iters_per_epoch and t.weight_decay > 0
    assert (cfg.data.image_size, e.frames_per_video, e.video_agg) == (224, 32, "mean")
    assert cfg.launch.gpus_per_node >= 1
    assert m.kind == ("baseline" if name.endswith("baseline") else "ltm")


def test_baseline_differs_from_ltm_by_the_teacher_only() -> None:
    ltm, baseline = to_dict(load_config("clip-l14")), to_dict(load_config("clip-l14-baseline"))
    ltm["model"]["kind"] = "baseline"
    assert ltm == baseline


def test_config_command_prints_the_recipe() -> None:
    proc = subprocess.run([sys.executable, "-m", "ltm.cli", "config", "--config", "clip-l14"], capture_output=True,
                          text=True, timeout=120, check=True)
    out = proc.stdout
    for line in ("backbone: vit_large_patch14_clip_224.openai", "teacher_backbone: vit_large_patch14_clip_224.openai",
                 "mask_at: tokens", "mask_fill: drop", "tune: ln", "optimizer: adamw", "schedule: cosine",
                 "precision: bf16", "image_size: 224", "frames_per_video: 32", "video_agg: mean", "lr: 0.0003"):
        assert re.search(rf"^\s*{re.escape(line)}$", out, re.M), line


@pytest.mark.parametrize("row", list(OURS))
def test_experiments_are_their_recipes_on_the_foundation_splits(row: str, tmp_path: Path) -> None:
    """Each run is its packaged recipe (clip-l14, clip-l14-baseline, dinov2-b14) on the four test splits, and all
    share one base and one budget (the table is one sweep)."""
    recipe = {"ltm_clip": "clip-l14", "baseline_clip": "clip-l14-baseline", "ltm_dinov2": "dinov2-b14"}[row]
    run = OURS[row][1]
    assert experiment_path(run).parent.name == "foundation"
    cfg = run_config(run, tmp_path / "shards", tmp_path / "runs")
    assert cfg.data.test == TEST_SPLITS
    mine, theirs = to_dict(cfg), to_dict(load_config(recipe))
    for section in ("model", "train", "eval"):
        drop = ("run_dir",) if section == "train" else ()
        assert {k: v for k, v in mine[section].items() if k not in drop} == \
            {k: v for k, v in theirs[section].items() if k not in drop}, section
    assert [s.path for s in cfg.data.train] == [s.path for s in load_config("paper").data.train]


def test_the_table_is_one_sweep_scoring_each_run_on_the_four_splits(tmp_path: Path) -> None:
    sweep = table_sweep(FOUNDATION, tmp_path / "shards", tmp_path / "runs", seeds=[0, 1, 2])
    assert list(sweep.variants) == [run for _, run in OURS.values()] and sweep.seeds == [0, 1, 2]
    assert all(sweep.evals_of(run) == TEST_SPLITS for run in sweep.variants)
    assert "foundation" in ALL_TABLES and "foundation" not in TABLES  # the paper's tables stay the paper's


def test_reference_column_holds_the_published_figures(tmp_path: Path) -> None:
    result = collect(FOUNDATION, table_sweep(FOUNDATION, tmp_path / "shards", tmp_path / "runs"))
    printed = {(r["key"], col): c["paper"] for r in result["rows"] for col, c in r["cells"].items()
               if c["paper"] is not None}
    assert printed == PUBLISHED
    md = results_markdown(result)
    assert md.startswith("# Foundation: ")
    assert "| Celeb-DF v2 frame ours | Celeb-DF v2 frame published | Δ | Celeb-DF v2 video ours |" in md
    effort = next(line for line in md.splitlines() if line.startswith("| Effort"))
    assert "| 95.60 |" in effort and "| 73.70 |" not in effort


def _scored(sweep, run: str, seed: int, frame: dict[str, float], video: dict[str, float]) -> None:
    """A done point: the record (frame AUCs) and the report.json its scoring wrote per split (video AUCs)."""
    cfg = load_config("clip-l14")
    head = "baseline" if "baseline" in run else "student"
    write_json(sweep.record_path(run, seed), {
        "variant": run, "seed": seed, "config": fingerprint(cfg), "budgets": sweep.budgets, "heads": [head],
        "status": "done", "val": {}, "selected": sweep.budgets[-1], "test": {head: frame},
        "test_methods": {head: {d: {} for d in frame}}, "trained": []})
    for data, auc in video.items():
        path = report_path(sweep.run_dir(run, seed), head, [head], data)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"frame_auc": frame[data], "video_auc": auc}))


def test_collect_reads_frame_and_video_auc_per_dataset(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    sweep = table_sweep(FOUNDATION, "shards", runs)
    frame = dict(zip(TEST_SPLITS, (0.81, 0.72, 0.83, 0.94)))
    video = dict(zip(TEST_SPLITS, (0.86, 0.75, 0.88, 0.97)))
    _scored(sweep, "ffpp_c23_clip_l14", 0, frame, video)
    _scored(sweep, "ffpp_c23_clip_l14_baseline", 0, frame, {})  # scored, but no report to read video AUC from
    cells = {r["key"]: r["cells"] for r in collect(FOUNDATION, sweep)["rows"]}
    for (key, _, data) in DATASETS:
        assert cells["ltm_clip"][f"{key}_frame"]["ours"] == pytest.approx(100 * frame[data])
        assert cells["ltm_clip"][f"{key}_video"]["ours"] == pytest.approx(100 * video[data])
        assert cells["baseline_clip"][f"{key}_frame"]["status"] == "ok"
        assert cells["baseline_clip"][f"{key}_video"]["status"] == "missing"
    assert cells["ltm_clip"]["avg_video"]["ours"] == pytest.approx(100 * sum(video.values()) / 4)
    assert cells["ltm_clip"]["celebdf_video"]["diff"] is None  # no published figure for our row
    # a report left from another scoring (its frame AUC is not the record's) is refused, not read
    stale = report_path(sweep.run_dir("ffpp_c23_clip_l14", 0), "student", ["student"], "dfdc/test")
    stale.write_text(json.dumps({"frame_auc": 0.5, "video_auc": 0.99}))
    with pytest.raises(ValueError, match="another scoring"):
        collect(FOUNDATION, sweep)


def test_estimate_prints_gpu_hours_without_shards(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`ltm reproduce foundation --estimate --runs DIR`: no --shards, no shards (nominal frame counts), no runs;
    a line of GPU hours per run and a total, nothing written."""
    runs = tmp_path / "runs"
    assert main(["reproduce", "foundation", "--estimate", "--runs", str(runs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {w[0]: w for w in (line.split() for line in lines[1:-1])}
    assert list(rows) == [run for _, run in OURS.values()]
    hours = {run: float(w[-1]) for run, w in rows.items()}
    gflop = {run: float(w[1]) for run, w in rows.items()}
    # the LTM run pays for its teacher: more than its Baseline, less than twice it (the student drops a quarter)
    assert gflop["ffpp_c23_clip_l14_baseline"] < gflop["ffpp_c23_clip_l14"] < 2 * gflop["ffpp_c23_clip_l14_baseline"]
    assert gflop["ffpp_c23_dinov2_b14"] < gflop["ffpp_c23_clip_l14"]
    assert all(h > 0 for h in hours.values())
    total = re.match(r"total ([\d.]+) GPU hours", lines[-1])
    assert total and float(total.group(1)) == pytest.approx(sum(hours.values()), abs=0.1)
    assert not runs.exists()


def test_every_test_split_has_a_nominal_frame_count(tmp_path: Path) -> None:
    """Without shards the estimate counts each test split at its nominal videos x 32 frames; a split it does not
    know would count 0 frames and leave its evaluation out of the GPU hours."""
    from ltm.reproduce import split_frames

    frames = {s: split_frames(tmp_path, s) for s in TEST_SPLITS}
    assert frames == {"celebdf_v2/test": 518 * 32, "dfdc/test": 5000 * 32, "dfdcp/test": 780 * 32,
                      "dfd_c23/test": 3431 * 32}
