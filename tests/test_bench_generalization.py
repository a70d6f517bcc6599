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
    from ltm.engine import model_differences

    def model(*overrides):
        return to_dict(load_config("tiny-cpu", ["model.kind=baseline", *overrides]))["model"]

    assert model_differences(model("model.mixup=true"), model("model.mixup=false")) == []
    assert model_differences(model("model.mask_strategy=low", "model.vit.depth=1"), model()) == []
    assert model_differences(model(), model("model.output_stride=16")) == ["model.output_stride: None there, 16 here"]
    ltm = to_dict(load_config("tiny-cpu", ["model.mixup=true"]))["model"]
    assert model_differences(ltm, {**ltm, "mixup": False}) == ["model.mixup: True there, False here"]
    assert model_differences(ltm, model()) != []  # an LTM run is never a Baseline
