"""`ltm reproduce`: experiment configs, the tables' run lists, planning, collecting (fast, no training)."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from ltm.cli import main
from ltm.config import ConfigError, load_config
from ltm.models import build_model
from ltm.reproduce import (
    EXPERIMENTS_DIR,
    checkpoint_step,
    collect,
    map_path,
    plan_points,
    results_markdown,
    run_config,
    select,
    table_sweep,
)
from ltm.reproduce.paper import FF_METHODS, TABLES
from ltm.sweep import stats
from ltm.sweep.run import fingerprint, point_config, write_json

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


def _record(sweep, run: str, seed: int, test: dict[str, float], methods: dict[str, dict[str, float]] | None = None,
            status: str = "done") -> None:
    """A point's record as `ltm.sweep.run.run_point` writes it: the selected checkpoint's AUCs per split."""
    cfg = point_config(sweep, run, seed, sweep.budgets[-1])
    head = "baseline" if cfg.model.kind == "baseline" else cfg.model.inference_head
    write_json(sweep.record_path(run, seed), {
        "variant": run, "seed": seed, "config": fingerprint(cfg), "budgets": sweep.budgets, "heads": [head],
        "status": status, "val": {}, "selected": sweep.budgets[-1], "test": {head: test},
        "test_methods": {head: {d: (methods or {}).get(d, {}) for d in test}}, "trained": []})


def test_table_sweep_trains_each_run_as_its_experiment_config(tmp_path: Path) -> None:
    """Each run of a table is a variant whose point config is the run's resolved config (mapped, with --base and
    overrides): only the run folder and seeds are the sweep's."""
    mapping = {"Deepfakes": "SelfBlend", "Face2Face": "SelfBlend", "NeuralTextures": "FaceSwap"}
    for name in ("table2", "table3", "table5"):
        sweep = table_sweep(TABLES[name], tmp_path / "shards", tmp_path / "runs", "tiny-cpu", ["train.lr=0.02"],
                            mapping, seeds=[3])
        assert list(sweep.variants) == TABLES[name].runs() and sweep.seeds == [3]
        for run in sweep.variants:
            mine = fingerprint(point_config(sweep, run, 3, sweep.budgets[-1]))
            theirs = fingerprint(run_config(run, tmp_path / "shards", tmp_path / "runs", "tiny-cpu",
                                            ["train.lr=0.02", "train.seed=3", "data.seed=3"], mapping))
            assert mine == theirs, run
            assert sweep.run_dir(run, 3) == (tmp_path / "runs" / f"{run}-seed3").absolute()
    assert table_sweep(TABLES["table2"], tmp_path, tmp_path).variant_evals["celebdf_v2_ltm"] == ["celebdf_v2/test"]


def test_plan_states_and_collect(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    table = TABLES["table3"]
    sweep = table_sweep(table, tmp_path / "shards", runs)
    # FF-DF: trained and both splits scored; FF-F2F: trained, CelebDF not scored; FF-NT: half trained.
    _record(sweep, "ffpp_c23_df_ltm", 0, {"ffpp_c23/test": 0.99, "celebdf_v2/test": 0.8},
            {"ffpp_c23/test": {"Deepfakes": 0.995, "FaceSwap": 0.7}})
    _record(sweep, "ffpp_c23_f2f_ltm", 0, {"ffpp_c23/test": 0.98}, {"ffpp_c23/test": {"Face2Face": 0.9961}})
    total = sweep.budgets[-1]
    for run, step in (("ffpp_c23_df_ltm", total), ("ffpp_c23_f2f_ltm", total), ("ffpp_c23_nt_ltm", 300)):
        (runs / f"{run}-seed0" / "checkpoints").mkdir(parents=True, exist_ok=True)
        (runs / f"{run}-seed0" / "checkpoints" / "latest").write_text(f"step{step:08d}")
    plans = {p.name: p for p in plan_points(table_sweep(table, tmp_path / "shards", runs))}
    assert list(plans) == table.runs()
    assert plans["ffpp_c23_df_ltm"].state == "done"
    assert (plans["ffpp_c23_f2f_ltm"].state, plans["ffpp_c23_f2f_ltm"].missing) == ("eval", ["celebdf_v2/test"])
    assert plans["ffpp_c23_nt_ltm"].state == "resume" and checkpoint_step(runs / "ffpp_c23_nt_ltm-seed0") == 300
    assert plans["ffpp_c23_baseline"].state == "train"

    result = collect(table, sweep)
    cells = {r["key"]: r["cells"] for r in result["rows"]}
    assert cells["df"]["in"]["ours"] == pytest.approx(99.5)  # per-method Deepfakes, not the split's frame AUC
    assert cells["df"]["in"]["diff"] == pytest.approx(99.5 - 99.90)
    assert cells["df"]["celebdf"]["ours"] == pytest.approx(80.0)
    assert cells["f2f"]["in"]["ours"] == pytest.approx(99.61)
    assert cells["f2f"]["celebdf"]["status"] == "missing" and cells["spsl"]["in"]["status"] == "cited"
    assert len(result["missing"]) == 1 + 2 * 5  # f2f CelebDF; nothing from the other five runs
    md = results_markdown(result)
    assert "| Ours | FF-DF | 99.50 | 99.90 | -0.40 | 80.00 | 81.41 | -1.41 |" in md
    assert "| Ours | FF-F2F | 99.61 | 99.62 | -0.01 | missing | 74.92 | — |" in md


def test_collect_cli_writes_table_and_averages_over_seeds(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    sweep = table_sweep(TABLES["table2"], "shards", runs, seeds=[0, 1, 2])
    aucs = {"ffpp_c23_ltm": [0.98, 0.97, 0.99], "celebdf_v2_ltm": [0.99, 0.95, 0.96], "wdf_ltm": [0.85, 0.80, 0.81]}
    for run, values in aucs.items():
        for seed in (2, 0, 1):  # written out of order: the average column pairs by seed, not position
            _record(sweep, run, seed, {sweep.evals_of(run)[0]: values[seed]})
    assert main(["reproduce", "table2", "--runs", str(runs), "--collect", "--seeds", "3"]) == 0
    out = capsys.readouterr().out
    data = json.loads((runs / "table2.json").read_text())
    ours = data["rows"][-1]["cells"]
    wdf = stats.interval([85.0, 80.0, 81.0])
    assert (ours["wdf"]["ours"], ours["wdf"]["lo"], ours["wdf"]["hi"]) == pytest.approx((wdf.mean, wdf.lo, wdf.hi))
    per_seed_avg = [statistics.fmean(100 * aucs[r][k] for r in aucs) for k in range(3)]
    avg = stats.interval(per_seed_avg)  # the average column's interval is over the seeds' averages
    assert (ours["avg"]["ours"], ours["avg"]["lo"], ours["avg"]["hi"]) == pytest.approx((avg.mean, avg.lo, avg.hi))
    assert ours["avg"]["paper"] == 94.91
    assert f"| {wdf.mean:.2f} ({wdf.lo:.2f} .. {wdf.hi:.2f}) | 86.70 |" in out
    assert "the mean over 3 seeds (0, 1, 2) with its 95% t-interval" in out
    assert (runs / "table2.md").read_text() in out
    assert sorted(p.name for p in runs.iterdir()) == ["points", "table2.json", "table2.md"]  # no temp files left
    # a seed short: its cells are missing, not an average over fewer seeds
    (runs / "points" / "wdf_ltm-seed1.json").unlink()
    assert main(["reproduce", "table2", "--runs", str(runs), "--collect", "--seeds", "3"]) == 0
    assert "| missing | 86.70 |" in capsys.readouterr().out


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
    assert "table5: 3 runs x 1 seed = 3 points, 3 to do" in out
    assert "model.backbone=resnet18 model.teacher_backbone=resnet34" in out
    assert out.count("[train; ") == 3 and "here, in this order (each trained to its budget, then scored): " \
        "ffpp_c23_ltm_s-resnet18_t-resnet18 seed 0, " in out
    assert f"model.pretrained={weights}" in out
    assert not runs.exists()


def test_estimate_counts_flops_per_backbone(tmp_path: Path, monkeypatch) -> None:
    """A process counts each model once (a count takes seconds at the paper's sizes): a second estimate of the same
    runs counts nothing again."""
    from ltm.models import flops
    from ltm.reproduce import estimate

    counted, count = [], flops._count_gflops
    monkeypatch.setattr(flops, "_COUNTED", {})
    monkeypatch.setattr(flops, "_count_gflops", lambda cfg: counted.append(cfg.model.teacher_backbone) or count(cfg))
    plans = plan_points(table_sweep(select(TABLES["table5"], ["resnet18"], None), tmp_path, tmp_path / "runs"))
    rows = {r["run"]: r for r in estimate(plans, tflops=25.0)}
    assert estimate(plans, tflops=25.0) == list(rows.values())
    assert sorted(counted) == ["legacy_xception", "resnet18", "resnet34"]  # the three teachers, once each
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
    return {str(p): p.stat().st_mtime_ns for run in REDUCED_RUNS for p in sorted((runs / f"{run}-seed0").rglob("*"))
            if p.is_file() and ("checkpoints" in p.parts or "eval" in p.parts)}


def check_table4(runs: Path) -> None:
    result = json.loads((runs / "table4.json").read_text())
    assert [r["key"] for r in result["rows"]] == ["high", "low", "random"] and result["missing"] == []
    md = (runs / "table4.md").read_text()
    for row, run in zip(result["rows"], REDUCED_RUNS):
        cell = row["cells"]["ffpp_c23"]
        report = json.loads((runs / f"{run}-seed0" / "eval" / "ffpp_c23-test" / "report.json").read_text())
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
        assert (runs / f"{run}-seed0" / "checkpoints" / "latest").read_text().strip() == "step00000002"
        strategy = run.removeprefix("ffpp_c23_ltm").strip("_") or "high"
        assert load_config(runs / f"{run}-seed0" / "config.yaml").model.mask_strategy == strategy
    check_table4(runs)


def test_rerun_skips_finished_runs_and_evaluates_only_what_is_missing(
        local_table4: Path, sample_shards: Path, capsys: pytest.CaptureFixture) -> None:
    runs = local_table4
    before = snapshot(runs)
    capsys.readouterr()
    assert main(reduced_table4(sample_shards, runs, "--local", "--dry-run")) == 0
    assert "table4: 3 runs x 1 seed = 3 points, 0 to do" in capsys.readouterr().out
    assert main(reduced_table4(sample_shards, runs, "--local")) == 0
    assert snapshot(runs) == before  # nothing trained or evaluated again

    # A kept run another table needs on a split it was not scored on: its training is not redone, only that
    # split is scored (here: its score forgotten, as a run of another table would lack it).
    point = runs / "points" / "ffpp_c23_ltm_low-seed0.json"
    record = json.loads(point.read_text())
    for scores in (record["test"], record["test_methods"]):
        scores["student"].pop("ffpp_c23/test")
    point.write_text(json.dumps(record))
    shutil.rmtree(runs / "ffpp_c23_ltm_low-seed0" / "eval")
    assert main(reduced_table4(sample_shards, runs, "--local", "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "ffpp_c23_ltm_low seed 0  [eval; checkpoint step 2 of 2]" in out and ", 1 to do" in out
    assert main(reduced_table4(sample_shards, runs, "--local")) == 0
    after = snapshot(runs)
    assert (runs / "ffpp_c23_ltm_low-seed0" / "eval" / "ffpp_c23-test" / "report.json").is_file()
    assert {k: v for k, v in after.items() if "checkpoints" in k} == {k: v for k, v in before.items()
                                                                      if "checkpoints" in k}
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed and all("ffpp_c23_ltm_low-seed0/eval/" in k for k in changed)

    # --collect alone finds the same points (the map of the run is remembered) and prints the table
    assert main(["reproduce", "table4", "--runs", str(runs), "--collect"]) == 0
    assert "| high |" in capsys.readouterr().out
    check_table4(runs)


def test_more_seeds_train_only_the_new_points_and_give_intervals(
        local_table4: Path, sample_shards: Path, capsys: pytest.CaptureFixture) -> None:
    runs = local_table4
    kept = snapshot(runs)
    argv = reduced_table4(sample_shards, runs, "--local", "--seeds", "2")
    argv[argv.index("high,low,random")] = "high"
    capsys.readouterr()
    assert main(argv) == 0
    assert snapshot(runs) == kept  # seed 0 of every run kept as it was
    assert (runs / "ffpp_c23_ltm-seed1" / "checkpoints" / "latest").read_text().strip() == "step00000002"
    assert not (runs / "ffpp_c23_ltm_low-seed1").exists()  # rows not asked for are not trained
    aucs = [100 * json.loads((runs / f"ffpp_c23_ltm-seed{k}" / "eval" / "ffpp_c23-test" / "report.json")
                             .read_text())["frame_auc"] for k in (0, 1)]
    cell = json.loads((runs / "table4.json").read_text())["rows"][0]["cells"]["ffpp_c23"]
    want = stats.interval(aucs)
    assert (cell["ours"], cell["lo"], cell["hi"], cell["n"]) == pytest.approx((want.mean, want.lo, want.hi, 2))
    assert cell["per_seed"] == {"0": round(aucs[0], 4), "1": round(aucs[1], 4)}
    assert f"| high | {want.mean:.2f} ({want.lo:.2f} .. {want.hi:.2f}) | 98.59 |" in capsys.readouterr().out
    assert load_config(runs / "ffpp_c23_ltm-seed1" / "config.yaml").train.seed == 1


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
    assert not (runs / "ffpp_c23_ltm-seed0" / "eval").exists()
    assert "| high | missing | 98.59 | — |" in (runs / "table4.md").read_text()
    assert "| high | missing |" in capsys.readouterr().out


# --- on the local SLURM cluster (last: it shares the machine with the other tests' jobs) -------------------------

SLURM_OPTIONS = ["--nodes", "1", "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "15"]


@pytest.mark.slurm
def test_slurm_dry_run_lists_one_array_with_a_task_per_point(
        slurm_cluster: dict, sample_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    assert main(reduced_table4(sample_shards, runs, *SLURM_OPTIONS, "--dry-run")) == 0
    out = capsys.readouterr().out
    for n, run in enumerate(REDUCED_RUNS):
        assert f"  task {n}: {run} seed 0\n" in out
    assert "--array=0-2" in out and "--requeue" in out and out.count("--nodes=1") == 1
    assert not runs.exists()


@pytest.mark.slurm
def test_slurm_submission_of_reduced_table4_completes_and_collects(
        slurm_cluster: dict, sample_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    assert main(reduced_table4(sample_shards, runs, *SLURM_OPTIONS, "--wait")) == 0
    jobs = json.loads((runs / ".sweep" / "jobs.json").read_text())
    assert sorted(jobs) == sorted(f"{r}-seed0" for r in REDUCED_RUNS)
    assert len({j.split("_")[0] for j in jobs.values()}) == 1  # one array
    check_table4(runs)
    # everything is done: a second submission submits nothing
    assert main(reduced_table4(sample_shards, runs, *SLURM_OPTIONS)) == 0
    assert json.loads((runs / ".sweep" / "jobs.json").read_text()) == jobs
    assert "nothing to do" in capsys.readouterr().out


def test_bad_records_and_tags_name_the_file(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    table = select(TABLES["table1"], ["ltm"], ["df"])
    sweep = table_sweep(table, "shards", runs)
    point = sweep.record_path("ffpp_c40_df_ltm", 0)
    point.parent.mkdir(parents=True)
    point.write_text("{not json")
    with pytest.raises(ConfigError, match=str(point)):
        collect(table, sweep)
    _record(sweep, "ffpp_c40_df_ltm", 0, {"ffpp_c40/test": 0.9}, {"ffpp_c40/test": {"FaceSwap": 0.8}})
    with pytest.raises(ValueError, match=f"{point}: no per-method AUC 'Deepfakes'"):
        collect(table, sweep)
    latest = runs / "ffpp_c40_df_ltm-seed0" / "checkpoints" / "latest"
    latest.parent.mkdir(parents=True)
    latest.write_text("global_step7")
    with pytest.raises(ValueError, match="unexpected checkpoint tag"):
        checkpoint_step(latest.parent.parent)
