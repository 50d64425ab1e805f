"""Summary statistics of seeded runs: mean, standard deviation, Student-t 95 % intervals and paired differences.

The t quantiles and the paired test come from scipy; numbers are plain floats so they go into JSON.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as _st


def summary(values, confidence: float = 0.95) -> dict:
    """``{"n", "mean", "std", "ci_low", "ci_high", "half_width"}`` of ``values``: the sample
    standard deviation (ddof 1) and the Student-t interval of the mean (NaN interval for n < 2)."""
    x = np.asarray(list(values), dtype=float)
    n = len(x)
    if n == 0:
        raise ValueError("summary of no values")
    mean = float(x.mean())
    if n < 2:
        return {"n": n, "mean": mean, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan, "half_width": math.nan}
    std = float(x.std(ddof=1))
    half = float(_st.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n))
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "half_width": half}


def paired(a, b, confidence: float = 0.95) -> dict:
    """The paired difference ``a − b`` (the same seeds, in the same order): its summary plus the
    two-sided p-value of the paired t-test (NaN for n < 2 or when every difference is equal)."""
    a, b = np.asarray(list(a), dtype=float), np.asarray(list(b), dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired needs the same number of runs on both sides, got {len(a)} and {len(b)}")
    out = summary(a - b, confidence)
    diff = a - b
    out["p_value"] = float(_st.ttest_rel(a, b).pvalue) if len(a) >= 2 and np.ptp(diff) > 0 else math.nan
    return out
