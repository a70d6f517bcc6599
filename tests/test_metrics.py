"""The equal error rate against a brute-force reference that shares no code with ltm.metrics (nor sklearn)."""

from __future__ import annotations

import numpy as np
import pytest

from ltm import metrics


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
