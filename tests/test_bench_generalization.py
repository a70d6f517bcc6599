"""bench/generalization.py's scoring: per-family AUC against every real frame, the unseen mean, the t-interval."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_generalization", ROOT / "bench" / "generalization.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_interval_is_the_student_t_95_percent_interval(bench):
    values = [0.012, 0.031, 0.020]
    mean, lo, hi = bench.interval(values)
    ref = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values))
    assert (lo, hi) == pytest.approx(ref, abs=1e-4)
    one = bench.interval([0.5])
    assert one[0] == 0.5 and math.isnan(one[1]) and math.isnan(one[2])
