"""Sequential conformal intervals, every method side by side on one fixed point-forecast stream per case.

    .venv/bin/python bench/conformal.py                       # all four cases + the 10k x 24 line, alpha = 0.1
    .venv/bin/python bench/conformal.py --case elec2 --alpha 0.1 --json   # last line: one JSON object
    .venv/bin/python bench/conformal.py --case scale          # update + interval for 10,000 series x 24 horizons
    .venv/bin/python bench/conformal.py --case coldstart --json   # seeding and pooling, 100 series through the engine

Cases and streams: bench/conformal_data.py. MAPIE reference: bench/conformal_mapie.py. Metrics exclude the
warm-up; each seed is a different stream (elec2: bootstrap draw; ar1, shift: simulation), etth1 is one fixed
stream (every method but SPCI and MAPIE is deterministic). All metrics are averaged over seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conformal_data import (  # noqa: E402
    AR1_ORACLE_WIDTH,
    Stream,
    ar1_stream,
    coldstart_panel,
    cyclenet_available,
    elec2_stream,
    etth1_stream,
    shift_stream,
)

from tidecast.models.base import BatchForecaster, Calibration  # noqa: E402
from tidecast.monitors.conformal import CALIBRATORS, DEFAULT_CALIBRATOR, make_calibrator  # noqa: E402
from tidecast.monitors.conformal.pool import Pool  # noqa: E402

CASES = ("elec2", "ar1", "shift", "etth1")
SEEDS = {"elec2": (0, 1, 2), "ar1": tuple(range(10)), "shift": (0, 1, 2), "etth1": (0,)}
# SPCI as published refits its forest every step (~0.2 s); the long streams would take hours, so it refits less
# often there. elec2 uses the paper's window of 300 lags over the whole residual history.
SPCI_PARAMS = {
    "elec2": {"window": 300, "history": 2755, "refit_every": 10},
    "ar1": {"window": 100, "history": 1600, "refit_every": 10},
    "shift": {"window": 100, "history": 1000, "refit_every": 50},
    "etth1": {"window": 48, "history": 1000, "refit_every": 200},
}


def method_table(case: str) -> dict[str, Callable[[int, float], object] | str]:
    """name -> factory(horizon, alpha); a string value names a MAPIE method."""
    return {
        "conformal-pid": lambda H, a: make_calibrator("conformal-pid", H, a),
        "pid+integrator": lambda H, a: make_calibrator("conformal-pid", H, a, ki=0.5),
        "pid-no-scorecaster": lambda H, a: make_calibrator("conformal-pid", H, a, scorecaster=None),
        "quantile-tracker": lambda H, a: make_calibrator("quantile-tracker", H, a),
        "aci": lambda H, a: make_calibrator("aci", H, a),
        "aci-clipped": lambda H, a: make_calibrator("aci", H, a, clip=True),
        "dtaci": lambda H, a: make_calibrator("dtaci", H, a),
        "sf-ogd": lambda H, a: make_calibrator("sf-ogd", H, a),
        "saocp": lambda H, a: make_calibrator("saocp", H, a),
        "spci": lambda H, a: make_calibrator("spci", H, a, **SPCI_PARAMS[case]),
        "mapie-enbpi": "enbpi",
        "mapie-aci": "aci",
    }


# -- running --------------------------------------------------------------------------------------
def run_calibrator(
    stream: Stream, cal, every_step: bool, only_scored: bool = False
) -> tuple[np.ndarray, np.ndarray, float]:
    """Feed the stream; ``lo/hi[t, h-1]`` is the interval issued at step t. Returns (lo, hi, seconds scored).

    every_step: also issue intervals during warm-up (needed for whole-stream coverage; SPCI skips it).
    only_scored: feed only the scored horizons' columns (SPCI: one forest per cell, so 2 cells instead of 24).
    """
    R = stream.residuals
    T, H = R.shape
    rows = np.array([0])
    zeros = np.zeros((1, H))
    lo = np.full((T, H), np.nan)
    hi = np.full((T, H), np.nan)
    finite = np.isfinite(R)
    if only_scored:
        keep = np.zeros(H, bool)
        keep[[h - 1 for h in stream.horizons]] = True
        finite &= keep
    clean = np.nan_to_num(R)
    seconds = 0.0
    for t in range(T):
        scored = t >= stream.n_warm
        start = time.perf_counter()
        cal.update(rows, clean[t : t + 1], finite[t : t + 1])
        if scored or every_step:
            lo_t, hi_t = cal.interval(rows, zeros)
            lo[t], hi[t] = lo_t[0], hi_t[0]
        if scored:
            seconds += time.perf_counter() - start
    return lo, hi, seconds


def targets(stream: Stream, h: int) -> np.ndarray:
    """``y[t]``: the residual the interval issued at t (for t + h) is scored against."""
    col = stream.residuals[:, h - 1]
    out = np.full(col.size, np.nan)
    out[: col.size - h] = col[h:]
    return out


# -- metrics --------------------------------------------------------------------------------------
def longest_run(flags: np.ndarray) -> int:
    best = cur = 0
    for f in flags:
        cur = cur + 1 if f else 0
        best = max(best, cur)
    return best


def metrics(lo: np.ndarray, hi: np.ndarray, y: np.ndarray, alpha: float) -> dict[str, float]:
    ok = np.isfinite(y) & ~np.isnan(lo) & ~np.isnan(hi)
    lo, hi, y = lo[ok], hi[ok], y[ok]
    covered = (lo <= y) & (y <= hi)
    width = hi - lo
    finite = np.isfinite(width)
    score = width + (2 / alpha) * (np.maximum(lo - y, 0) + np.maximum(y - hi, 0))
    out = {
        "coverage": float(covered.mean()),
        "mean_width": float(width.mean()),
        "median_width": float(np.median(width)),
        "interval_score": float(score.mean()),
        "frac_infinite": float(1 - finite.mean()),
        "longest_miss_run": float(longest_run(~covered)),
        "path_length": float(np.abs(np.diff(width[finite])).sum()) if finite.sum() > 1 else 0.0,
    }
    for k in (20, 100):
        roll = np.convolve(covered, np.ones(k) / k, mode="valid")
        out[f"rce_{k}"] = float(np.abs(roll - (1 - alpha)).max()) if roll.size else float("nan")
    return out


def mean_dicts(ds: list[dict[str, float]]) -> dict[str, float]:
    out = {k: float(np.mean([d[k] for d in ds])) for k in ds[0]}
    out["coverage_sd"] = float(np.std([d["coverage"] for d in ds]))
    return out


# -- one case ------------------------------------------------------------------------------------
def streams_for(case: str, seed: int) -> list[Stream]:
    if case == "elec2":
        return [elec2_stream(seed)]
    if case == "ar1":
        return [ar1_stream(seed)]
    if case == "shift":
        return [shift_stream(seed)]
    out = [etth1_stream("seasonal-naive")]
    if cyclenet_available():
        with contextlib.suppress(NotImplementedError):
            out.append(etth1_stream("cyclenet"))
    return out


def run_case(case: str, alpha: float, methods: list[str] | None, log=print) -> dict:
    table = method_table(case)
    names = [m for m in table if methods is None or m in methods]
    per: dict[str, list] = {}  # key -> list of metric dicts (over seeds)
    extra: dict[str, dict] = {}
    for seed in SEEDS[case]:
        for stream in streams_for(case, seed):
            suffix = "" if case != "etth1" else f"[{stream.info['model']}]"
            for name in names:
                factory = table[name]
                for h in stream.horizons if isinstance(factory, str) else (None,):
                    if isinstance(factory, str):
                        from conformal_mapie import run_mapie

                        lo_h, hi_h, sec = run_mapie(stream.residuals, stream.n_warm, h, alpha, factory, seed)
                        results = {h: (lo_h, hi_h)}
                        n_scored = stream.residuals.shape[0] - stream.n_warm
                        us = sec / n_scored * 1e6
                    else:
                        cal = factory(stream.horizon, alpha)
                        slow = name == "spci"
                        lo, hi, sec = run_calibrator(stream, cal, every_step=not slow, only_scored=slow)
                        results = {hh: (lo[:, hh - 1], hi[:, hh - 1]) for hh in stream.horizons}
                        us = sec / (stream.residuals.shape[0] - stream.n_warm) * 1e6
                        if name == DEFAULT_CALIBRATOR and case == "etth1":
                            # The engine's replay requirement: coverage over the whole stream, all horizons,
                            # cold start included.
                            cov = []
                            for hh in range(1, stream.horizon + 1):
                                y = targets(stream, hh)
                                ok = np.isfinite(y) & np.isfinite(lo[:, hh - 1])
                                cov.append(((lo[ok, hh - 1] <= y[ok]) & (y[ok] <= hi[ok, hh - 1])).mean())
                            extra.setdefault(name + suffix, {})["whole_stream_coverage_h1_24"] = float(np.mean(cov))
                    for hh, (lo_h, hi_h) in results.items():
                        y = targets(stream, hh)
                        sl = slice(stream.n_warm, None)
                        m = metrics(lo_h[sl], hi_h[sl], y[sl], alpha)
                        m["us_per_step"] = us
                        key = name + suffix + (f"@h{hh}" if case == "etth1" else "")
                        per.setdefault(key, []).append(m)
            log(f"  {case} seed {seed} done")
    out = {k: mean_dicts(v) for k, v in per.items()}
    for k, v in extra.items():
        for kk in out:
            if kk.startswith(k + "@"):
                out[kk].update(v)
    return out


def summarise_etth1(res: dict) -> dict:
    """One entry per method: metrics averaged over streams and horizons, with ``by_stream`` ->
    ``{model: {... averaged over horizons, "by_horizon": {h: metrics}}}``."""
    out: dict[str, dict] = {}
    for key, m in res.items():
        name, rest = key.split("[", 1)
        model, h = rest.split("]@h")
        stream = out.setdefault(name, {"by_stream": {}})["by_stream"].setdefault(model, {"by_horizon": {}})
        stream["by_horizon"][h] = m
    for entry in out.values():
        leaves = []
        for stream in entry["by_stream"].values():
            hs = list(stream["by_horizon"].values())
            leaves += hs
            stream.update({k: float(np.mean([d[k] for d in hs])) for k in hs[0] if isinstance(hs[0][k], float)})
        entry.update({k: float(np.mean([d[k] for d in leaves])) for k in leaves[0] if isinstance(leaves[0][k], float)})
    return out


# -- 10k x 24 -----------------------------------------------------------------------------------
def scale_bench(
    name: str, n_series: int = 10_000, horizon: int = 24, steps: int = 30, shuffled: bool = False, **params
) -> dict:
    """Per-step cost of update + interval for every (series, horizon) cell; ``shuffled``: rows in random order
    (the gather/scatter path) instead of one contiguous block."""
    rng = np.random.default_rng(0)
    cal = make_calibrator(name, horizon, 0.1, **params)
    cal.resize(n_series)
    rows = rng.permutation(n_series) if shuffled else np.arange(n_series)
    mask = np.ones((n_series, horizon), bool)
    means = rng.normal(size=(n_series, horizon))
    for _ in range(horizon + 5):  # fill rings past the largest lag
        cal.update(rows, rng.normal(size=(n_series, horizon)), mask)
    t_up, t_iv = [], []
    for _ in range(steps):
        r = rng.normal(size=(n_series, horizon))
        s = time.perf_counter()
        cal.update(rows, r, mask)
        t_up.append(time.perf_counter() - s)
        s = time.perf_counter()
        cal.interval(rows, means)
        t_iv.append(time.perf_counter() - s)
    state = cal.export_rows(rows)
    nbytes = sum(a.nbytes for a in state.values())
    # Medians: the machine is shared, a neighbour's burst should not decide the number.
    up, iv = 1e3 * float(np.median(t_up)), 1e3 * float(np.median(t_iv))
    return {"update_ms": up, "interval_ms": iv, "total_ms": up + iv, "state_mb": nbytes / 2**20}


# -- cold start: seeding and pooling through the engine ----------------------------------------------------------
#: Panel seeds: settings (n0, the pool's scale, CycleNet's hold-out) were chosen on the dev panel, never the scored.
COLDSTART_SEEDS = {"scored": 1, "dev": 2}
COLDSTART_H = 24
EARLY_STEPS = 250
#: CycleNet on the panel: a 1,000-hour warm start (the default 2,000 would leave late series little room; the fit
#: of 50 series is the bench's main cost), the paper's Linear backbone, learning online afterwards.
#: ``cyclenet@holdout`` keeps the last half of its validation part out of early stopping and seeds from it.
COLDSTART_MODELS: dict[str, tuple[str, dict]] = {
    "seasonal-naive": ("seasonal-naive", {}),
    "cyclenet": ("cyclenet", {"warm_start": 1000, "step_budget": 60.0, "defer": False, "seed": 0}),
    "cyclenet@holdout": ("cyclenet", {"warm_start": 1000, "step_budget": 60.0, "defer": False, "seed": 0,
                                      "calib_holdout": 0.5}),
}
HOUR_NS = 3_600_000_000_000


def coldstart_methods(horizon: int, alpha: float) -> dict[str, tuple[Callable, Callable, bool, dict[str, str]]]:
    """name -> (calibrator factory, pool factory (None: the lane's default), seeded?, model -> recorded model).
    The default is the engine's: seeded, pooled where the model shares state across series (CycleNet).
    ``unseeded`` is the engine before seeding and pooling; ``seed-only`` and ``pool-only`` take one of the two
    away; ``seeded+pooled`` pools seasonal naive too; ``holdout-residuals`` seeds CycleNet from a validation half
    that early stopping did not see (the default seeds from the windows early stopping chose its epoch on)."""
    cal = lambda: make_calibrator(DEFAULT_CALIBRATOR, horizon, alpha)  # noqa: E731
    both = {"seasonal-naive": "seasonal-naive", "cyclenet": "cyclenet"}
    engine_default = lambda: None  # noqa: E731 - the lane's own choice: pooled for CycleNet, not for seasonal naive
    return {
        DEFAULT_CALIBRATOR: (cal, engine_default, True, both),
        "unseeded": (cal, lambda: Pool(horizon, n0=0), False, both),
        "seed-only": (cal, lambda: Pool(horizon, n0=0), True, both),
        "pool-only": (cal, lambda: Pool(horizon), False, both),
        "seeded+pooled": (cal, lambda: Pool(horizon), True, {"seasonal-naive": "seasonal-naive"}),
        "holdout-residuals": (cal, engine_default, True, {"cyclenet": "cyclenet@holdout"}),
    }


class _Recorder(BatchForecaster):
    """A model that also records what it forecast and handed over, round by round (for :class:`_Replayer`)."""

    def __init__(self, model: BatchForecaster) -> None:
        self.model, self.name = model, model.name
        self.couples_rows = model.couples_rows  # the lane pools (or not) as it would around the model itself
        self.forecasts: list[tuple[np.ndarray, np.ndarray]] = []
        self.calibrations: dict[int, Calibration] = {}

    def resize(self, n_rows: int) -> None:
        self.model.resize(n_rows)

    def learn_many(self, rows, ticks, values, filled=None) -> None:
        self.model.learn_many(rows, ticks, values, filled=filled)

    def forecast_many(self, rows, horizon):
        out = self.model.forecast_many(rows, horizon)
        self.forecasts.append((rows.copy(), out.copy()))
        return out

    def pop_calibration(self, horizon):
        handed = self.model.pop_calibration(horizon)
        if handed is not None:
            self.calibrations[len(self.forecasts) - 1] = handed
        return handed

    def export_rows(self, rows):
        return {}

    def import_rows(self, rows, state) -> None:
        pass


class _Replayer(BatchForecaster):
    """Replays a :class:`_Recorder`'s forecasts (and, if ``seeded``, its hand-offs) in the same rounds."""

    def __init__(self, recorder: _Recorder, seeded: bool) -> None:
        self.recorder, self.seeded, self.name, self.calls = recorder, seeded, recorder.name, 0
        self.couples_rows = recorder.couples_rows

    def resize(self, n_rows: int) -> None:
        pass

    def learn_many(self, rows, ticks, values, filled=None) -> None:
        pass

    def forecast_many(self, rows, horizon):
        expected, out = self.recorder.forecasts[self.calls]
        assert np.array_equal(expected, rows), "the replay must see the recorded rounds"
        self.calls += 1
        return out

    def pop_calibration(self, horizon):
        return self.recorder.calibrations.get(self.calls - 1) if self.seeded else None

    def export_rows(self, rows):
        return {}

    def import_rows(self, rows, state) -> None:
        pass


def panel_batches(panel) -> list:
    from tidecast.stream.batch import ObservationBatch

    ids = np.array(panel.ids, dtype=object)
    batches = []
    for t in range(panel.values.shape[1]):
        present = np.flatnonzero(panel.start <= t)
        batches.append(ObservationBatch(ids[present], np.full(present.size, t * HOUR_NS, np.int64),
                                        panel.values[present, t]))
    return batches


class _Coverage:
    """Per model: coverage (no interval = a miss) and widths by horizon over the early steps of the first
    cohort, of the late series, over everything and after the early steps."""

    GROUPS = ("early", "late_early", "all", "warm")

    def __init__(self, panel, horizon: int) -> None:
        self.panel, self.horizon = panel, horizon
        self.index = {sid: i for i, sid in enumerate(panel.ids)}
        self.first: dict[str, np.ndarray] = {}
        z = lambda: np.zeros((len(self.GROUPS), horizon))  # noqa: E731
        self.sums: dict[str, dict[str, np.ndarray]] = {}
        self._z = z

    def add(self, batch) -> None:
        if not len(batch):
            return
        values = self.panel.values
        series = np.fromiter(map(self.index.__getitem__, batch.series_id), np.int64, len(batch))
        tick = batch.issued_at_ns // HOUR_NS
        h = batch.h.astype(np.int64)
        target = tick + h
        for model in np.unique(batch.model.astype(str)):
            sel = (batch.model == model) & (target < values.shape[1])
            first = self.first.setdefault(model, np.full(values.shape[0], -1, np.int64))
            new = sel & (first[series] < 0)
            first[series[new]] = tick[new]  # rows of a batch share one tick: its first forecast
            s, hh, t = series[sel], h[sel] - 1, tick[sel]
            y = values[s, target[sel]]
            lo, hi = batch.lower[sel], batch.upper[sel]
            has = ~np.isnan(lo) & ~np.isnan(hi)
            covered = has & (lo <= y) & (y <= hi)
            width = np.where(has & np.isfinite(hi - lo), hi - lo, 0.0)
            age = t - first[s]
            late = self.panel.late[s]
            sums = self.sums.setdefault(model, {k: self._z() for k in ("n", "covered", "has", "width")})
            for g, mask in enumerate(((age < EARLY_STEPS) & ~late, (age < EARLY_STEPS) & late,
                                      np.ones(s.size, bool), age >= EARLY_STEPS)):
                for key, val in (("n", mask), ("covered", covered & mask), ("has", has & mask),
                                 ("width", np.where(mask, width, 0.0))):
                    sums[key][g] += np.bincount(hh, weights=val.astype(float), minlength=self.horizon)

    def result(self) -> dict[str, dict]:
        out = {}
        for model, s in self.sums.items():
            cov = s["covered"] / np.maximum(s["n"], 1)

            def by_h(g: int, cov: np.ndarray = cov) -> dict[str, float]:
                return {str(h + 1): float(cov[g, h]) for h in range(self.horizon)}
            g_all, g_warm = self.GROUPS.index("all"), self.GROUPS.index("warm")
            out[model] = {
                "early_coverage_by_h": by_h(0),
                "coverage_by_h": by_h(g_all),
                "late_early_coverage_by_h": by_h(1),
                "no_interval_share": float(1 - s["has"][g_all].sum() / s["n"][g_all].sum()),
                "mean_width": float(s["width"][g_all].sum() / s["has"][g_all].sum()),
                "warm_mean_width": float(s["width"][g_warm].sum() / s["has"][g_warm].sum()),
            }
        return out


def run_coldstart(alpha: float, methods: list[str] | None, dev: bool = False, log=print) -> dict:
    """The cold-start case: record each model's forecasts and hand-offs through the engine once, then replay them
    under each method (calibrator, pool, seeds) so every method sees the same forecasts."""
    import torch

    from tidecast.models.registry import make_model
    from tidecast.stream.config import EngineConfig
    from tidecast.stream.engine import Engine, Lane

    torch.set_num_threads(1)  # small models, a shared machine
    horizon = COLDSTART_H
    table = coldstart_methods(horizon, alpha)
    names = [m for m in table if methods is None or m in methods or m in (DEFAULT_CALIBRATOR, "unseeded")]
    wanted = {rec for name in names for rec in table[name][3].values()}
    if not cyclenet_available():
        wanted = {w for w in wanted if not w.startswith("cyclenet")}
    panel = coldstart_panel(COLDSTART_SEEDS["dev" if dev else "scored"])
    batches = panel_batches(panel)
    recorders = {}
    cal, pool, _, _ = table[DEFAULT_CALIBRATOR]
    for key in COLDSTART_MODELS:
        if key not in wanted:
            continue
        model, params = COLDSTART_MODELS[key]
        started = time.perf_counter()
        recorders[key] = _Recorder(make_model(model, horizon=horizon, **params))
        config = EngineConfig(horizon=horizon, alpha=alpha, models=[model], freq="1h")
        engine = Engine(config, [Lane(recorders[key], cal(), horizon, alpha, name=model, pool=pool())])
        for batch in batches:
            engine.process(batch)
        log(f"  coldstart: {key} recorded in {time.perf_counter() - started:.0f} s")
    out = {}
    for name in names:
        cal, pool, seeded, uses = table[name]
        uses = {model: key for model, key in uses.items() if key in recorders}
        started = time.perf_counter()
        config = EngineConfig(horizon=horizon, alpha=alpha, models=list(uses), freq="1h")
        engine = Engine(config, [Lane(_Replayer(recorders[key], seeded), cal(), horizon, alpha, name=model,
                                      pool=pool()) for model, key in uses.items()])
        cov = _Coverage(panel, horizon)
        for batch in batches:
            cov.add(engine.process(batch).forecasts)
        out[name] = cov.result()
        log(f"  coldstart: {name} replayed in {time.perf_counter() - started:.0f} s")
    return out


def print_coldstart(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    hs = ("1", "6", "12", "24")
    table = Table(title=f"coldstart: coverage in the first {EARLY_STEPS} steps (first cohort | late series) and "
                        "over the whole run, by h; widths")
    table.add_column("method / model")
    for h in hs:
        table.add_column(f"early h={h}", justify="right")
    for h in hs:
        table.add_column(f"late h={h}", justify="right")
    table.add_column("whole min-max", justify="right")
    for col in ("no interval", "width", "warm width"):
        table.add_column(col, justify="right")
    for name, by_model in res.items():
        for model, m in by_model.items():
            whole = list(m["coverage_by_h"].values())
            table.add_row(f"{name} / {model}", *[f"{m['early_coverage_by_h'][h]:.3f}" for h in hs],
                          *[f"{m['late_early_coverage_by_h'][h]:.3f}" for h in hs],
                          f"{min(whole):.3f}-{max(whole):.3f}", f"{m['no_interval_share']:.4f}",
                          f"{m['mean_width']:.3f}", f"{m['warm_mean_width']:.3f}")
    Console(width=200).print(table)


def pool_bench(n_series: int = 10_000, n_young: int = 100, horizon: int = 24, steps: int = 30) -> dict:
    """Cost of the lane pool among ``n_series`` seasoned series: the first interval of ``n_young`` new series (the
    lane median is taken then), later intervals while they are young, and intervals of seasoned series."""
    rng = np.random.default_rng(0)
    cal, pool = make_calibrator(DEFAULT_CALIBRATOR, horizon, 0.1), Pool(horizon)
    rows, young = np.arange(n_series), np.arange(n_series, n_series + n_young)
    cal.resize(n_series + n_young)
    for _ in range(pool.n0 + horizon):
        cal.update(rows, rng.normal(size=(n_series, horizon)), np.ones((n_series, horizon), bool))
        pool.observe(rows, rng.normal(size=n_series))
    for _ in range(2):
        pool.observe(young, rng.normal(size=n_young))
    out = {}
    for label, asked, fresh in (("first_ms", young, True), ("young_ms", young, False), ("seasoned_ms", rows, False)):
        means = np.zeros((asked.size, horizon))
        lo, hi = cal.interval(asked, means)
        times = []
        for _ in range(steps):
            if fresh:
                pool.restart(asked)
            s = time.perf_counter()
            pool.interval(cal, asked, means, lo, hi)
            times.append(time.perf_counter() - s)
        out[label] = 1e3 * float(np.median(times))
    return out


# -- choosing the default -------------------------------------------------------------------------
def select_default(cases: dict[str, dict], alpha: float) -> dict[str, dict]:
    """The rule behind DEFAULT_CALIBRATOR: a registry calibrator with default parameters is eligible if its
    coverage is within 0.01 of target in every case, stream and horizon (shift: at least target - 0.015), it never
    emits an infinite interval and costs under 1 ms per step; among those, the lowest interval score relative to
    the case's best (over every method in the table), averaged over cases (etth1: over streams and horizons)."""
    target = 1 - alpha
    per: dict[str, dict[str, list]] = {}
    for case, entry in cases.items():
        if case == "scale":
            continue
        res = entry["methods"]
        best = min(m["interval_score"] for m in res.values())
        for key, m in res.items():
            name = key
            if "by_stream" in m:
                entries = [d for st in m["by_stream"].values() for d in st["by_horizon"].values()]
            else:
                entries = [m]
            for e in entries:
                d = per.setdefault(name, {"rel": [], "ok": []})
                low = target - (0.015 if case == "shift" else 0.01)
                high = target + (1.0 if case == "shift" else 0.01)
                d["ok"].append(low <= e["coverage"] <= high and e["frac_infinite"] == 0 and e["us_per_step"] < 1e3)
                d["rel"].append(e["interval_score"] / best)
    out = {n: {"eligible": all(d["ok"]), "relative_interval_score": float(np.mean(d["rel"]))} for n, d in per.items()}
    # Candidates are registry names with their default parameters; the variants in the tables are ablations.
    eligible = [n for n, d in out.items() if d["eligible"] and n in CALIBRATORS]
    if eligible:
        winner = min(eligible, key=lambda n: out[n]["relative_interval_score"])
        out[winner]["selected"] = True
    return out


# -- printing -----------------------------------------------------------------------------------
COLUMNS = [
    ("coverage", "cov", "{:.3f}"),
    ("mean_width", "width", "{:.3f}"),
    ("median_width", "med w", "{:.3f}"),
    ("interval_score", "int score", "{:.3f}"),
    ("rce_20", "rce20", "{:.3f}"),
    ("rce_100", "rce100", "{:.3f}"),
    ("frac_infinite", "inf", "{:.3f}"),
    ("longest_miss_run", "miss run", "{:.1f}"),
    ("path_length", "path", "{:.1f}"),
    ("us_per_step", "µs/step", "{:.0f}"),
]


def print_table(title: str, res: dict, default: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title)
    table.add_column("method")
    for _, label, _ in COLUMNS:
        table.add_column(label, justify="right")
    for name, m in res.items():
        cells = [fmt.format(m[k]) if np.isfinite(m[k]) else "inf" for k, _, fmt in COLUMNS]
        label = escape(name)  # "[seasonal-naive]" is not rich markup
        label = f"[bold]{label}[/bold] *" if name.split("@")[0].split("[")[0] == default else label
        table.add_row(label, *cells)
    Console(width=160).print(table)


def _has_mapie() -> bool:
    try:
        import mapie  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="all", choices=(*CASES, "scale", "coldstart", "all"))
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--methods", default=None, help="comma-separated subset")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--json-out", default=None, help="also write the JSON report to this file")
    ap.add_argument("--seeds", type=int, default=None, help="use only the first N seeds of each case")
    ap.add_argument("--spci-refit", type=int, default=None, help="SPCI refit_every (the paper: 1)")
    ap.add_argument("--dev", action="store_true", help="coldstart: the development panel (for choosing settings)")
    args = ap.parse_args(argv)
    if args.seeds:
        for case in SEEDS:
            SEEDS[case] = SEEDS[case][: args.seeds]
    if args.spci_refit:
        for params in SPCI_PARAMS.values():
            params["refit_every"] = args.spci_refit
    methods = args.methods.split(",") if args.methods else None
    wants_mapie = args.case not in ("scale", "coldstart") and (
        methods is None or any(m.startswith("mapie") for m in methods))
    if wants_mapie and not _has_mapie():
        print("bench/conformal.py compares against MAPIE, which is in the 'bench' extra: run `make bench` (or "
              "`.venv/bin/pip install -e '.[bench]'`), or leave MAPIE out with --methods "
              f"{','.join(sorted(CALIBRATORS))}", file=sys.stderr)
        return 2
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    if args.case == "coldstart":
        res = run_coldstart(args.alpha, methods, dev=args.dev, log=log)
        report = {"default": DEFAULT_CALIBRATOR, "methods": res}
        if not args.json:
            print_coldstart(res)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(report, indent=1))
        if args.json:
            print(json.dumps(report))
        return 0
    cases = CASES if args.case == "all" else ((args.case,) if args.case != "scale" else ())
    report: dict = {"default": DEFAULT_CALIBRATOR, "alpha": args.alpha, "cases": {}}
    for case in cases:
        res = run_case(case, args.alpha, methods, log)
        if case == "etth1":
            by_h = res
            res = summarise_etth1(res)
        if not args.json:
            title = f"{case}, alpha = {args.alpha}, seeds {list(SEEDS[case])}"
            if case == "ar1":
                title += f", oracle width {AR1_ORACLE_WIDTH:.3f} at alpha = 0.1"
            print_table(title, by_h if case == "etth1" else res, DEFAULT_CALIBRATOR)
            if case == "etth1":
                for k, v in by_h.items():
                    if "whole_stream_coverage_h1_24" in v:
                        print(f"{k}: coverage over the whole stream, h = 1..24, cold start included: "
                              f"{v['whole_stream_coverage_h1_24']:.4f}")
                        break
        report["cases"][case] = {"default": DEFAULT_CALIBRATOR, "methods": res}
    if args.case in ("scale", "all"):
        fast = [n for n in ("conformal-pid", "quantile-tracker", "sf-ogd") if n in CALIBRATORS]
        sc = {n: scale_bench(n) for n in fast}
        sc[DEFAULT_CALIBRATOR + " (rows shuffled)"] = scale_bench(DEFAULT_CALIBRATOR, shuffled=True)
        sc["pool"] = pool_bench()
        report["cases"]["scale"] = {"default": DEFAULT_CALIBRATOR, "methods": sc}
        if not args.json:
            for n, v in sc.items():
                if n == "pool":
                    print(f"10,000 series x 24 horizons, lane pool: {v['first_ms']:.1f} ms for the first interval of "
                          f"100 new series, {v['young_ms']:.2f} ms for later ones while they are young, "
                          f"{v['seasoned_ms']:.2f} ms for the seasoned series")
                    continue
                print(f"10,000 series x 24 horizons, {n}: update {v['update_ms']:.1f} ms + interval "
                      f"{v['interval_ms']:.1f} ms = {v['total_ms']:.1f} ms per step; state {v['state_mb']:.0f} MiB")
    if args.case == "all":
        sel = select_default(report["cases"], args.alpha)
        report["selection"] = sel
        if not args.json:
            print("Selection rule (bench/conformal.py:select_default): a registry calibrator is eligible with "
                  "coverage within 0.01 of target in every case, stream and horizon (shift: >= target - 0.015), "
                  "no infinite interval, < 1 ms/step; rank = interval score / case best, averaged.")
            for n, d in sorted(sel.items(), key=lambda kv: kv[1]["relative_interval_score"]):
                flag = "  <- selected" if d.get("selected") else ""
                print(f"  {n:20s} eligible={str(d['eligible']):5s} relative interval score "
                      f"{d['relative_interval_score']:.3f}{flag}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, default=float, indent=1))
    if args.json:
        if len(report["cases"]) == 1:
            print(json.dumps(next(iter(report["cases"].values())), default=float))
        else:
            print(json.dumps(report, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
