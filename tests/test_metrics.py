"""The equal error rate against a brute-force reference that shares no code with ltm.eval.metrics (nor sklearn)."""

from __future__ import annotations

import numpy as np
import pytest

from ltm.eval import metrics


def eer_brute_force(labels, scores, steps: int = 20001) -> float:
    """Walk the ROC curve point by point (threshold from +inf down through every distinct score), join neighbouring
    operating points by straight lines as a randomised classifier between them would, sample every segment densely
    and take the FPR where |FPR - FNR| is smallest."""
    labels, scores = np.asarray(labels, float), np.asarray(scores, float)
    pos, neg = scores[labels == 1], scores[labels == 0]
    points = [(0.0, 1.0)]  # (FPR, FNR) above the highest score: nothing called fake
    for t in sorted(set(scores.tolist()), reverse=True):
        points.append((float((neg >= t).mean()), float((pos < t).mean())))
    best, best_gap = None, np.inf
    for (f0, n0), (f1, n1) in zip(points, points[1:]):
        s = np.linspace(0.0, 1.0, steps)
        fpr, fnr = f0 + s * (f1 - f0), n0 + s * (n1 - n0)
        i = int(np.argmin(np.abs(fpr - fnr)))
        if abs(fpr[i] - fnr[i]) < best_gap:
            best, best_gap = float(fpr[i]), abs(fpr[i] - fnr[i])
    return best


def test_eer_between_roc_points_is_interpolated():
    # ROC points (FPR, TPR): (0, 0), (0, .5), (1, .5), (1, 1). FPR = FNR = 0.5 half way along the flat segment:
    # no threshold reaches it, so an EER read off the nearest ROC point says 0 or 1 (or 0.25 as their average).
    assert metrics.eer([0, 1, 1], [0.5, 0.9, 0.1]) == pytest.approx(0.5, abs=1e-12)
    assert eer_brute_force([0, 1, 1], [0.5, 0.9, 0.1]) == pytest.approx(0.5, abs=1e-4)
    # a crossing on a sloped segment (ties make it diagonal): one real and one fake share the score 0.5
    assert metrics.eer([0, 0, 1, 1], [0.2, 0.5, 0.5, 0.9]) == pytest.approx(0.25, abs=1e-12)
    assert metrics.eer([0, 0, 0, 1, 1], [0.1, 0.7, 0.3, 0.6, 0.9]) == pytest.approx(1 / 3, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_eer_equals_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 40))
    labels = rng.integers(0, 2, n)
    labels[:2] = (0, 1)
    scores = np.round(rng.random(n) * 0.6 + labels * rng.random() * 0.5, 1)  # coarse: many ties
    assert metrics.eer(labels, scores) == pytest.approx(eer_brute_force(labels, scores), abs=1e-4)


def tpr_at_fpr_brute_force(labels, scores, max_fpr):
    """Every distinct score as a threshold (P(fake) >= t is fake): the best TPR among those with FPR <= max_fpr."""
    labels, scores = np.asarray(labels, float), np.asarray(scores, float)
    pos, neg = scores[labels == 1], scores[labels == 0]
    best = (0.0, 0.0)  # above every score: nothing called fake
    for t in sorted(set(scores.tolist())):
        fpr, tpr = float((neg >= t).mean()), float((pos >= t).mean())
        if fpr <= max_fpr and tpr > best[0]:
            best = (tpr, fpr)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_tpr_at_low_fpr_equals_brute_force_and_its_threshold_gives_it(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 3000)
    scores = np.round(rng.normal(labels * 1.5, 1.0) / 8 + 0.5, 3)  # rounding makes ties
    for max_fpr in (0.01, 0.001, 0.1):
        got = metrics.tpr_at_fpr(labels, scores, max_fpr)
        tpr, fpr = tpr_at_fpr_brute_force(labels, scores, max_fpr)
        assert got["tpr"] == pytest.approx(tpr, abs=1e-12) and got["fpr"] == pytest.approx(fpr, abs=1e-12)
        called = scores >= got["threshold"]  # the threshold reproduces the operating point it reports
        assert called[labels == 1].mean() == pytest.approx(got["tpr"]) and called[labels == 0].mean() <= max_fpr
    assert metrics.tpr_at_fpr([1, 1], [0.2, 0.3], 0.01) is None


def test_eer_threshold_sits_where_the_two_error_rates_meet():
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9]  # at t = 0.4..0.6: one real above, one fake below
    t = metrics.eer_threshold(labels, scores)
    s, y = np.asarray(scores), np.asarray(labels)
    assert (s[y == 0] >= t).mean() == pytest.approx((s[y == 1] < t).mean())
    report = metrics.compute_metrics([str(i) for i in range(8)], ["m"] * 8, labels, scores)
    assert report["tpr_at_fpr"]["0.01"]["tpr"] == pytest.approx(0.75)  # 0.7, 0.8, 0.9: above the top real, 0.6
    assert set(report["video_tpr_at_fpr"]) == {"0.01", "0.001"}


# ------------------------------------------------------------------------------------ confident video aggregation


def test_confident_aggregation_hand_computed_cases():
    # 32 frames, 14 above 0.8 (> 32 // 2.5 = 12 and > 11): the mean of those 14 only
    scores = [0.9] * 7 + [0.95] * 7 + [0.1] * 18
    assert metrics.confident_mean(scores) == pytest.approx((0.9 * 7 + 0.95 * 7) / 14)
    # 12 above 0.8 of 32: 12 is not > 12, so the first rule does not apply; not > 90% below 0.2: the plain mean
    scores = [0.9] * 12 + [0.1] * 20
    assert metrics.confident_mean(scores) == pytest.approx(np.mean(scores))
    # 30 of 32 below 0.2 (> 28.8): the mean of those 30, the two uncertain frames ignored
    scores = [0.05] * 15 + [0.15] * 15 + [0.5, 0.7]
    assert metrics.confident_mean(scores) == pytest.approx(0.1)
    # 10 frames, all above 0.8: 10 is not > 11, not mostly real: the plain mean
    assert metrics.confident_mean([0.85] * 5 + [0.95] * 5) == pytest.approx(0.9)
    # exactly at the thresholds: 0.8 is not "above 0.8", 0.2 is not "below 0.2"
    assert metrics.confident_mean([0.8] * 20 + [0.2] * 12) == pytest.approx(np.mean([0.8] * 20 + [0.2] * 12))


def test_confident_aggregation_reaches_video_scores_and_metrics():
    videos = ["a"] * 32 + ["b"] * 32
    methods = ["real"] * 32 + ["FaceSwap"] * 32
    labels = [0] * 32 + [1] * 32
    fake_frames = [0.9] * 13 + [0.3] * 19  # a mostly-real-looking fake with 13 confident frames
    real_frames = [0.6] * 32  # uncertain throughout: its mean outranks the fake's diluted mean
    scores = real_frames + fake_frames
    _, _, by_mean = metrics.video_scores(videos, methods, labels, scores, "mean")
    _, _, by_confident = metrics.video_scores(videos, methods, labels, scores, "confident")
    assert by_mean.tolist() == pytest.approx([0.6, (0.9 * 13 + 0.3 * 19) / 32])
    assert by_confident.tolist() == pytest.approx([0.6, 0.9])
    assert metrics.compute_metrics(videos, methods, labels, scores, "confident")["video_agg"] == "confident"
    assert metrics.compute_metrics(videos, methods, labels, scores, "mean")["video_auc"] == 0.0
    assert metrics.compute_metrics(videos, methods, labels, scores, "confident")["video_auc"] == 1.0
