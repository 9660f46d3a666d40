"""The bootstrap watcher's alarm rule, ``slack`` x ``threshold``, on bench/drift.py's dev streams (not kept).

bench/drift.py's bootstrap block (``--dev --bootstrap-only``) caches, per stream and origin, the watcher's score:
the replicas' spread over the series' residual scale, averaged over horizons. The alarm rule
(:meth:`tidecast.monitors.bootstrap.BootstrapMonitor.observe`: a one-sided CUSUM on the log score against its own
reference, minus ``slack``, alarming above ``threshold``) only reads that score, so every (slack, threshold) pair
can be replayed on the cached scores without running CycleNet again: this script feeds them, origin by origin, to a
real ``BootstrapMonitor`` (its residual scale held at 1, so its ratio is the cached score) and prints, per pair, what
bench/drift.py reports: ``lead_steps`` (median of first default alarm - first bootstrap alarm, on the out-of-range
changes both catch within 4 cycles), the counts behind it, and bootstrap alarms per 10,000 no-change steps. The
first row is the bench run itself (the engine's own alarms at the defaults, log 1.5 and 4), to read the replay of
the same pair against: the cached scores are float32 and missing where any horizon's ratio was, so on ETTh2 a few
replayed alarms move by some steps.

    python bench/drift.py --dev --bootstrap-only       # once: computes and caches the dev scores (~5 min)
    python bench/drift_bootstrap_grid.py               # the grid, from the cache (~2 min)
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import drift as bench  # noqa: E402
import drift_bootstrap as boot  # noqa: E402

from tidecast.models.naive import SeasonalNaive  # noqa: E402
from tidecast.monitors.bootstrap import BootstrapMonitor  # noqa: E402

SLACKS = (1.0, 1.2, 1.5, 2.0)  # exp(slack): the spread ratio the CUSUM ignores
THRESHOLDS = (1.0, 2.0, 4.0, 8.0)


def replay_alarms(score: np.ndarray, **params: float) -> list[list[int]]:
    """The ticks at which a ``BootstrapMonitor(**params)`` alarms on per-origin ``score`` (rows, T; NaN: none)."""
    rows_n = score.shape[0]
    monitor = BootstrapMonitor(SeasonalNaive(period=1), horizon=1, **params)
    monitor.resize(rows_n)
    monitor.pool_.scale_[:] = 1.0  # the cached score is already spread / scale
    monitor.pool_.count_[:] = 1.0
    alarms: list[list[int]] = [[] for _ in range(rows_n)]
    for t in range(score.shape[1]):
        rows = np.flatnonzero(np.isfinite(score[:, t]))
        if rows.size:
            fired = monitor.observe(rows, np.full(rows.size, t), score[rows, t, None])
            for row in fired.rows.tolist():
                alarms[row].append(t)
    return alarms


def main() -> int:
    groups, seed = bench.groups(dev=True), 1  # bench/drift.py's dev seed
    runs = [boot.cached_bootstrap_run(bench, g, bench.place_changes(g, seed), seed) for g in groups]
    counted = [g.false_alarms for g in groups]
    print(f"dev streams: {', '.join(g.name for g in groups)}")
    print(f"{'slack':>6} {'threshold':>9} {'lead':>6} {'both':>5} {'boot first':>10} {'boot only':>9} "
          f"{'default only':>12} {'neither':>7} {'FA /10k':>8}")
    print_row("bench run", runs, counted)  # the engine's own alarms, at the defaults (log 1.5, 4)
    for slack in SLACKS:
        for threshold in THRESHOLDS:
            params = {"slack": float(np.log(slack)), "threshold": threshold}
            replayed = [dataclasses.replace(run, boot_alarms=replay_alarms(run.score, **params)) for run in runs]
            print_row(f"{slack:>6.2f} {threshold:>9.1f}", replayed, counted)
    return 0


def print_row(label: str, runs: list[boot.BootRun], counted: list[bool]) -> None:
    lead = boot.leads(runs, bench.CYCLES_AFTER)
    alarms, steps = boot.false_alarms(runs, counted)
    print(f"{label:>16} {bench.fmt(lead['lead_steps'], '.1f'):>6} {lead['both']:>5} {lead['bootstrap_first']:>10} "
          f"{lead['bootstrap_only']:>9} {lead['default_only']:>12} {lead['neither']:>7} "
          f"{1e4 * alarms / max(steps, 1):>8.1f}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
