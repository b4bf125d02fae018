"""The statistics of a report, from scipy.stats: means with 95% confidence intervals and p-values (Student's t).

Seeds are few (2-5), so every interval is the t interval mean ± t_{0.975, n-1} · sd / sqrt(n), and every p-value a
two-sided t-test: one-sample against a reference value (a speedup against 1), or paired (a variant's final losses
against its baseline's, seed by seed). With one value there is no interval and no p-value; with no spread at all
(identical values) neither is defined, and both are NaN rather than a confident-looking 0 or 1.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean over seeds with its sample std (ddof 1), 95% CI and two-sided p-value; NaN where undefined."""

    n: int
    mean: float
    std: float
    low: float
    high: float
    p: float

    def contains(self, value: float) -> bool:
        """Whether the CI contains `value` (False when there is no CI)."""
        return not math.isnan(self.low) and self.low <= value <= self.high


NONE = Estimate(0, math.nan, math.nan, math.nan, math.nan, math.nan)


def _finite(values: Sequence[float]) -> np.ndarray:
    a = np.asarray([float(v) for v in values if v is not None], dtype=float)
    return a[np.isfinite(a)]


def _no_spread(a: np.ndarray) -> bool:
    return float(np.ptp(a)) <= 1e-12 * max(1.0, float(np.max(np.abs(a))))


def estimate(values: Sequence[float], mu: float = 0.0) -> Estimate:
    """Mean, std and 95% CI of `values` (non-finite ones dropped), p-value of the t-test of mean == mu."""
    a = _finite(values)
    n = len(a)
    if n == 0:
        return NONE
    mean = float(a.mean())
    if n == 1:
        return Estimate(1, mean, math.nan, math.nan, math.nan, math.nan)
    std = float(a.std(ddof=1))
    if _no_spread(a):
        return Estimate(n, mean, 0.0, math.nan, math.nan, math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_1samp(a, mu)
        ci = res.confidence_interval(CONFIDENCE)
    return Estimate(n, mean, std, float(ci.low) + 0.0, float(ci.high) + 0.0, float(res.pvalue))


def paired(values: Sequence[float], references: Sequence[float]) -> Estimate:
    """The paired difference values - references (seed by seed): mean, std, 95% CI and the paired t-test's p.

    Pairs where either side is missing are dropped."""
    a = np.asarray(values, dtype=float)
    b = np.asarray(references, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    d = a - b
    n = len(d)
    if n < 2 or _no_spread(d):
        return estimate(d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_rel(a, b)
        ci = res.confidence_interval(CONFIDENCE)
    return Estimate(n, float(d.mean()), float(d.std(ddof=1)), float(ci.low), float(ci.high), float(res.pvalue))


def fdr_adjusted(p_values: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values, scipy.stats.false_discovery_control) of a family of tests: the
    finite p-values among `p_values` are adjusted together, NaN stays NaN. A report's family is the variants of one
    comparison: with seven activations tested, one p below 0.05 by chance alone is likely; q says what survives."""
    p = np.asarray(p_values, dtype=float)
    q = np.full_like(p, math.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = stats.false_discovery_control(p[ok])
    return q
