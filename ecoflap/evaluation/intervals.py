"""Bootstrap intervals, so a reader can tell which differences between rows are real: over the
evaluation windows for perplexity, over the items for accuracy. Seeded, so the same per-item
values always give the same interval."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def bootstrap_interval(values: Sequence[float], statistic: Callable[[np.ndarray], np.ndarray],
                       resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` (applied along axis 1 to a [resamples, n]
    array of resampled values)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) < 2:
        raise ValueError(f"need at least two per-item values for an interval, got {len(values)}")
    rng = np.random.default_rng(seed)
    draws = values[rng.integers(0, len(values), size=(resamples, len(values)))]
    stats = statistic(draws)
    tail = (1 - level) / 2
    lo, hi = np.quantile(stats, [tail, 1 - tail])
    return float(lo), float(hi)


def perplexity_interval(window_nll: Sequence[float], **kw) -> tuple[float, float]:
    """Windows hold equally many predicted tokens, so perplexity = exp(mean window NLL)."""
    return bootstrap_interval(window_nll, lambda d: np.exp(d.mean(axis=1)), **kw)


def mean_interval(item_scores: Sequence[float], **kw) -> tuple[float, float]:
    return bootstrap_interval(item_scores, lambda d: d.mean(axis=1), **kw)


def paired_ratio_interval(a_nll: Sequence[float], b_nll: Sequence[float], **kw) -> tuple[float, float]:
    """Interval of perplexity(a) / perplexity(b) over the same windows resampled together."""
    diff = np.asarray(a_nll, dtype=np.float64) - np.asarray(b_nll, dtype=np.float64)
    return bootstrap_interval(diff, lambda d: np.exp(d.mean(axis=1)), **kw)


def paired_difference_interval(a: Sequence[float], b: Sequence[float], **kw) -> tuple[float, float]:
    """Interval of mean(a) - mean(b) over the same items resampled together."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return bootstrap_interval(diff, lambda d: d.mean(axis=1), **kw)
