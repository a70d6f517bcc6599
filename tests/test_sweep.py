"""`ltm sweep`: the statistics against scipy and known power-analysis values, and the whole path on the real local
SLURM cluster — a 2-variant x 2-seed array of a tiny model with one task killed midway and the submission rerun —
against a local sweep of the same points."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from ltm.cli import main
from ltm.sweep import stats
from ltm.sweep.run import Sweep, select_budget, write_json

# --- statistics ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 12, 30])
def test_interval_is_scipys_t_interval(n):
    values = list(np.random.default_rng(n).normal(0.65, 0.02, n))
    got = stats.interval(values)
    lo, hi = sps.t.interval(0.95, n - 1, loc=np.mean(values), scale=sps.sem(values))
    assert got.mean == pytest.approx(np.mean(values)) and (got.lo, got.hi) == pytest.approx((lo, hi), rel=1e-9)
    assert got.sd == pytest.approx(np.std(values, ddof=1))
    # a known value: mean 2, sd 1 over 4 values -> half-width t(0.975, 3) x 1/2 = 3.182446 / 2
    known = stats.interval([1.0, 2.0, 3.0, 2.0])
    half = sps.t.ppf(0.975, 3) * np.std([1, 2, 3, 2], ddof=1) / 2
    assert known.hi - known.mean == pytest.approx(half) and round(sps.t.ppf(0.975, 3), 6) == 3.182446
    one = stats.interval([0.5])
    assert one.mean == 0.5 and np.isnan(one.lo) and not one.resolved


def test_paired_matches_seeds_not_positions():
    a = {0: 0.70, 1: 0.60, 2: 0.65, 4: 0.90}
    b = {2: 0.64, 0: 0.69, 1: 0.59, 3: 0.10}  # another order, seed 3 only here, seed 4 only in a
    p = stats.paired(a, b)
    assert p.per_seed == pytest.approx({0: 0.01, 1: 0.01, 2: 0.01}) and p.missing == (3, 4)
    assert p.interval.mean == pytest.approx(0.01)
    x = {s: v for s, v in zip(range(5), np.random.default_rng(1).normal(0.66, 0.03, 5))}
    y = {s: x[s] - d for s, d in zip(range(5), [0.01, 0.03, 0.02, 0.00, 0.04])}
    p = stats.paired(x, dict(reversed(list(y.items()))))
    lo, hi = sps.ttest_rel(list(x.values()), [y[s] for s in x]).confidence_interval(0.95)
    assert (p.interval.lo, p.interval.hi) == pytest.approx((lo, hi), rel=1e-9)
    assert stats.verdict(p.interval).word == "better"
    with pytest.raises(ValueError, match="no seed in common"):
        stats.paired({0: 1.0}, {1: 1.0})


def test_n_needed_from_the_paired_sd():
    # two-sided paired t-test, alpha 0.05, power 0.8: effect = 1 SD needs 10 pairs, 0.5 SD 34, 0.8 SD 15 (the
    # textbook values, e.g. G*Power's "means: difference from constant")
    assert stats.n_needed(sd=0.02, effect=0.02) == 10
    assert stats.n_needed(sd=0.04, effect=0.02) == 34
    assert stats.n_needed(sd=0.025, effect=0.02) == 15
    n = stats.n_needed(sd=0.0205, effect=0.02)
    assert stats.power(n, 0.0205, 0.02) >= 0.8 > stats.power(n - 1, 0.0205, 0.02)
    assert stats.n_needed(float("nan")) is None
    # the verdict of an unresolved comparison names that N from its own SD
    diffs = [0.03, -0.01, 0.02, -0.02, 0.01]
    v = stats.verdict(stats.interval(diffs), effect=0.02)
    assert v.word == "no difference resolved at this N" and v.n == 5
    assert v.n_needed == stats.n_needed(float(np.std(diffs, ddof=1)), 0.02)
    assert stats.verdict(stats.interval([-0.03, -0.02, -0.025])).word == "worse"


def test_the_budget_is_selected_on_val_only():
    val = {"2": {"student": 0.70}, "4": {"student": 0.80}, "6": {"student": 0.80}}
    assert select_budget(val, "student") == 4  # best val, the earliest of equals


def test_bench_and_reproduce_share_the_sweeps_statistics():
    from repo_script import REPO as root
    from repo_script import load_script

    bench = load_script("bench/generalization.py")
    values = [0.61, 0.66, 0.64]
    assert bench.interval(values) == (stats.interval(values).mean, stats.interval(values).lo,
                                      stats.interval(values).hi)
    assert "scipy" not in (root / "bench" / "generalization.py").read_text()


# --- the whole path on the real local cluster -----------------------------------------------------------------------

TINY = ["data.image_size=64", "model.backbone=resnet18", "model.pretrained=null", "model.vit.dim=32",
        "model.vit.depth=1", "model.vit.heads=2", "model.vit.mlp_ratio=2.0", "train.batch_size=8",
        "train.iters_per_epoch=2", "train.log_every=1", "train.val_every=0", "launch.cpus_per_task=1",
        "launch.time_min=15"]


def second_test_set(shards: Path, root: Path) -> Path:
    """A second test set: the sample's real and FaceSwap test shards (each set needs both classes for an AUC)."""
    folder = root / "ffpp_c23_faceswap" / "test"
    for method in ("real", "FaceSwap"):
        (folder / method).mkdir(parents=True, exist_ok=True)
        for f in (shards / "ffpp_c23" / "test" / method).iterdir():
            if not (folder / method / f.name).exists():
                (folder / method / f.name).symlink_to(f)
    return folder


def sweep_argv(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["sweep", "--config", "tiny-cpu", "--variant", "base:", "--variant", "hot:train.lr=0.05", "--seeds", "2",
            "--eval", "ffpp_c23/test", "--eval", str(second_test_set(shards, out.parent / "sets")), "--steps", "2,4",
            "--out", str(out), *extra, f"data.root={shards}", *TINY]


def table_of(out: Path) -> dict:
    result = json.loads((out / "sweep.json").read_text())
    return {k: result[k] for k in ("rows", "comparisons", "curves", "missing")}


def records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "points").glob("*.json"))}


@pytest.mark.slurm
def test_array_with_a_task_killed_then_rerun_equals_a_local_sweep(slurm_cluster, sample_shards, tmp_path):
    import torch

    out = tmp_path / "array"
    argv = sweep_argv(sample_shards, out, "--submit")
    assert main(argv) == 0
    jobs = json.loads((out / ".sweep" / "jobs.json").read_text())
    assert len(jobs) == 4 and len({j.split("_")[0] for j in jobs.values()}) == 1  # one array, one task a point
    # kill one task midway: its first budget trained and scored on val, the second not finished
    deadline, victim = time.monotonic() + 300, None
    while victim is None:
        for key, record in records(out).items():
            if "2" in record["val"] and record["status"] != "done":
                victim = key
                break
        assert time.monotonic() < deadline, records(out)
        time.sleep(0.05)
    subprocess.run(["scancel", jobs[victim]], check=True)
    from launcher.submit import wait_for

    states = wait_for(list(jobs.values()), timeout_s=400, poll_s=1.0)
    assert states.pop(jobs[victim]) == "CANCELLED" and set(states.values()) == {"COMPLETED"}, states
    first = records(out)
    assert first[victim]["status"] != "done"
    mtimes = {k: (out / "points" / f"{k}.json").stat().st_mtime_ns for k in first}

    # the same submission again: only the killed point is submitted; it resumes
    assert main(argv) == 0
    again = json.loads((out / ".sweep" / "jobs.json").read_text())
    resubmitted = [k for k in again if again[k] != jobs[k]]
    assert resubmitted == [victim]
    assert wait_for([again[victim]], timeout_s=400, poll_s=1.0) == {again[victim]: "COMPLETED"}
    assert main(argv) == 0  # everything done: nothing submitted, the table written
    final = records(out)
    for key, record in final.items():
        assert record["status"] == "done", key
        budgets = [s["budget"] for s in record["trained"] if s["status"] == "completed"]
        assert budgets == [2, 4], (key, record["trained"])  # no budget of any point trained twice
        steps = [json.loads(x)["step"] for x in (out / "runs" / key / "metrics.jsonl").read_text().splitlines()
                 if '"type": "train"' in x]
        assert sorted(set(steps)) == [1, 2, 3, 4]
        assert_selection_on_val(out, key, record)
        assert record["provenance"]["commit"] and record["provenance"]["packages"]["torch"] and record["seed"] >= 0
        if key != victim:
            assert (out / "points" / f"{key}.json").stat().st_mtime_ns == mtimes[key]  # reused, untouched
    assert [s["status"] for s in final[victim]["trained"]][-1] == "completed"
    assert final[victim]["trained"][0]["budget"] == 2  # its first budget was kept, not trained again

    # a local sweep of the same points on this machine gives the same table
    local = tmp_path / "local"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each array task ran (cpus_per_task=1)
    try:
        assert main(sweep_argv(sample_shards, local)) == 0
    finally:
        torch.set_num_threads(threads)
    assert table_of(local) == table_of(out)
    table = (out / "sweep.md").read_text()
    print(table)
    assert "| hot | student |" in table and "Learning curves" in table and (out / "sweep.png").is_file()
    assert "vs base/student:" in table

    # a changed config is refused, naming what changed, before anything runs
    assert main(sweep_argv(sample_shards, out, "train.lr=0.02")) == 2


def test_a_changed_config_is_refused_naming_the_key(sample_shards, tmp_path, caplog):
    out = tmp_path / "s"
    sweep = Sweep(config="tiny-cpu", variants={"a": []}, seeds=[0], evals=["ffpp_c23/test"], out=out, budgets=[2],
                  overrides=[f"data.root={sample_shards}", *TINY])
    from ltm.sweep.run import fingerprint, point_config, write_json

    cfg = point_config(sweep, "a", 0, 2)
    write_json(sweep.record_path("a", 0), {"config": {**fingerprint(cfg), "train.lr": 0.5}, "status": "done"})
    argv = ["sweep", "--config", "tiny-cpu", "--variant", "a:", "--seeds", "1", "--eval", "ffpp_c23/test",
            "--steps", "2", "--out", str(out), f"data.root={sample_shards}", *TINY]
    assert main(argv) == 2
    assert "point a seed 0 was run with another config (train.lr: 0.5 there, 0.01 here)" in caplog.text
    write_json(sweep.record_path("a", 0), {"config": fingerprint(cfg), "budgets": [2], "status": "done"})
    caplog.clear()
    assert main([*argv[:argv.index("--steps") + 1], "2,4", *argv[argv.index("--steps") + 2:]]) == 2
    assert "(--steps: 2 there, 2,4 here)" in caplog.text  # the budgets a point answers for are part of it
    assert not (out / "runs").exists()


def assert_selection_on_val(out: Path, key: str, record: dict) -> None:
    """Val chose the checkpoint from val's own reports; test was scored once, for that checkpoint only."""
    run = out / "runs" / key / "sweep-eval"
    head = record["heads"][0]
    for budget, aucs in record["val"].items():
        reports = sorted((run / f"step{budget}-val" / head).glob("*/report.json"))
        assert [p.parent.name for p in reports] == ["ffpp_c23-val"], (key, budget, reports)
        assert json.loads(reports[0].read_text())["frame_auc"] == pytest.approx(aucs[head])
    assert record["selected"] == select_budget(record["val"], head)
    assert [p.name for p in run.glob("*-test")] == [f"step{record['selected']}-test"]
    report = json.loads(next((run / f"step{record['selected']}-test" / head).glob("ffpp_c23-test/report.json"))
                        .read_text())
    assert report["checkpoint"].endswith(f"step{record['selected']:08d}")


def test_local_point_selects_on_val_scores_test_once_and_is_kept(sample_shards, tmp_path, capsys):
    out = tmp_path / "one"
    argv = ["sweep", "--config", "tiny-cpu", "--variant", "a:", "--seeds", "1", "--eval", "ffpp_c23/test",
            "--steps", "2,4", "--out", str(out), f"data.root={sample_shards}", *TINY]
    assert main(argv) == 0
    record = records(out)["a-seed0"]
    assert record["status"] == "done" and set(record["val"]) == {"2", "4"}
    assert_selection_on_val(out, "a-seed0", record)
    mtime = (out / "points" / "a-seed0.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0  # rerun: the point is kept, nothing trained or scored
    assert (out / "points" / "a-seed0.json").stat().st_mtime_ns == mtime
    assert "| a | student |" in capsys.readouterr().out

    # a session stopped after budget 4's last save, before the record said so: the rerun enters it from the
    # checkpoint and trains nothing again
    session = record["trained"].pop()
    assert session["budget"] == 4 and session["status"] == "completed"
    del record["val"]["4"]
    record["status"] = "started"
    write_json(out / "points" / "a-seed0.json", record)
    saved = {p: p.stat().st_mtime_ns for p in (out / "runs" / "a-seed0" / "checkpoints").rglob("*") if p.is_file()}
    assert main(argv) == 0
    again = records(out)["a-seed0"]
    assert again["status"] == "done" and set(again["val"]) == {"2", "4"}
    assert [(s["budget"], s["status"], s.get("recorded")) for s in again["trained"]] == [
        (2, "completed", None), (4, "completed", "afterwards, from its complete checkpoint")]
    assert {p: p.stat().st_mtime_ns for p in saved} == saved  # no checkpoint written again


def test_submit_checks_every_point_before_queueing_and_dry_run_writes_nothing(sample_shards, tmp_path, caplog,
                                                                              capsys):
    out = tmp_path / "dry"
    argv = ["sweep", "--config", "tiny-cpu", "--variant", "a:", "--variant", "b:train.lr=0.05", "--seeds", "3",
            "--eval", "ffpp_c23/test", "--steps", "4", "--out", str(out), "--submit", "--dry-run",
            f"data.root={sample_shards}", *TINY]
    assert main(argv) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --array=0-5" in script and "#SBATCH --requeue" in script  # one array, a task per point
    assert not out.exists()  # a dry run writes nothing
    bad = [a if a != "ffpp_c23/test" else "ffpp_c23/nowhere" for a in argv]
    assert main([a for a in bad if a != "--dry-run"]) == 2  # refused on the login node, nothing queued
    assert "ffpp_c23/nowhere" in caplog.text and not (out / "slurm").exists()
