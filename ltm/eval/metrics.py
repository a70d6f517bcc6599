"""Detection metrics on P(fake) scores: frame- and video-level AUC, AP, EER, accuracy (scikit-learn does the math).

Label convention everywhere: 1 = fake, 0 = real; AUC takes fake as the positive class. A metric that is not
defined for the given labels (one class only) is `None`, never NaN, so that report.json stays valid JSON.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)

CONFIDENT_FAKE, CONFIDENT_REAL, CONFIDENT_MIN_FAKES = 0.8, 0.2, 11


def confident_mean(scores: np.ndarray) -> float:
    """The DFDC winner's video score (Seferbekov, `confident_strategy` in selimsef/dfdc_deepfake_challenge's
    kernel_utils.py), with its constants: when more than `n // 2.5` and more than 11 frames score above 0.8, the mean
    of those frames; else when more than 90% of the frames score below 0.2, the mean of those; else the mean of all.

    A few confidently fake frames decide a video that is mostly scored as real, which a plain mean dilutes. The rule
    was tuned for 32 frames a video: with 11 or fewer frames its first branch never applies (it is then "mostly
    confidently real, else mean")."""
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.size
    fakes = scores > CONFIDENT_FAKE
    if fakes.sum() > n // 2.5 and fakes.sum() > CONFIDENT_MIN_FAKES:
        return float(scores[fakes].mean())
    reals = scores < CONFIDENT_REAL
    if reals.sum() > 0.9 * n:
        return float(scores[reals].mean())
    return float(scores.mean())


# a video's score from its frames' scores (eval and predict)
VIDEO_REDUCE = {"mean": np.mean, "max": np.max, "confident": confident_mean}
VIDEO_AGGREGATIONS = tuple(VIDEO_REDUCE)


def _two_classes(labels: np.ndarray) -> bool:
    return labels.size > 0 and 0 < labels.sum() < labels.size


def auc(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    """Area under the ROC curve (the paper's metric); None when only one class is present."""
    from sklearn.metrics import roc_auc_score  # here, not at the top: `ltm predict --model` imports this module

    labels, scores = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    return float(roc_auc_score(labels, scores)) if _two_classes(labels) else None


def average_precision(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    from sklearn.metrics import average_precision_score

    labels, scores = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    return float(average_precision_score(labels, scores)) if _two_classes(labels) else None


def eer(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    """Equal error rate: where the false-positive rate equals the false-negative rate on the ROC curve.

    sklearn's ROC points are joined by straight lines; on the segment where FNR - FPR changes sign both rates
    are linear in the same parameter, so the crossing is found exactly by linear interpolation.
    """
    from sklearn.metrics import roc_curve

    labels, scores = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if not _two_classes(labels):
        return None
    fpr, tpr, _ = roc_curve(labels, scores)
    fnr = 1.0 - tpr
    gap = fnr - fpr  # starts at 1 (fpr 0, fnr 1), ends at -1, never increases
    i = int(np.argmax(gap <= 0))
    if gap[i] == 0 or i == 0:
        return float(fpr[i])
    t = gap[i - 1] / (gap[i - 1] - gap[i])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


LOW_FPRS = (0.01, 0.001)  # the operating points reported next to AUC: TPR at 1% and 0.1% false positives


def tpr_at_fpr(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray,
               max_fpr: float) -> dict | None:
    """The best true-positive rate whose false-positive rate is at most `max_fpr`, with its threshold (P(fake) >=
    threshold is called fake) and the FPR reached: a point of the ROC curve, not an interpolation, so that the
    threshold really gives it. None without both classes."""
    from sklearn.metrics import roc_curve

    labels, scores = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if not _two_classes(labels):
        return None
    # every threshold (no dropped "intermediate" points): the best one may lie inside a straight stretch of the curve
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    ok = np.flatnonzero(fpr <= max_fpr)
    i = ok[np.argmax(tpr[ok])]  # fpr[0] = 0 always qualifies (threshold +inf: nothing called fake)
    return {"tpr": float(tpr[i]), "fpr": float(fpr[i]), "threshold": float(min(thresholds[i], 1.0))}


def eer_threshold(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    """The threshold of the ROC point nearest the equal error rate (|FNR - FPR| smallest): the decision threshold
    `ltm eval --threshold-from VAL` carries from a validation set to the test set."""
    from sklearn.metrics import roc_curve

    labels, scores = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if not _two_classes(labels):
        return None
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    i = int(np.argmin(np.abs((1.0 - tpr) - fpr)))
    return float(min(thresholds[i], 1.0))


def accuracy(
    labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray, threshold: float = 0.5
) -> float:
    labels, scores = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(labels.astype(int), (scores >= threshold).astype(int)))


ECE_BINS = 15  # Guo et al. (2017)'s equal-width bins


def expected_calibration_error(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray,
                               n_bins: int = ECE_BINS) -> float | None:
    """Expected calibration error of P(fake): over `n_bins` equal-width bins of the scores, the share of frames in
    each bin times |the bin's fraction of fakes - its mean P(fake)|, summed (0 = calibrated). A detector whose AUC is
    high can still be far off here, e.g. one trained only on erased faces scoring every whole face as rather fake.
    scikit-learn's `calibration_curve` bins; None without scores, or for scores that are not probabilities."""
    from sklearn.calibration import calibration_curve

    labels, scores = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if not labels.size or scores.min() < 0 or scores.max() > 1:
        return None
    fraction_fake, mean_score = calibration_curve(labels, scores, n_bins=n_bins, strategy="uniform", pos_label=1)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], scores), minlength=n_bins)  # the same bins, non-empty ones kept
    weights = counts[counts > 0] / labels.size
    return float(np.sum(weights * np.abs(fraction_fake - mean_score)))


def video_scores(
    videos: Sequence[str], methods: Sequence[str], labels: Sequence[float], scores: Sequence[float], agg: str = "mean"
) -> tuple[list[tuple[str, str]], np.ndarray, np.ndarray]:
    """Aggregate frame scores per video: returns ((method, video) ids, labels, scores), one entry per video.

    A video is identified by (method, video id): FF++ fakes share their target's id prefix but not the id, and
    keying on the method as well keeps two sources that reuse an id apart. A video whose frames disagree on the
    label is bad data and an error naming the video.
    """
    if agg not in VIDEO_AGGREGATIONS:
        raise ValueError(f"video aggregation {agg!r}: expected one of {list(VIDEO_AGGREGATIONS)}")
    groups: dict[tuple[str, str], list[int]] = {}
    for i, key in enumerate(zip(methods, videos)):
        groups.setdefault(key, []).append(i)
    labels_arr = np.asarray(labels, dtype=np.float64)
    scores_arr = np.asarray(scores, dtype=np.float64)
    reduce = VIDEO_REDUCE[agg]
    ids, video_labels, video_score = [], [], []
    for key, idx in groups.items():
        frame_labels = labels_arr[idx]
        if not np.all(frame_labels == frame_labels[0]):
            raise ValueError(f"video {key[1]!r} (method {key[0]!r}) has frames labelled both real and fake")
        ids.append(key)
        video_labels.append(frame_labels[0])
        video_score.append(float(reduce(scores_arr[idx])))
    return ids, np.asarray(video_labels), np.asarray(video_score)


def compute_metrics(
    videos: Sequence[str],
    methods: Sequence[str],
    labels: Sequence[float],
    scores: Sequence[float],
    video_agg: str = "mean",
    threshold: float = 0.5,
) -> dict:
    """All report.json metrics for one scored set; `per_method` rates each fake method against all reals."""
    labels_arr = np.asarray(labels, dtype=np.float64)
    scores_arr = np.asarray(scores, dtype=np.float64)
    methods_arr = np.asarray(methods, dtype=object)
    _, v_labels, v_scores = video_scores(videos, methods, labels_arr, scores_arr, video_agg)
    out = {
        "frame_auc": auc(labels_arr, scores_arr),
        "video_auc": auc(v_labels, v_scores),
        "ap": average_precision(labels_arr, scores_arr),
        "eer": eer(labels_arr, scores_arr),
        "acc": accuracy(labels_arr, scores_arr, threshold) if labels_arr.size else None,
        "ece": expected_calibration_error(labels_arr, scores_arr),
        "n_frames": int(labels_arr.size),
        "n_videos": int(v_labels.size),
        "n_real": int((labels_arr == 0).sum()),
        "n_fake": int((labels_arr == 1).sum()),
        "video_agg": video_agg,
        "threshold": threshold,
        "tpr_at_fpr": {f"{f:g}": tpr_at_fpr(labels_arr, scores_arr, f) for f in LOW_FPRS},
        "video_tpr_at_fpr": {f"{f:g}": tpr_at_fpr(v_labels, v_scores, f) for f in LOW_FPRS},
    }
    real = labels_arr == 0
    per_method = {}
    for method in sorted(set(methods_arr[labels_arr == 1].tolist())):
        sel = real | ((methods_arr == method) & (labels_arr == 1))
        sel_videos = [v for v, s in zip(videos, sel) if s]
        _, mv_labels, mv_scores = video_scores(
            sel_videos, methods_arr[sel].tolist(), labels_arr[sel], scores_arr[sel], video_agg
        )
        per_method[method] = {
            "frame_auc": auc(labels_arr[sel], scores_arr[sel]),
            "video_auc": auc(mv_labels, mv_scores),
            "n_frames": int(((methods_arr == method) & (labels_arr == 1)).sum()),
        }
    out["per_method"] = per_method
    if out["frame_auc"] is None:
        log.warning("AUC is undefined: the scored set holds only %s samples", "fake" if out["n_fake"] else "real")
    return out
