"""The statistics of a multi-seed comparison, in one place: `ltm sweep`, `ltm reproduce` and
`bench/generalization.py` all read their intervals, paired differences and verdicts from here.

- `interval`: a mean over seeds with its 95% Student-t interval (scipy's t quantiles, never the normal's 1.96).
- `paired`: the difference of two variants paired *by seed*: the same seed means the same data order, the same
  initialisation of shared parts and the same machine, so the run-to-run noise the two share cancels. Values are
  matched on their seed key, never on their position in a list: a missing or reordered seed must not pair seed 3
  of one variant with seed 4 of the other.
- `n_needed`: how many seeds a paired comparison needs to resolve an effect of a stated size, from the observed
  paired standard deviation: the smallest N at which a two-sided paired t-test at the interval's level detects
  that effect with the stated power (scipy's noncentral t gives the power exactly).
- `verdict`: "better", "worse" or "no difference resolved at this N" (then with `n_needed`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import scipy.stats

CONFIDENCE = 0.95
EFFECT = 0.02  # the AUC difference a verdict asks about unless told otherwise (docs/sweep.md)
POWER = 0.8
MAX_N = 100_000


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided t-interval; `lo`/`hi` are nan for fewer than two values."""

    mean: float
    lo: float
    hi: float
    n: int
    sd: float  # sample standard deviation (nan below two values)

    @property
    def resolved(self) -> bool:
        """True when the interval excludes zero."""
        return math.isfinite(self.lo) and (self.lo > 0 or self.hi < 0)

    def as_dict(self, digits: int = 6) -> dict[str, Any]:
        return {k: (round(v, digits) if isinstance(v, float) and math.isfinite(v) else
                    (None if isinstance(v, float) else v)) for k, v in asdict(self).items()}

    def text(self, signed: bool = False, digits: int = 4) -> str:
        f = f"{{:{'+' if signed else ''}.{digits}f}}"
        if not math.isfinite(self.lo):
            return f.format(self.mean) + " (one seed: no interval)"
        return f"{f.format(self.mean)} ({f.format(self.lo)} .. {f.format(self.hi)})"


def interval(values: list[float] | tuple[float, ...], confidence: float = CONFIDENCE) -> Interval:
    """Mean and two-sided `confidence` t-interval over `values` (seeds): mean +- t(n-1) x sd / sqrt(n)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("interval of no values")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Interval(mean, float("nan"), float("nan"), len(values), float("nan"))
    sem = scipy.stats.sem(values)
    if sem == 0:  # identical values: scipy's interval is (nan, nan) for a zero scale; the interval is the point
        lo = hi = mean
    else:
        lo, hi = scipy.stats.t.interval(confidence, len(values) - 1, loc=mean, scale=sem)
    return Interval(mean, float(lo), float(hi), len(values), statistics.stdev(values))


@dataclass(frozen=True)
class Paired:
    """`a - b` per seed (only seeds both have), and the interval of those differences."""

    per_seed: dict[int, float]
    interval: Interval
    missing: tuple[int, ...]  # seeds only one side has (left out of the pairing)


def paired(a: Mapping[int, float], b: Mapping[int, float], confidence: float = CONFIDENCE) -> Paired:
    """Differences `a[seed] - b[seed]` over the seeds both sides have, with their t-interval."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"no seed in common to pair (a has {sorted(a)}, b has {sorted(b)})")
    diffs = {s: float(a[s]) - float(b[s]) for s in seeds}
    missing = tuple(sorted(set(a) ^ set(b)))
    return Paired(diffs, interval(list(diffs.values()), confidence), missing)


def power(n: int, sd: float, effect: float, confidence: float = CONFIDENCE) -> float:
    """Power of a two-sided paired t-test on `n` pairs to detect a true mean difference `effect` given the paired
    standard deviation `sd`: P(|T| > t_crit) with T noncentral t (df n-1, noncentrality effect x sqrt(n) / sd)."""
    if n < 2:
        return 0.0
    if sd <= 0:
        return 1.0
    df = n - 1
    crit = scipy.stats.t.ppf(1 - (1 - confidence) / 2, df)
    nc = abs(effect) * math.sqrt(n) / sd
    return float(scipy.stats.nct.sf(crit, df, nc) + scipy.stats.nct.cdf(-crit, df, nc))


def n_needed(sd: float, effect: float = EFFECT, confidence: float = CONFIDENCE,
             target_power: float = POWER) -> int | None:
    """The smallest number of seeds (pairs) with which a paired t-test at `confidence` finds a true difference of
    `effect` with probability `target_power`; None when `sd` is not a finite number (fewer than two seeds)."""
    if not math.isfinite(sd) or effect == 0:
        return None
    if sd == 0:
        return 2
    lo, hi = 2, 4
    while power(hi, sd, effect, confidence) < target_power:  # power grows with n: bracket, then bisect
        lo, hi = hi, hi * 2
        if hi > MAX_N:
            return None
    while lo < hi:
        mid = (lo + hi) // 2
        if power(mid, sd, effect, confidence) >= target_power:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass(frozen=True)
class Verdict:
    word: str  # better | worse | no difference resolved at this N | one seed: no interval
    n: int
    n_needed: int | None  # for an unresolved comparison: seeds to resolve `effect`
    effect: float
    rules_out: bool = False  # unresolved, but the interval lies within +-effect: an effect that large is excluded

    def text(self) -> str:
        if self.word in ("better", "worse"):
            return f"{self.word} (95% interval excludes 0, N={self.n})"
        if self.n_needed is None:
            return f"{self.word}"
        out = (f"{self.word}={self.n}; N={self.n_needed} would resolve {self.effect:+.3f} "
               f"({POWER:.0%} power, from the paired SD)")
        if self.rules_out:
            out += f"; the interval rules out a difference of {self.effect:.3f} either way"
        return out


def verdict(diff: Interval, effect: float = EFFECT, higher_is_better: bool = True) -> Verdict:
    """The comparison's word from its paired interval; an unresolved one names the N for `effect`."""
    if diff.n < 2:
        return Verdict("one seed: no interval", diff.n, None, effect)
    if diff.resolved:
        up = diff.lo > 0
        return Verdict("better" if up == higher_is_better else "worse", diff.n, None, effect)
    inside = -abs(effect) < diff.lo and diff.hi < abs(effect)
    return Verdict("no difference resolved at this N", diff.n, n_needed(diff.sd, effect), effect, inside)
