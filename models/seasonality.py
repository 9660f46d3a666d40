"""Cycle-length detection from the autocorrelation function, checked by a backtest.

The cycle length W is read off the sample autocorrelation (ACF) of the *first differences* of the series:
differencing removes the slow level and trend that otherwise dominate the ACF of a persistent series (ETTh1's oil
temperature peaks at lag 22-23 undifferenced). Among the local peaks of that ACF in ``[min_period, max_period]``
the highest wins, except that a shorter peak dividing it exactly and reaching ``harmonic_ratio`` of its height is
preferred (a weekly peak at 336 half-hours also repeats the daily one at 48; the fundamental is the safer cycle
when history is short). A winner below ``min_strength`` means no cycle, and so does one whose mean cycle forecasts
the spans it did not see worse than their own flat level (below): noise and random walks.

Differencing also weights a cycle by how *rough* it is, not by how much of the level it explains, so a multiple
of the cycle can outscore it: ETTh1's LUFL and LULL peak at 48 hours rather than 24, and ETTh1 upsampled to 15
minutes peaks at 192 or 288 steps on some two-week windows. A model then estimates twice as many cycle values
from half as many cycles. So the winner is checked in level space: it and the ACF peaks that divide it (reaching
``divisor_ratio`` of its height) are scored by :func:`cycle_backtest` (each one's mean cycle, estimated without
one span of the series, forecasting that span), and the best is kept, the shorter on a tie: a multiple must earn
its extra values on data it did not see. The best must also beat each span's own flat level there, or there is
no cycle at all (white noise and random walks, whose ACF peaks by chance).

>>> import numpy as np
>>> t = np.arange(24 * 40)
>>> y = np.sin(2 * np.pi * t / 24) + 0.1 * np.random.default_rng(0).normal(size=t.size)
>>> detect_period(y, max_period=100)
24
"""

from __future__ import annotations

import numpy as np

#: Relative size of steps that are float rounding, not variation: 64 ulps of the largest value (1e-12 of it hid a
#: cycle of amplitude 100 on a level of 1e14, thousands of ulps: every series whose steps were below 1e-12 of its
#: level got no cycle).
ROUNDING = 64 * np.finfo(float).eps


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


def cycle_backtest(values: np.ndarray, periods: list[int]) -> dict[int, float]:
    """Leave-one-span-out error of the mean cycle of each period in ``periods`` (each must divide the longest).

    The newest whole spans of the longest period are centred (their own mean removed: the level drifts) and
    each span is forecast by the mean cycle of the *other* spans, tiled; the result is the mean squared
    error per period (``{}`` with fewer than two spans). A period longer than the true cycle averages half as
    many cycles per value, and a shorter one cannot follow the shape: both score worse.

    >>> t = np.arange(96 * 8)
    >>> daily = np.sin(2 * np.pi * t / 96) + 0.3 * np.random.default_rng(0).normal(size=t.size)
    >>> scores = cycle_backtest(daily, [48, 96, 192])
    >>> min(scores, key=scores.get)
    96
    """
    span = max(periods)
    if any(span % p for p in periods):
        raise ValueError(f"every period must divide the longest ({span}): {periods}")
    spans = _centred_spans(values, span)
    n_spans = len(spans)
    if n_spans < 2:
        return {}
    scores = {}
    for p in periods:
        cycles = spans.reshape(n_spans, span // p, p).sum(axis=1)  # each span's sum of its cycles
        others = (cycles.sum(axis=0) - cycles) / ((n_spans - 1) * (span // p))  # mean cycle without it
        scores[p] = float(np.mean((spans - np.tile(others, span // p)) ** 2))
    return scores


def _sharpest_neighbour(x: np.ndarray, period: int, min_period: int, max_period: int, margin: float = 0.8) -> int:
    """``period``, or the lag next to it whose seasonal difference ``x[t] - x[t - lag]`` varies clearly less (below
    ``margin`` of the period's variance) on the same values: a cycle repeats best at its own length. The variance,
    not the mean square: a trend adds ``(slope * lag)^2`` to the mean square, which made a trending weekly counter
    "repeat best" at 6."""
    lags = [lag for lag in (period - 1, period, period + 1) if min_period <= lag <= max_period]
    start = max(lags)
    if x.size <= start + 2 * period:
        return period
    error = {lag: float(np.var(x[start:] - x[start - lag:x.size - lag])) for lag in lags}
    best = min(error, key=error.get)
    return best if error[best] < margin * error[period] else period


def flat_error(values: np.ndarray, span: int) -> float:
    """:func:`cycle_backtest`'s error of forecasting each span by its own level alone (no cycle): the mean square
    of the centred spans.

    >>> round(flat_error(np.arange(8.0), 4), 2)  # spans [0..3] and [4..7], each centred: 1.5^2, 0.5^2, ...
    1.25
    """
    return float(np.mean(_centred_spans(values, span) ** 2))


def _centred_spans(values: np.ndarray, span: int) -> np.ndarray:
    """The newest whole spans of ``span`` finite values, ``(n_spans, span)``, each minus its own mean."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    n_spans = x.size // span
    spans = x[x.size - n_spans * span :].reshape(n_spans, span)
    return spans - spans.mean(axis=1, keepdims=True)


def detect_period(
    values: np.ndarray,
    max_period: int,
    min_period: int = 4,
    min_strength: float = 0.15,
    harmonic_ratio: float = 0.8,
    backtest: bool = True,
    divisor_ratio: float = 0.5,
) -> int | None:
    """The dominant cycle length in ``[min_period, max_period]`` ticks, or ``None`` if there is none.

    ``backtest``: check the ACF's choice against the ACF peaks that divide it and reach ``divisor_ratio`` of
    its height, with :func:`cycle_backtest` (see the module docstring); ``False`` gives the ACF's choice alone.
    """
    values = np.asarray(values, dtype=float)
    diffs = np.diff(values)
    max_period = min(max_period, diffs.size // 2)
    if max_period <= min_period:
        return None
    finite = diffs[np.isfinite(diffs)]
    if finite.size and np.std(finite) <= ROUNDING * np.max(np.abs(values[np.isfinite(values)])):
        return None  # steps constant up to float rounding (a ramp): the ACF of that noise picked "cycles" of 5
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
            best = int(lag)
            break
    # a fundamental recurs inside every multiple: its peak is comparable, not a ripple a tenth as high
    divisors = [int(lag) for lag in peaks if lag < best and best % lag == 0 and acf[lag] >= divisor_ratio * acf[best]]
    if not backtest:
        return best
    x = values[np.isfinite(values)]
    scores = cycle_backtest(x, [*divisors, best])
    if not scores:
        return best
    chosen = min(scores, key=lambda p: (scores[p], p))
    # The ACF at lags next to the cycle differs by less than its sampling error on a noisy cycle (a clean 24-step
    # sine with noise gave 23 or 25 in 6 seeds of 20, kept for the whole run): a neighbour whose seasonal difference
    # varies clearly less takes its place.
    chosen = _sharpest_neighbour(x, chosen, min_period, max_period)
    if chosen not in scores:
        scores = cycle_backtest(x, [chosen]) or scores
    # The cycle must also beat no cycle at all on the spans it did not see (their own level, flat): the ACF of
    # 400 values of white noise has a peak above min_strength at some lag in ~1 case of 3 (73 of 200 seeds at
    # 402 values; 16 of 200 random walks), and seasonal naive then repeated noise from that many steps back.
    return chosen if scores[chosen] < flat_error(x, max(scores)) else None
