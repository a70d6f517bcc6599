"""bench/generalization.py's scoring: per-family AUC against every real frame, the unseen mean, the t-interval."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from repo_script import load_script
from scipy import stats
from shared_data import SHARED_DATA
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/generalization.py")


def test_family_auc_scores_each_family_against_all_real_frames_only(bench):
    rng = np.random.default_rng(0)
    methods = ["real"] * 40 + ["SelfBlend"] * 30 + ["Upsample"] * 30
    labels = [0.0] * 40 + [1.0] * 60
    # SelfBlend separable from real, Upsample at chance: a pooled AUC would hide the difference
    scores = list(rng.uniform(0, 0.5, 40)) + list(rng.uniform(0.5, 1, 30)) + list(rng.uniform(0, 0.5, 30))
    out = bench.family_aucs({"labels": labels, "methods": methods, "student": scores}, ("student",))
    assert out["student"]["SelfBlend"] == 1.0
    expected = roc_auc_score([0] * 40 + [1] * 30, scores[:40] + scores[70:])
    assert out["student"]["Upsample"] == pytest.approx(expected)
    assert 0.3 < out["student"]["Upsample"] < 0.7
    row = {"family_auc": out}
    assert bench.unseen_mean(row, "student", "SelfBlend") == pytest.approx(expected)  # the seen family is left out


@pytest.mark.parametrize("n", [3, 12, 30])  # 12 and 30 seeds: past any table of t quantiles, never the normal's 1.96
def test_interval_is_the_student_t_95_percent_interval(bench, n):
    values = list(np.random.default_rng(n).normal(0.01, 0.02, n))
    mean, lo, hi = bench.interval(values)
    ref = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values))
    assert (lo, hi) == pytest.approx(ref, rel=1e-6)
    one = bench.interval([0.5])
    assert one[0] == 0.5 and math.isnan(one[1]) and math.isnan(one[2])


def test_a_baseline_run_is_the_same_model_whatever_its_ltm_only_keys():
    """Resume and kept benchmark runs compare models: a Baseline ignores mixup, mask and ViT keys, not its backbone."""
    from ltm.config import load_config, to_dict
    from ltm.train.trainer import model_differences

    def model(*overrides):
        return to_dict(load_config("tiny-cpu", ["model.kind=baseline", *overrides]))["model"]

    assert model_differences(model("model.mixup=true"), model("model.mixup=false")) == []
    assert model_differences(model("model.mask_strategy=low", "model.vit.depth=1"), model()) == []
    assert model_differences(model(), model("model.output_stride=16")) == ["model.output_stride: None there, 16 here"]
    ltm = to_dict(load_config("tiny-cpu", ["model.mixup=true"]))["model"]
    assert model_differences(ltm, {**ltm, "mixup": False}) == ["model.mixup: True there, False here"]
    assert model_differences(ltm, model()) != []  # an LTM run is never a Baseline


def test_the_benchmark_trains_its_points_as_sweep_points_and_reuses_them(tmp_path):
    """bench/generalization.py end to end on a few real photos: its runs are `ltm.sweep` points (the sweep's
    config per point, its training and provenance), and a rerun trains nothing and scores nothing again."""
    import subprocess
    import sys

    from ltm.config import load_run_config
    from ltm.sweep.run import Sweep, fingerprint, point_config

    faces = tmp_path / "faces"
    faces.mkdir()
    groups: dict[str, list[Path]] = {}  # a few photos of each source: identity-disjoint splits need 3 groups
    for photo in sorted((SHARED_DATA / "faces").glob("*.jpg")):
        groups.setdefault(photo.name.split("_")[0], []).append(photo)
    for photo in [p for g in groups.values() for p in g[:8]]:
        (faces / photo.name).symlink_to(photo)
    out = tmp_path / "bench"
    cmd = [sys.executable, str(ROOT / "bench" / "generalization.py"), "--faces", str(faces), "--frames", "1",
           "--out", str(out), "--shards-out", str(tmp_path / "shards"), "--real-ffpp", str(tmp_path / "none"),
           "--steps", "2", "--epoch-steps", "2", "--seeds", "2", "--variants", "baseline,ltm-high",
           "train.batch_size=8"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["seeds"] == 2 and "student-baseline" in summary["diffs"]
    assert "paired by seed): " in first.stdout  # each comparison carries the sweep's verdict

    shards = tmp_path / "shards" / "synth-112px-1f"
    for variant, kind in (("baseline", "baseline"), ("ltm-high", "ltm")):
        for seed in (0, 1):
            run = out / f"{variant}-seed{seed}"
            row = json.loads((run / "scores" / "step000002-val.json").read_text())
            assert row["trained"]["status"] == "completed" and row["trained"]["budget"] == 2
            assert row["provenance"]["commit"] and row["provenance"]["packages"]["torch"]
            # the run was trained with exactly the config `ltm sweep` gives this point
            sweep = Sweep(config="tiny-cpu", variants={variant: [f"model.kind={kind}"]}, seeds=[seed],
                          evals=["synth/val"], out=out, budgets=[2], runs_folder="", overrides=[
                              "train.batch_size=8", f"data.root={shards}",
                              "data.train=[{path: synth/train/real, weight: 1}, "
                              "{path: synth/train/SelfBlend, weight: 1}]", "data.val=[]", "data.test=[synth/val]",
                              "train.iters_per_epoch=2", "train.lr_gamma=0.9", "train.val_every=0",
                              "train.log_every=50", "eval.attention_samples=0"])
            if variant == "ltm-high":
                sweep.variants[variant].append("model.mask_strategy=high")
            expected = fingerprint(point_config(sweep, variant, seed, 2))
            assert fingerprint(load_run_config(run / "config.yaml")) == expected
            assert load_run_config(run / "config.yaml").train.seed == seed

    kept = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "tb" not in p.parts}
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads(second.stdout.strip().splitlines()[-1])["diffs"] == summary["diffs"]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # no checkpoint, config or score rewritten
