"""`ltm reproduce`: experiment configs, the tables' run lists, planning, collecting (fast, no training)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ltm.cli import main
from ltm.config import ConfigError, load_config
from ltm.models import build_model
from ltm.paper_results import FF_METHODS, TABLES
from ltm.reproduce import (
    EXPERIMENTS_DIR,
    checkpoint_step,
    collect,
    map_path,
    plan_table,
    render_markdown,
    report_dir,
    run_config,
    select,
)

EXPERIMENTS = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))
BACKBONE = {"resnet18": "resnet18", "resnet34": "resnet34", "xception": "legacy_xception"}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_loads_and_builds(name: str) -> None:
    cfg = load_config(f"experiments/{name}")
    assert cfg.data.train and cfg.data.test, name
    # The teacher's mask (Eq. 4) must fit the student's grid at the paper's 224 px: the model checks it on build.
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.data.image_size, load_weights=False)
    if cfg.model.kind == "ltm":
        assert model.grid == (7, 7)


def test_every_experiment_belongs_to_a_table_and_every_run_has_an_experiment() -> None:
    used = {run for table in TABLES.values() for run in table.runs()}
    assert used == set(EXPERIMENTS)


def test_tables_have_the_papers_shape() -> None:
    shapes = {name: (len(t.rows), len(t.columns), len(t.runs())) for name, t in TABLES.items()}
    # rows x columns as printed; runs = our trainings (cited rows have none; shared runs counted once per table)
    assert shapes == {"table1": (3, 4, 8), "table2": (5, 4, 3), "table3": (8, 2, 7), "table4": (3, 3, 9),
                      "table5": (3, 3, 9)}
    assert all(len(r.cells) == len(t.columns) for t in TABLES.values() for r in t.rows)


def test_cells_point_at_what_their_config_trains_and_tests() -> None:
    paper_by_cell: dict[tuple, float | None] = {}
    for table in TABLES.values():
        for row in table.rows:
            for col, cell in row.cells.items():
                if cell.run is None:
                    continue
                cfg = load_config(f"experiments/{cell.run}")
                assert cell.data in cfg.data.test, (table.name, row.key, col)
                train = [s.path for s in cfg.data.train]
                if cell.method is not None:  # per-method cell: that method is what the run trains on
                    assert any(p.endswith("/" + cell.method) for p in train), (cell.run, train)
                # one (run, data, method) is one number: shared runs must agree across tables
                key = (cell.run, cell.data, cell.method)
                assert paper_by_cell.setdefault(key, cell.paper) == cell.paper, key
    for m, full in FF_METHODS.items():
        assert load_config(f"experiments/ffpp_c40_{m}_baseline").model.kind == "baseline"
        assert [s.path for s in load_config(f"experiments/ffpp_c40_{m}_ltm").data.train] == [
            "ffpp_c40/train/real", f"ffpp_c40/train/{full}"]
    for row in TABLES["table3"].rows:
        if row.key.endswith("_nomixup"):
            assert load_config(f"experiments/{row.cells['in'].run}").model.mixup is False
    for row in TABLES["table4"].rows:
        for cell in row.cells.values():
            assert load_config(f"experiments/{cell.run}").model.mask_strategy == row.key
    assert [s.path for s in load_config("experiments/ffpp_c23_df_ltm_low").data.train][-1].endswith("Deepfakes")
    for row in TABLES["table5"].rows:
        for col, cell in row.cells.items():
            model = load_config(f"experiments/{cell.run}").model
            assert (model.backbone, model.teacher_backbone or model.backbone) == (BACKBONE[row.key], BACKBONE[col])


def test_map_renames_components_and_merges_sources(tmp_path: Path) -> None:
    assert map_path("wdf/train/fake", {"wdf": "ffpp_c23", "fake": "SelfBlend"}) == "ffpp_c23/train/SelfBlend"
    assert map_path("ffpp_c23/test", {"test": "val"}) == "ffpp_c23/val"
    mapping = {"Deepfakes": "SelfBlend", "Face2Face": "SelfBlend", "NeuralTextures": "FaceSwap"}
    cfg = run_config("ffpp_c23_ltm", tmp_path / "shards", tmp_path / "runs", base="tiny-cpu",
                     overrides=["train.epochs=1"], mapping=mapping, weights={"tf_efficientnet_lite0": "/w/lite0.pth"})
    assert [(s.path, s.weight) for s in cfg.data.train] == [
        ("ffpp_c23/train/real", 4), ("ffpp_c23/train/SelfBlend", 2), ("ffpp_c23/train/FaceSwap", 2)]
    assert cfg.model.backbone == "tf_efficientnet_lite0" and cfg.data.image_size == 112  # from tiny-cpu
    assert cfg.model.pretrained == cfg.model.teacher_pretrained == "/w/lite0.pth"
    assert cfg.train.epochs == 1 and cfg.train.run_dir == str((tmp_path / "runs" / "ffpp_c23_ltm").resolve())
    assert cfg.data.root == str((tmp_path / "shards").resolve())
    with pytest.raises(ConfigError, match="train.epochs"):
        run_config("ffpp_c23_ltm", tmp_path, tmp_path, overrides=["train.epochs=zero"])


def test_select_and_unknown_keys() -> None:
    t = select(TABLES["table4"], ["high", "low", "random"], ["ffpp_c23"])
    assert t.runs() == ["ffpp_c23_ltm", "ffpp_c23_ltm_low", "ffpp_c23_ltm_random"]
    assert select(TABLES["table2"], None, ["wdf"]).average == {}
    with pytest.raises(ConfigError, match="unknown column"):
        select(TABLES["table4"], None, ["imagenet"])


def _report(path: Path, frame_auc: float | None, per_method: dict[str, float] | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    per = {m: {"frame_auc": v, "video_auc": v, "n_frames": 10} for m, v in (per_method or {}).items()}
    (path / "report.json").write_text(json.dumps({"frame_auc": frame_auc, "per_method": per}))


def test_plan_states_and_collect(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    table = TABLES["table3"]
    # FF-DF: trained and both reports there; FF-F2F: trained, CelebDF report missing; FF-NT: half trained.
    _report(runs / "ffpp_c23_df_ltm/eval/ffpp_c23-test", 0.99, {"Deepfakes": 0.995, "FaceSwap": 0.7})
    _report(runs / "ffpp_c23_df_ltm/eval/celebdf_v2-test", 0.8)
    _report(runs / "ffpp_c23_f2f_ltm/eval/ffpp_c23-test", 0.98, {"Face2Face": 0.9961})
    for run, step in (("ffpp_c23_df_ltm", 9000), ("ffpp_c23_f2f_ltm", 9000), ("ffpp_c23_nt_ltm", 300)):
        (runs / run / "checkpoints").mkdir(parents=True, exist_ok=True)
        (runs / run / "checkpoints" / "latest").write_text(f"step{step:08d}")
    plans = {p.name: p for p in plan_table(table, tmp_path / "shards", runs)}
    assert list(plans) == table.runs()
    assert plans["ffpp_c23_df_ltm"].state == "done"
    assert (plans["ffpp_c23_f2f_ltm"].state, plans["ffpp_c23_f2f_ltm"].missing) == ("eval", ["celebdf_v2/test"])
    assert plans["ffpp_c23_nt_ltm"].state == "resume" and checkpoint_step(runs / "ffpp_c23_nt_ltm") == 300
    assert plans["ffpp_c23_baseline"].state == "train"

    result = collect(table, runs)
    cells = {r["key"]: r["cells"] for r in result["rows"]}
    assert cells["df"]["in"]["ours"] == pytest.approx(99.5)  # per_method Deepfakes, not the split's frame_auc
    assert cells["df"]["in"]["diff"] == pytest.approx(99.5 - 99.90)
    assert cells["df"]["celebdf"]["ours"] == pytest.approx(80.0)
    assert cells["f2f"]["in"]["ours"] == pytest.approx(99.61)
    assert cells["f2f"]["celebdf"]["status"] == "missing" and cells["spsl"]["in"]["status"] == "cited"
    assert len(result["missing"]) == 1 + 2 * 5  # f2f CelebDF; nothing from the other five runs
    md = render_markdown(result)
    assert "| Ours | FF-DF | 99.50 | 99.90 | -0.40 | 80.00 | 81.41 | -1.41 |" in md
    assert "| Ours | FF-F2F | 99.61 | 99.62 | -0.01 | missing | 74.92 | — |" in md


def test_collect_cli_writes_table_and_averages(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    for run, data, auc in (("ffpp_c23_ltm", "ffpp_c23/test", 0.98), ("celebdf_v2_ltm", "celebdf_v2/test", 0.99),
                           ("wdf_ltm", "wdf/test", 0.85)):
        _report(report_dir(runs / run, data), auc)
    assert main(["reproduce", "table2", "--runs", str(runs), "--collect"]) == 0
    out = capsys.readouterr().out
    data = json.loads((runs / "table2.json").read_text())
    ours = data["rows"][-1]["cells"]
    assert ours["avg"]["ours"] == pytest.approx((98 + 99 + 85) / 3)
    assert ours["avg"]["paper"] == 94.91
    assert (runs / "table2.md").read_text() in out
    assert sorted(p.name for p in runs.iterdir()) == ["celebdf_v2_ltm", "ffpp_c23_ltm", "table2.json", "table2.md",
                                                      "wdf_ltm"]  # no temp files left


def test_dry_run_lists_runs_and_changes_nothing(tmp_path: Path, sample_shards: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    weights = tmp_path / "r18.pth"
    argv = ["reproduce", "table5", "--shards", str(sample_shards), "--runs", str(runs), "--local", "--dry-run",
            "--rows", "resnet18", "--weights", f"resnet18={weights}", *SAMPLE_MAP]
    assert main(argv) == 2  # checked like a real run: the weights file does not exist
    weights.write_bytes(b"")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "table5: 3 runs, 3 to do" in out
    assert "model.backbone=resnet18 model.teacher_backbone=resnet34" in out
    assert out.count("ltm train --config") == 3 and out.count("ltm eval --run") == 3
    assert f"model.pretrained={weights}" in out
    assert not runs.exists()


def test_estimate_counts_flops_per_backbone(tmp_path: Path) -> None:
    from ltm.reproduce import estimate

    plans = plan_table(select(TABLES["table5"], ["resnet18"], None), tmp_path, tmp_path / "runs")
    rows = {r["run"]: r for r in estimate(plans, tflops=25.0)}
    gflop = [rows[f"ffpp_c23_ltm_s-resnet18_t-{t}"]["train_gflop_per_image"] for t in ("resnet18", "resnet34",
                                                                                         "xception")]
    assert gflop[0] < gflop[1] < gflop[2]  # the teacher's cost grows with its backbone; the student is the same
    r = rows["ffpp_c23_ltm_s-resnet18_t-resnet18"]
    assert r["train_images"] == 30 * 300 * 32
    assert r["pflop"]["train"] == pytest.approx(r["train_gflop_per_image"] * r["train_images"] / 1e6)
    assert r["gpu_hours"] == pytest.approx(sum(r["pflop"].values()) * 1e3 / 25.0 / 3600)


# --- end to end on the sample dataset: a reduced Table 4 (three strategies, FF++ (c23) column, a few steps) --------

# The sample is FF++-shaped with the fake methods SelfBlend and FaceSwap: map the paper's four methods onto them.
SAMPLE_MAP = ["--map", "Deepfakes=SelfBlend", "--map", "Face2Face=SelfBlend", "--map", "NeuralTextures=FaceSwap"]
TINY = ["data.image_size=64", "data.shuffle_buffer=64", "data.val=[]", "train.epochs=1", "train.iters_per_epoch=2",
        "train.batch_size=4", "train.ckpt_every=2", "train.log_every=1", "eval.attention_samples=0"]
REDUCED_RUNS = ["ffpp_c23_ltm", "ffpp_c23_ltm_low", "ffpp_c23_ltm_random"]


def reduced_table4(shards: Path, runs: Path, *extra: str) -> list[str]:
    return ["reproduce", "table4", "--shards", str(shards), "--runs", str(runs), "--rows", "high,low,random",
            "--columns", "ffpp_c23", "--base", "tiny-cpu", *SAMPLE_MAP, *extra, *TINY]


def snapshot(runs: Path) -> dict[str, float]:
    """mtime of every checkpoint and report file of the runs: what a skipped run must leave alone."""
    return {str(p): p.stat().st_mtime_ns for run in REDUCED_RUNS for p in sorted((runs / run).rglob("*"))
            if p.is_file() and ("checkpoints" in p.parts or "eval" in p.parts)}


def check_table4(runs: Path) -> None:
    result = json.loads((runs / "table4.json").read_text())
    assert [r["key"] for r in result["rows"]] == ["high", "low", "random"] and result["missing"] == []
    md = (runs / "table4.md").read_text()
    for row, run in zip(result["rows"], REDUCED_RUNS):
        cell = row["cells"]["ffpp_c23"]
        report = json.loads((runs / run / "eval" / "ffpp_c23-test" / "report.json").read_text())
        assert cell["ours"] == pytest.approx(100 * report["frame_auc"])
        assert cell["diff"] == pytest.approx(cell["ours"] - cell["paper"])
        assert f"| {row['key']} | {cell['ours']:.2f} | {cell['paper']:.2f} | {cell['diff']:+.2f} |" in md
    assert [r["cells"]["ffpp_c23"]["paper"] for r in result["rows"]] == [98.59, 99.10, 99.04]


@pytest.fixture(scope="module")
def local_table4(sample_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("reproduce") / "runs"
    assert main(reduced_table4(sample_shards, runs, "--local")) == 0
    return runs


def test_local_reduced_table4_runs_end_to_end(local_table4: Path) -> None:
    runs = local_table4
    for run in REDUCED_RUNS:
        assert (runs / run / "checkpoints" / "latest").read_text().strip() == "step00000002"
        strategy = run.removeprefix("ffpp_c23_ltm").strip("_") or "high"
        assert load_config(runs / run / "config.yaml").model.mask_strategy == strategy
    check_table4(runs)


def test_rerun_skips_finished_runs_and_evaluates_only_what_is_missing(
        local_table4: Path, sample_shards: Path, capsys: pytest.CaptureFixture) -> None:
    runs = local_table4
    before = snapshot(runs)
    capsys.readouterr()
    assert main(reduced_table4(sample_shards, runs, "--local", "--dry-run")) == 0
    assert "table4: 3 runs, 0 to do" in capsys.readouterr().out
    assert main(reduced_table4(sample_shards, runs, "--local")) == 0
    assert snapshot(runs) == before  # nothing trained or evaluated again

    # A run whose evaluation is lost: its training is not redone, only the evaluation runs again.
    report = runs / "ffpp_c23_ltm_low" / "eval" / "ffpp_c23-test" / "report.json"
    report.unlink()
    assert main(reduced_table4(sample_shards, runs, "--local", "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "ffpp_c23_ltm_low  [eval; checkpoint step 2 of 2]" in out and "table4: 3 runs, 1 to do" in out
    assert main(reduced_table4(sample_shards, runs, "--local")) == 0
    after = snapshot(runs)
    assert report.is_file()
    assert {k: v for k, v in after.items() if "checkpoints" in k} == {k: v for k, v in before.items()
                                                                      if "checkpoints" in k}
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed and all("ffpp_c23_ltm_low/eval/" in k for k in changed)

    # --collect alone finds the same reports (the map of the run is remembered) and prints the table
    assert main(["reproduce", "table4", "--runs", str(runs), "--collect"]) == 0
    assert "| high |" in capsys.readouterr().out
    check_table4(runs)


def test_failed_training_is_reported_and_not_evaluated(sample_shards: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Without --map the paper's FF++ methods are absent from the sample: refused before anything runs. With a shard
    whose bytes are cut short (its folder passes that check), the training fails, and nothing is scored."""
    runs = tmp_path / "runs"
    argv = ["reproduce", "table4", "--shards", str(sample_shards), "--runs", str(runs), "--rows", "high",
            "--columns", "ffpp_c23", "--base", "tiny-cpu", "--local", *TINY]
    assert main(argv) == 2 and not runs.exists()
    assert "ffpp_c23_ltm: data.train 'ffpp_c23/train/Deepfakes': shard folder" in caplog.text

    broken = tmp_path / "shards"
    shutil.copytree(sample_shards, broken)
    victim = sorted((broken / "ffpp_c23" / "train" / "SelfBlend").glob("*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[:2000])
    argv = ["reproduce", "table4", "--shards", str(broken), "--runs", str(runs), "--rows", "high", "--columns",
            "ffpp_c23", "--base", "tiny-cpu", "--local", *SAMPLE_MAP, *TINY]
    assert main(argv) == 1
    assert not (runs / "ffpp_c23_ltm" / "eval").exists()
    assert "| high | missing | 98.59 | — |" in (runs / "table4.md").read_text()
    assert "| high | missing |" in capsys.readouterr().out


# --- on the local SLURM cluster (last: it shares the machine with the other tests' jobs) -------------------------

SLURM_OPTIONS = ["--nodes", "1", "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "15"]


@pytest.mark.slurm
def test_slurm_dry_run_lists_three_trainings_with_chained_evals(
        slurm_cluster: dict, sample_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    assert main(reduced_table4(sample_shards, runs, *SLURM_OPTIONS, "--dry-run")) == 0
    out = capsys.readouterr().out
    for n, run in enumerate(REDUCED_RUNS, 1):
        assert f"{n}. train {run}\n" in out
        assert f"{n}. eval {run}  afterok: train job of {run}" in out
    assert out.count("--dependency=afterok:") == 3 and out.count("--nodes=1") == 6
    assert not runs.exists()


@pytest.mark.slurm
def test_slurm_submission_of_reduced_table4_completes_and_collects(
        slurm_cluster: dict, sample_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    assert main(reduced_table4(sample_shards, runs, *SLURM_OPTIONS, "--wait")) == 0
    jobs = json.loads((runs / ".reproduce" / "jobs.json").read_text())
    assert sorted(jobs) == sorted(REDUCED_RUNS) and all(set(j) == {"train", "eval"} for j in jobs.values())
    check_table4(runs)
    # everything is done: a second submission submits nothing
    assert main(reduced_table4(sample_shards, runs, *SLURM_OPTIONS)) == 0
    assert json.loads((runs / ".reproduce" / "jobs.json").read_text()) == jobs
    assert "nothing to do" in capsys.readouterr().out


def test_bad_reports_and_tags_name_the_file(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    report = report_dir(runs / "ffpp_c40_df_ltm", "ffpp_c40/test") / "report.json"
    report.parent.mkdir(parents=True)
    report.write_text("{not json")
    with pytest.raises(ValueError, match=str(report)):
        collect(select(TABLES["table1"], ["ltm"], ["df"]), runs)
    _report(report.parent, 0.9, {"FaceSwap": 0.8})  # the Deepfakes entry is absent
    with pytest.raises(ValueError, match="no per_method entry 'Deepfakes'"):
        collect(select(TABLES["table1"], ["ltm"], ["df"]), runs)
    latest = runs / "ffpp_c40_df_ltm" / "checkpoints" / "latest"
    latest.parent.mkdir(parents=True)
    latest.write_text("global_step7")
    with pytest.raises(ValueError, match="unexpected checkpoint tag"):
        checkpoint_step(latest.parent.parent)
