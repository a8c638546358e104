"""Is a difference between two models real? Paired statistics over the same items.

Every item is scored for every model, so two models are compared item by item: the paired
difference of their scores, a 95% interval for its mean from a paired bootstrap (items
resampled with replacement, the same resample for both models, seeded), and for 0/1 scores
McNemar's exact test on the items where exactly one of the two is right. The word a merge
author reads: **better** or **worse** when the whole interval is on one side of zero, else
**no detectable difference** — never a bare "+0.4".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

BOOTSTRAP = 10_000
SEED = 20240314
LEVEL = 0.95


@dataclass(frozen=True)
class Score:
    """One model on one task: the mean of its item scores and that mean's standard error."""

    mean: float
    stderr: float
    n: int


def score(values: Sequence[float]) -> Score:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n)), as lm-eval reports it."""
    n = len(values)
    if n == 0:
        return Score(float("nan"), float("nan"), 0)
    mean = sum(values) / n
    if n < 2:
        return Score(mean, float("nan"), n)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Score(mean, math.sqrt(var / n), n)


@dataclass(frozen=True)
class Paired:
    """Model B minus model A over the same items."""

    diff: float  # mean of b - a
    low: float  # 95% paired-bootstrap interval of the mean difference
    high: float
    n: int
    only_a: int  # items where only A scores 1 (0/1 scores), else 0
    only_b: int
    p_mcnemar: float | None  # exact two-sided McNemar p-value (0/1 scores), else None
    verdict: str  # "better", "worse", "no detectable difference"


def paired(a: Sequence[float], b: Sequence[float], resamples: int = BOOTSTRAP, seed: int = SEED) -> Paired:
    """Compare per-item scores ``a`` (reference) and ``b`` (candidate), in the same item order."""
    import numpy as np

    if len(a) != len(b):
        raise ValueError(f"paired scores need the same items ({len(a)} vs {len(b)})")
    n = len(a)
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = y - x
    if n == 0:
        return Paired(float("nan"), float("nan"), float("nan"), 0, 0, 0, None, "no detectable difference")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # bounded memory: 1000 resamples at a time
        k = min(1000, resamples - start)
        idx = rng.integers(0, n, size=(k, n))
        means[start:start + k] = d[idx].mean(axis=1)
    tail = (1 - LEVEL) / 2
    low, high = (float(v) for v in np.quantile(means, [tail, 1 - tail]))
    binary = bool(np.all((x == 0) | (x == 1)) and np.all((y == 0) | (y == 1)))
    only_a = int(np.sum((x == 1) & (y == 0))) if binary else 0
    only_b = int(np.sum((x == 0) & (y == 1))) if binary else 0
    p = mcnemar(only_a, only_b) if binary else None
    return Paired(float(d.mean()), low, high, n, only_a, only_b, p, word(low, high))


def word(low: float, high: float) -> str:
    """The word for a difference's interval: better or worse only when it is all on one side of zero."""
    return "better" if low > 0 else "worse" if high < 0 else "no detectable difference"


def paired_average(per_task: Sequence[Sequence[float]], resamples: int = BOOTSTRAP, seed: int = SEED) -> dict[str, Any]:
    """The card's Avg. row of a difference: the mean over tasks of each task's mean paired
    difference (b - a per item), with a bootstrap interval that resamples every task's items
    (seeded: the same interval every run), and its word."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = [np.asarray(d, dtype=np.float64) for d in per_task]
    boot = np.zeros(resamples)
    for d in arrays:
        idx = rng.integers(0, len(d), size=(resamples, len(d)))
        boot += d[idx].mean(axis=1)
    boot /= len(arrays)
    tail = (1 - LEVEL) / 2
    low, high = (float(v) for v in np.quantile(boot, [tail, 1 - tail]))
    diff = float(np.mean([d.mean() for d in arrays]))
    return {"diff": diff, "low": low, "high": high, "verdict": word(low, high)}


def mcnemar(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar test: the discordant items as a Binomial(only_a + only_b, 1/2).
    Under no difference each is equally likely to favour either model."""
    m = only_a + only_b
    if m == 0:
        return 1.0
    k = min(only_a, only_b)
    # P(X <= k) for X ~ Binomial(m, 1/2), in log space so large m stays exact enough
    logs = [math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) - m * math.log(2) for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return min(1.0, 2 * tail)
