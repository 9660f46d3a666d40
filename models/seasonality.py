"""Cycle-length detection from the autocorrelation function.

The cycle length W is read off the sample autocorrelation (ACF) of the *first differences* of the series:
differencing removes the slow level and trend that otherwise dominate the ACF of a persistent series (ETTh1's oil
temperature peaks at lag 22-23 undifferenced). Among the local peaks of that ACF in ``[min_period, max_period]``
the highest wins, except that a shorter peak dividing it exactly and reaching ``harmonic_ratio`` of its height is
preferred (a weekly peak at 336 half-hours also repeats the daily one at 48; the fundamental is the safer cycle
when history is short). A winner below ``min_strength`` means no cycle.

>>> import numpy as np
>>> t = np.arange(24 * 40)
>>> y = np.sin(2 * np.pi * t / 24) + 0.1 * np.random.default_rng(0).normal(size=t.size)
>>> detect_period(y, max_period=100)
24
"""

from __future__ import annotations

import numpy as np


def autocorrelation(values: np.ndarray, max_lag: int) -> np.ndarray:
    """Sample ACF for lags ``0..max_lag`` (FFT, biased estimator as in statsmodels' default)."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    x = x - x.mean() if x.size else x
    n = x.size
    if n < 2:
        return np.ones(1)
    size = 1 << int(np.ceil(np.log2(2 * n)))
    spectrum = np.fft.rfft(x, size)
    acov = np.fft.irfft(spectrum * np.conj(spectrum), size)[: max_lag + 1]
    return acov / acov[0] if acov[0] > 0 else np.zeros_like(acov)


def detect_period(
    values: np.ndarray,
    max_period: int,
    min_period: int = 4,
    min_strength: float = 0.15,
    harmonic_ratio: float = 0.8,
) -> int | None:
    """The dominant cycle length in ``[min_period, max_period]`` ticks, or ``None`` if there is none."""
    diffs = np.diff(np.asarray(values, dtype=float))
    max_period = min(max_period, diffs.size // 2)
    if max_period <= min_period:
        return None
    acf = autocorrelation(diffs, max_period + 1)
    lags = np.arange(min_period, min(max_period, acf.size - 2) + 1)
    if lags.size == 0:
        return None
    peaks = lags[(acf[lags] > acf[lags - 1]) & (acf[lags] >= acf[lags + 1])]
    if peaks.size == 0:
        return None
    best = int(peaks[np.argmax(acf[peaks])])
    if acf[best] < min_strength:
        return None
    for lag in peaks:  # ascending: the first qualifying divisor is the fundamental
        if lag < best and best % lag == 0 and acf[lag] >= harmonic_ratio * acf[best]:
            return int(lag)
    return best
