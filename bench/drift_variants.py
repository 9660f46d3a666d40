"""What was tried for the default drift detector and not kept: measured on bench/drift.py's dev streams only.

Every variant runs on the dev streams (synthetic seed 1, ETTh2 rows [0, 8700); seasonal naive and CycleNet
residuals, cached by bench/drift.py) with the same change windows, false-alarm rules and threshold factors as the
default (``cusum``), so rows of the table compare at equal thresholds and can be read against their false alarms:

* ``cusum``: the default - CUSUMs on the whitened pooled residual (level), its square (variance up, collapse), misses
  and the freeze run test.
* ``cusum, h = 1 residual``: the same detector on the 1-step residual alone instead of every matured horizon pooled.
* ``cusum, fast scale``: the 1-step residual divided by a running mean |r| of ~20 steps first, like the conformal
  PID calibrator's scale, as the lead's design note proposed (a calibrator ``scale(rows)`` accessor).
* ``matched level``: the level watcher replaced by the matched CUSUM for a step of ``delta`` reference standard
  deviations in AR(1) noise, ``S = max(0, S + a e - a^2/2, b e' - b^2/2 + a e - a^2/2)`` with the onset weight
  ``b = delta / sqrt(1 - phi^2)`` on the previous innovation ``e'`` and the plateau weight
  ``a = delta sqrt((1 - phi) / (1 + phi))`` (an onset must be confirmed by the next step: an outlier's whitened
  signature is a spike then an opposite one; the onset is clipped at 8). Threshold ``h`` x factor.
* ``window scan``: the level watcher replaced by moving means of the standardised (not whitened) residual over 6 and
  24 steps, each divided by its standard deviation under the row's AR(1) fit; alarm above 5 x factor.

    python bench/drift_variants.py            # factors 1 and 1.5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import drift as bench  # noqa: E402

from tidecast.monitors.drift import ResidualCUSUM  # noqa: E402

FACTORS = (1.0, 1.5)


class _LevelReplaced(ResidualCUSUM):
    """The default detector with its level watcher switched off and another one OR-ed in (fired as "mean")."""

    _extra: dict[str, float] = {}

    def __init__(self, factor: float = 1.0, **params) -> None:
        self._fields = {**ResidualCUSUM._fields, **self._extra}
        self.factor = factor
        super().__init__(h=1e12, **{k: v for k, v in bench.scaled(factor).items() if k != "h"}, **params)

    def _innovation(self, s: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """``z``, ``e``, ``phi`` against the reference before it learns ``x`` (as the parent computes them)."""
        idx = self._index
        n, mean, var, cov1, prev = (s[idx[f]] for f in ("n", "mean", "var", "cov1", "prev"))
        seen = n >= 2
        sd = np.sqrt(np.maximum(var, 1e-300))
        z = np.where(seen, (x - mean) / sd, 0.0)
        phi = np.where(seen, np.clip(cov1 / np.maximum(var, 1e-300), -0.95, 0.95), 0.0)
        e = (z - phi * np.where(seen, (prev - mean) / sd, 0.0)) / np.sqrt(1.0 - phi * phi)
        return z, e, phi, (n >= self.warmup) & np.isfinite(x)

    def _step(self, s, x, covered, values):
        z, e, phi, ready = self._innovation(s, np.where(np.isfinite(x), x, 0.0))
        level = self._level(s, z, e, phi, ready)
        fired, kind, stat = super()._step(s, x, covered, values)
        mine = ~fired & (level > 1.0)
        return fired | mine, np.where(mine, "mean", kind), np.where(mine, level, stat)


class MatchedLevel(_LevelReplaced):
    _extra = {"m_up": 0.0, "m_down": 0.0, "e_prev": 0.0}

    def __init__(self, factor: float = 1.0, delta: float = 3.0, h: float = 16.0, onset_clip: float = 8.0) -> None:
        self.delta, self.level_h, self.onset_clip = delta, h * factor, onset_clip
        super().__init__(factor)

    def _level(self, s, z, e, phi, ready):
        idx = self._index
        a = self.delta * np.sqrt((1 - phi) / (1 + phi))
        b = self.delta / np.sqrt(1 - phi * phi)
        ec = np.clip(e, -self.clip, self.clip)
        out = []
        for field, sign in (("m_up", 1.0), ("m_down", -1.0)):
            plateau = a * sign * ec - 0.5 * a * a
            onset = b * np.minimum(sign * s[idx["e_prev"]], self.onset_clip) - 0.5 * b * b + plateau
            stat = np.where(ready, np.maximum(0.0, np.maximum(s[idx[field]] + plateau, onset)), s[idx[field]])
            s[idx[field]] = stat
            out.append(stat)
        s[idx["e_prev"]] = np.where(ready, e, s[idx["e_prev"]])
        return np.maximum(*out) / self.level_h


class WindowScan(_LevelReplaced):
    WINDOWS = (6, 24)
    _extra = {"k": 0.0, **{f"z{i}": 0.0 for i in range(24)}}

    def __init__(self, factor: float = 1.0, c: float = 5.0, z_clip: float = 6.0) -> None:
        self.c, self.z_clip = c * factor, z_clip
        super().__init__(factor)

    def _level(self, s, z, e, phi, ready):
        idx = self._index
        width = max(self.WINDOWS)
        k = s[idx["k"]].astype(np.int64)
        cols = np.arange(z.size)
        ring = s[idx["z0"] : idx["z0"] + width]
        ring[k % width, cols] = np.where(ready, np.clip(z, -self.z_clip, self.z_clip), ring[k % width, cols])
        best = np.zeros(z.size)
        for w in self.WINDOWS:
            mean = ring[(k[None, :] - np.arange(w)[:, None]) % width, cols[None, :]].mean(axis=0)
            lags = np.arange(1, w)
            var = (w + 2 * ((w - lags)[:, None] * phi[None, :] ** lags[:, None]).sum(axis=0)) / (w * w)
            best = np.maximum(best, np.where(k + 1 >= w, np.abs(mean) / np.sqrt(var), 0.0))
        s[idx["k"]] = np.where(ready, k + 1, k)
        return best / self.c


def fast_scaled(seg: bench.Segments, runs: list, memory: int = 20) -> bench.Segments:
    """The segments with x = the h = 1 residual over a ~``memory``-step running mean |r| (a calibrator's scale)."""
    x_parts = []
    for group, _model, run in runs:
        r = run.residual[:, :, 0].astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            x = r / bench.running_scale(r, memory)
        n_clean = len(group.series)
        for row in range(r.shape[0]):
            if row < n_clean:
                lo, hi = bench.DETECT_FROM, group.length
            else:
                c = run.changes[row - n_clean]
                lo, hi = c.at - bench.PRE, c.at + bench.CYCLES_AFTER * group.cycle
            x_parts.append(x[row, lo:hi])
    out = np.full_like(seg.x, np.nan)
    for i, part in enumerate(x_parts):
        out[i, : part.size] = part
    return bench.Segments(**{**vars(seg), "x": out})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factors", default=",".join(map(str, FACTORS)), help="threshold factors, comma-separated")
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    runs = [(g, m, bench.cached_run(g, m, seed=1)) for g in bench.groups(dev=True) for m in bench.MODELS]
    pooled, one = bench.segments(runs, "mean"), bench.segments(runs, "1")
    fast = fast_scaled(one, runs)
    table = Table(title="drift detector variants on the dev streams (equal threshold factors)")
    for col in ("variant", "factor", "detected", *bench.KINDS, "median delay (cycles)", "false alarms /10k",
                "freeze rule", "synthetic"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for factor in (float(f) for f in args.factors.split(",")):
        variants = {
            "cusum": (lambda f=factor: ResidualCUSUM(**bench.scaled(f)), pooled),
            "cusum, h = 1 residual": (lambda f=factor: ResidualCUSUM(**bench.scaled(f)), one),
            "cusum, fast scale": (lambda f=factor: ResidualCUSUM(**bench.scaled(f)), fast),
            "matched level": (lambda f=factor: MatchedLevel(f), pooled),
            "window scan": (lambda f=factor: WindowScan(f), pooled),
        }
        for name, (make, seg) in variants.items():
            started = time.perf_counter()
            o = bench.score(seg, *bench.watch(make(), seg))
            changed = seg.change >= 0
            hit = changed & (o.delay >= 0)
            by_kind = bench.detection(seg, o)
            fa = bench.false_alarms(seg, o.alarm_times)
            table.add_row(name, f"{factor:g}", f"{hit.sum() / changed.sum():.2f}",
                          *(f"{by_kind[k]:.2f}" for k in bench.KINDS),
                          bench.fmt(bench.median_or_none(o.delay[hit] / seg.cycle[hit])),
                          f"{fa['all']['per_10k']:.1f}", f"{fa['rule']['per_10k']:.1f}",
                          f"{fa['synthetic']['per_10k']:.1f}")
            console.print(f"{name} x{factor:g}: {time.perf_counter() - started:.0f} s")
    console.print(table)


if __name__ == "__main__":
    main()
