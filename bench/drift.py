"""Residual drift detectors on changes injected at known points: detection rate, delay, false alarms, cost.

Streams (``../shared/data``; one cycle P per data set):

* ``synthetic`` - 4 hourly seasonal series (P = 24: two harmonics, a weekly wave, AR(1) noise, a slow random
  walk), 8,760 steps; the scored set uses seed 0, the dev set seed 1;
* ``etth2`` - the 7 ETTh2 channels (P = 24): rows [8700, 17420) scored, rows [0, 8700) dev;
* ``elec2`` - ELEC2 ``transfer`` (P = 48 half-hours), rows 17760 + [0, 12000) (before row 17760 the column is
  constant);
* ``nab`` - NAB machine temperature (P = 288 five-minute steps), all 22,695 rows.

Each series runs once unchanged and once per injected change (2 positions per kind for each synthetic series, 1
for each ETTh2 channel, 3 for ELEC2 and NAB: 21 changes per kind and model), the changed copies side by side with
it in one engine (:class:`tidecast.stream.engine.Engine`, one lane: ``seasonal-naive`` with the data set's period,
or ``cyclenet`` warm-started on the first 2,000 steps and then frozen - the copies share one backbone, and online
learning would leak one copy's change into the others; measured here, it also took 19 min for one data set). A
change's magnitude is in units of sigma, the standard deviation of the monitored model's own h = 1 residuals over
the 1,000 steps before it, read from the run itself when the engine reaches the change: level shift 3 sigma;
variance x3 (added noise of variance 2 sigma^2); a phase shift of half a cycle; the cycle length halved (time runs
twice as fast); a trend of 0.05 sigma per step; a freeze at the last value; a ramp to 3 sigma over two cycles.
Positions are drawn at random (seeded) after the warm-up, clear of NAB's labelled windows. NAB's rows are taken
as a regular 5-minute grid (the file has one timestamp that steps back).

Every detector sees the same residual streams (``--residual``: the h = 1 forecast's by default), divided by the
same running scale (an exponential mean of |r| over ~1,000 steps before each step, as a calibrator's scale but
slower), plus the h = 1 interval's covered flag (the engine's default conformal calibrator): a changed copy from
1,000 steps before its change to 4 cycles after it; a clean series (synthetic and ETTh2: false alarms; NAB:
alarms inside/outside its labelled windows) from step 2,100 to its end. river's detectors (at river's defaults)
are fed ``|r| / scale`` - on the dev streams that beat the signed residual for ADWIN (0.62 against 0.39 of the
changes detected); D3A the squared one. A detection is the first alarm within 4 cycles after the change;
``median_delay`` is over detected changes, in steps. Every detector resets after an alarm (the engine will reset
a series' detectors when it retrains). ``us_per_obs``: the vectorised detectors' ``update`` alone at 10,000
series in rounds of 10,000 rows, until the engine calls detectors (then: ``Engine.process`` with minus without);
river's, the time in their per-row loop on these streams. ``"bootstrap"`` is null until the label-free bootstrap
monitor lands (:func:`bootstrap_block`).

The default detector's parameters were chosen with ``--dev`` only (synthetic seed 1, ETTh2 rows [0, 8700)): the
configuration with the most abrupt changes detected among those with the fewest false alarms. ETTh2's no-change
streams contain frozen stretches of their own (runs of repeated values: LULL is constant for hundreds of hours,
every channel for 23 hours at a time); the table counts alarms there separately.

Residual runs are cached under bench/.cache/ (numpy arrays; ~2.5 min to compute, ~1.5 min per run after).

    python bench/drift.py            # scored streams, tables
    python bench/drift.py --dev      # the dev streams the defaults were chosen on
    python bench/drift.py --json     # ... and the JSON object last
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tidecast.models.cyclenet import CycleNetForecaster
from tidecast.models.naive import SeasonalNaive
from tidecast.monitors.conformal import DEFAULT_CALIBRATOR, make_calibrator
from tidecast.monitors.drift import DEFAULT_DETECTOR, make_detector
from tidecast.stream.batch import ObservationBatch
from tidecast.stream.config import EngineConfig
from tidecast.stream.engine import Engine, Lane

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not DATA.exists():  # a checkout next to shared/ (CI) or inside the workspace
    DATA = Path("/work/shared/data")
CACHE = Path(__file__).resolve().parent / ".cache"

KINDS = ("level", "variance", "phase", "cycle", "trend", "freeze", "ramp")
ABRUPT = ("level", "variance", "phase", "cycle", "freeze")
MODELS = ("seasonal-naive", "cyclenet")
HORIZON = 24
ALPHA = 0.1
WARM_START = 2000  # CycleNet's fit; seasonal naive is ready after one cycle
DETECT_FROM = 2100  # clean streams are watched from here (both models forecast by then)
PRE = 1000  # a changed copy is watched from this many steps before its change
SIGMA_WINDOW = 1000  # sigma = std of the residuals over this many steps before the change
CYCLES_AFTER = 4  # a detection counts within this many cycles after the change
SCALE_MEMORY = 1000  # steps of the running scale every detector's input is divided by
EPOCH_NS = 1_451_606_400 * 10**9  # 2016-01-01, a Friday: the grid's first timestamp
CACHE_VERSION = "2"


# -- base series ------------------------------------------------------------------------------------------
@dataclass
class Group:
    """Series that share a grid step, a cycle and one model instance; one engine run per model."""

    name: str
    series: list[str]
    values: np.ndarray  # (n_series, T)
    cycle: int
    step: str  # pandas offset of the grid
    false_alarms: bool  # its clean copies count false alarms (synthetic, ETTh2)
    per_kind: int  # change positions per kind and series
    windows: list[tuple[int, int]] = field(default_factory=list)  # labelled anomaly windows (NAB), step ranges

    @property
    def length(self) -> int:
        return self.values.shape[1]


def synthetic(seed: int, n_series: int = 4, length: int = 8760) -> Group:
    """Hourly seasonal series: daily harmonics, a weekly wave, AR(1) noise of unit variance, a slow random walk."""
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    out = np.empty((n_series, length))
    for i in range(n_series):
        a1, a2, weekly = rng.uniform(2, 5), rng.uniform(0.5, 1.5), rng.uniform(0, 1)
        phi = rng.uniform(0.3, 0.8)
        innov = rng.normal(scale=np.sqrt(1 - phi**2), size=length)
        noise = np.zeros(length)
        for k in range(1, length):
            noise[k] = phi * noise[k - 1] + innov[k]
        walk = np.cumsum(rng.normal(scale=0.02, size=length))
        out[i] = (10 + a1 * np.sin(2 * np.pi * t / 24 + rng.uniform(0, 2 * np.pi))
                  + a2 * np.sin(4 * np.pi * t / 24 + rng.uniform(0, 2 * np.pi))
                  + weekly * np.sin(2 * np.pi * t / 168) + noise + walk)
    return Group("synthetic", [f"synthetic{seed}/{i}" for i in range(n_series)], out, 24, "1h", True, 2)


def etth2(dev: bool) -> Group:
    frame = pd.read_csv(DATA / "ETTh2.csv")
    rows = slice(0, 8700) if dev else slice(8700, 17420)
    values = frame.iloc[rows, 1:].to_numpy(float).T
    return Group("etth2", [f"ETTh2/{c}" for c in frame.columns[1:]], values, 24, "1h", True, 1)


def elec2() -> Group:
    values = pd.read_csv(DATA / "elec2.csv")["transfer"].to_numpy(float)[17760 : 17760 + 12000]
    return Group("elec2", ["elec2/transfer"], values[None, :], 48, "30min", False, 3)


def nab() -> Group:
    name = "realKnownCause/machine_temperature_system_failure.csv"
    frame = pd.read_csv(DATA / "nab_machine_temperature_system_failure.csv", parse_dates=["timestamp"])
    stamps = frame["timestamp"].to_numpy()
    windows = []
    for start, end in json.loads((DATA / "nab_combined_windows.json").read_text())[name]:
        lo, hi = np.searchsorted(stamps, np.datetime64(pd.Timestamp(start))), np.searchsorted(
            stamps, np.datetime64(pd.Timestamp(end)), side="right")
        windows.append((int(lo), int(hi)))
    values = frame["value"].to_numpy(float)[None, :]
    return Group("nab", ["nab/machine_temperature"], values, 288, "5min", False, 3, windows)


def groups(dev: bool) -> list[Group]:
    if dev:
        return [synthetic(1), etth2(dev=True)]
    return [synthetic(0), etth2(dev=False), elec2(), nab()]


# -- changes ----------------------------------------------------------------------------------------------
@dataclass
class Change:
    series: int  # index in its group
    kind: str
    at: int  # first changed step


def span(kind: str, cycle: int) -> int:
    """Steps of the base series a change consumes after its position (the halved cycle reads twice as fast)."""
    return CYCLES_AFTER * cycle * (2 if kind == "cycle" else 1)


def place_changes(group: Group, seed: int) -> list[Change]:
    """``per_kind`` random positions per (series, kind), after the warm-up and clear of labelled windows."""
    rng = np.random.default_rng([seed, len(group.name)])
    out = []
    first = DETECT_FROM + PRE
    for i in range(len(group.series)):
        for kind in KINDS:
            last = group.length - span(kind, group.cycle) - 1
            placed = 0
            while placed < group.per_kind:
                at = int(rng.integers(first, last))
                if any(lo - span(kind, group.cycle) <= at <= hi + PRE for lo, hi in group.windows):
                    continue
                out.append(Change(i, kind, at))
                placed += 1
    return out


def inject(kind: str, base: np.ndarray, at: int, sigma: float, cycle: int, rng: np.random.Generator) -> np.ndarray:
    """The values from ``at`` to ``at + CYCLES_AFTER * cycle`` after a change of ``kind`` (sigma: residual std)."""
    n = CYCLES_AFTER * cycle
    j = np.arange(n)
    after = base[at : at + n]
    if kind == "level":
        return after + 3 * sigma
    if kind == "variance":
        return after + rng.normal(scale=np.sqrt(2) * sigma, size=n)
    if kind == "phase":
        return base[at - cycle // 2 : at - cycle // 2 + n]
    if kind == "cycle":
        return base[at + 2 * j]
    if kind == "trend":
        return after + 0.05 * sigma * (j + 1)
    if kind == "freeze":
        return np.full(n, base[at - 1])
    if kind == "ramp":
        return after + 3 * sigma * np.minimum(1.0, (j + 1) / (2 * cycle))
    raise ValueError(kind)


# -- residuals through the engine -------------------------------------------------------------------------
@dataclass
class Run:
    """One model's matured residuals on a group: row i < n_series is series i unchanged, then one row per change."""

    residual: np.ndarray  # (rows, T, H) float32: y[t] - the h-step forecast issued at t - h; NaN if none matured
    covered: np.ndarray  # (rows, T, H) int8: 1 inside that forecast's interval, 0 outside, -1 nothing matured
    sigma: np.ndarray  # (rows,): the h = 1 residual std before the change (NaN for clean rows)
    changes: list[Change]
    seconds: float


def make_model(name: str, cycle: int):
    if name == "seasonal-naive":
        return SeasonalNaive(period=cycle)
    return CycleNetForecaster(horizon=HORIZON, cycle=cycle, warm_start=WARM_START, online=False, defer=False, seed=0)


def run_model(group: Group, model_name: str, changes: list[Change], seed: int) -> Run:
    """Feed every row of the group through one engine lane, injecting each change when the engine reaches it."""
    started = time.perf_counter()
    n_clean, cycle, T = len(group.series), group.cycle, group.length
    n_rows = n_clean + len(changes)
    base_of = np.array(list(range(n_clean)) + [c.series for c in changes])
    end = np.array([T] * n_clean + [c.at + CYCLES_AFTER * cycle for c in changes])
    values = group.values[base_of].copy()
    ids = np.array([f"{group.name}/{i}" for i in range(n_rows)], dtype=object)
    row_of = {sid: i for i, sid in enumerate(ids)}
    step_ns = pd.Timedelta(group.step).value
    lane = Lane(make_model(model_name, cycle), make_calibrator(DEFAULT_CALIBRATOR, HORIZON, ALPHA), HORIZON, ALPHA)
    engine = Engine(EngineConfig(horizon=HORIZON, models=[model_name], freq=group.step), [lane])
    # forecast[row, target tick, h - 1] and its interval, float32 to keep (rows, T, H) small
    mean = np.full((n_rows, T + HORIZON + 1, HORIZON), np.nan, dtype=np.float32)
    lower, upper = mean.copy(), mean.copy()
    residual = np.full((n_rows, T, HORIZON), np.nan, dtype=np.float32)
    covered = np.full((n_rows, T, HORIZON), -1, dtype=np.int8)
    sigma = np.full(n_rows, np.nan)
    rng = np.random.default_rng([seed, 7])
    pending = sorted(range(len(changes)), key=lambda k: changes[k].at)
    chunk = 24
    for lo in range(0, T, chunk):
        hi = min(lo + chunk, T)
        while pending and changes[pending[0]].at < hi:
            k = pending.pop(0)
            c, row = changes[k], n_clean + k
            sigma[row] = np.nanstd(residual[row, max(0, c.at - SIGMA_WINDOW) : lo, 0])
            values[row, c.at : end[row]] = inject(c.kind, group.values[c.series], c.at, sigma[row], cycle, rng)
        active = np.flatnonzero(end > lo)
        ticks = np.arange(lo, hi)
        tick_of, row_idx = np.nonzero(ticks[:, None] < end[active][None, :])
        rows, tk = active[row_idx], ticks[tick_of]
        out = engine.process(ObservationBatch(ids[rows], EPOCH_NS + tk * step_ns, values[rows, tk])).forecasts
        if len(out):
            r = np.array([row_of[s] for s in out.series_id])
            target, h = (out.target_ns - EPOCH_NS) // step_ns, out.h - 1
            mean[r, target, h], lower[r, target, h], upper[r, target, h] = out.mean, out.lower, out.upper
        y = values[rows, tk][:, None]
        residual[rows, tk] = y - mean[rows, tk]
        inside = (y >= lower[rows, tk]) & (y <= upper[rows, tk])
        covered[rows, tk] = np.where(np.isnan(residual[rows, tk]), -1, inside)
    return Run(residual, covered, sigma, changes, time.perf_counter() - started)


def cached_run(group: Group, model_name: str, seed: int, refresh: bool = False) -> Run:
    """:func:`run_model`, kept under bench/.cache/ (arrays only) keyed by everything that shapes the residuals."""
    changes = place_changes(group, seed)
    key = hashlib.sha256(json.dumps([CACHE_VERSION, group.name, group.series, group.cycle, group.step, model_name,
                                     seed, [[c.series, c.kind, c.at] for c in changes], HORIZON, ALPHA,
                                     WARM_START, SIGMA_WINDOW]).encode()
                         + group.values.tobytes()).hexdigest()[:16]
    path = CACHE / f"{group.name}-{model_name}-{key}.npz"
    if path.exists() and not refresh:
        with np.load(path, allow_pickle=False) as z:
            return Run(z["residual"], z["covered"], z["sigma"], changes, float(z["seconds"]))
    run = run_model(group, model_name, changes, seed)
    CACHE.mkdir(exist_ok=True)
    (CACHE / ".gitignore").write_text("*\n")
    np.savez_compressed(path, residual=run.residual, covered=run.covered, sigma=run.sigma, seconds=run.seconds)
    return run


# -- detectors on the residual streams --------------------------------------------------------------------
@dataclass
class Segments:
    """Stretches of residual streams every detector watches, stacked (n, L) and NaN-padded."""

    x: np.ndarray  # residual / running scale
    covered: np.ndarray  # int8, -1 where nothing matured
    model: np.ndarray  # str
    group: np.ndarray  # str
    kind: np.ndarray  # str: the injected change, or "none" for a clean stream
    change: np.ndarray  # offset of the change in the segment (-1: none)
    cycle: np.ndarray
    start: np.ndarray  # the segment's first step in its stream
    counts_false: np.ndarray  # bool: a clean stream whose alarms are false alarms
    windows: list[list[tuple[int, int]]]  # labelled windows, in segment offsets (NAB)
    frozen: np.ndarray  # bool (n, L): a clean stream's own frozen stretch (or up to 2 cycles after one)


def running_scale(residual: np.ndarray, memory: int = SCALE_MEMORY) -> np.ndarray:
    """Per row, the exponential mean of |r| over ~``memory`` steps *before* each step (NaN until one is seen)."""
    rows, T = residual.shape
    out = np.full((rows, T), np.nan)
    level = np.zeros(rows)
    n = np.zeros(rows)
    for t in range(T):
        out[:, t] = np.where(n > 0, level, np.nan)
        r = residual[:, t]
        ok = np.isfinite(r)
        n = n + ok
        rate = np.where(ok, np.maximum(1.0 / np.maximum(n, 1.0), 1.0 / memory), 0.0)
        level = level + rate * (np.abs(np.where(ok, r, 0.0)) - level)
    return out


def signal(run: Run, horizon: str) -> tuple[np.ndarray, np.ndarray]:
    """The residual stream detectors watch, (rows, T), and its covered flags: ``"1"`` the h = 1 forecast's,
    ``"H"`` the h = H one's, ``"mean"`` the mean over every horizon that matured at that step (covered: h = 1)."""
    if horizon == "mean":
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            r = np.nanmean(run.residual, axis=2)
        return r.astype(float), run.covered[:, :, 0]
    h = HORIZON - 1 if horizon == "H" else int(horizon) - 1
    return run.residual[:, :, h].astype(float), run.covered[:, :, h]


def frozen_stretches(values: np.ndarray, cycle: int, min_run: int = 5) -> np.ndarray:
    """Steps inside a run of >= ``min_run`` repeated values, or up to 2 cycles after one (ETTh2 has many)."""
    out = np.zeros(values.size, dtype=bool)
    same = np.r_[False, values[1:] == values[:-1]]
    run = 0
    for t, s in enumerate(same.tolist()):
        run = run + 1 if s else 0
        if run >= min_run:
            out[t - run : t + 2 * cycle] = True
    return out


def segments(runs: list[tuple[Group, str, Run]], horizon: str = "1") -> Segments:
    parts: list[dict] = []
    for group, model_name, run in runs:
        residual, covered = signal(run, horizon)
        with np.errstate(divide="ignore", invalid="ignore"):  # a zero scale (constant start) gives inf: skipped
            x_all = residual / running_scale(residual)
        n_clean = len(group.series)
        for row in range(residual.shape[0]):
            if row < n_clean:
                lo, hi, kind, change = DETECT_FROM, group.length, "none", -1
            else:
                c = run.changes[row - n_clean]
                lo, hi, kind, change = c.at - PRE, c.at + CYCLES_AFTER * group.cycle, c.kind, PRE
            parts.append(dict(x=x_all[row, lo:hi], covered=covered[row, lo:hi], model=model_name,
                              group=group.name, kind=kind, change=change, cycle=group.cycle, start=lo,
                              counts_false=row < n_clean and group.false_alarms,
                              windows=[(a - lo, b - lo) for a, b in group.windows] if row < n_clean else [],
                              frozen=frozen_stretches(group.values[row], group.cycle)[lo:hi] if row < n_clean
                              else np.zeros(hi - lo, bool)))
    width = max(p["x"].size for p in parts)
    x = np.full((len(parts), width), np.nan)
    cov = np.full((len(parts), width), -1, dtype=np.int8)
    frozen = np.zeros((len(parts), width), dtype=bool)
    for i, p in enumerate(parts):
        x[i, : p["x"].size], cov[i, : p["x"].size], frozen[i, : p["x"].size] = p["x"], p["covered"], p["frozen"]
    col = {k: np.array([p[k] for p in parts]) for k in ("model", "group", "kind", "change", "cycle", "start",
                                                          "counts_false")}
    return Segments(x, cov, windows=[p["windows"] for p in parts], frozen=frozen, **col)


def watch(detector, seg: Segments) -> tuple[list[list[int]], list[list[str]], float, int]:
    """Run ``detector`` over every segment (rows = segments) step by step; alarms per segment, time, updates."""
    alarms: list[list[int]] = [[] for _ in range(len(seg.x))]
    kinds: list[list[str]] = [[] for _ in range(len(seg.x))]
    detector.resize(len(seg.x))
    spent, n_obs = 0.0, 0
    for j in range(seg.x.shape[1]):
        col = seg.x[:, j]
        rows = np.flatnonzero(np.isfinite(col))
        if not rows.size:
            continue
        started = time.perf_counter()
        out = detector.update(rows, col[rows], covered=seg.covered[rows, j] == 1)
        spent += time.perf_counter() - started
        n_obs += rows.size
        for r, k in zip(out.rows.tolist(), out.kind.tolist(), strict=True):
            alarms[r].append(j)
            kinds[r].append(k)
    return alarms, kinds, spent, n_obs


@dataclass
class Outcome:
    delay: np.ndarray  # per segment with a change: steps from the change to the first alarm in the window, or -1
    false_alarms: int
    false_obs: int
    false_unfrozen: int  # false alarms outside the clean streams' own frozen stretches
    nab_in: int
    nab_out: int
    first_kind: list[str]  # the alarm kind that detected each change ("" if missed)
    us_per_obs: float
    alarm_times: list[list[int]]  # per segment, offsets of every alarm


def score(seg: Segments, alarms: list[list[int]], kinds: list[list[str]], spent: float, n_obs: int) -> Outcome:
    delay = np.full(len(seg.x), -1)
    first_kind = [""] * len(seg.x)
    false_alarms = false_obs = false_unfrozen = nab_in = nab_out = 0
    for i, times in enumerate(alarms):
        c = seg.change[i]
        if c >= 0:
            hits = [(t, k) for t, k in zip(times, kinds[i], strict=True)
                    if c <= t < c + CYCLES_AFTER * seg.cycle[i]]
            if hits:
                delay[i], first_kind[i] = hits[0][0] - c, hits[0][1]
        elif seg.counts_false[i]:
            false_alarms += len(times)
            false_unfrozen += sum(not seg.frozen[i, t] for t in times)
            false_obs += int(np.isfinite(seg.x[i]).sum())
        if seg.windows[i]:
            inside = sum(any(lo <= t < hi for lo, hi in seg.windows[i]) for t in times)
            nab_in += inside
            nab_out += len(times) - inside
    us = 1e6 * spent / max(n_obs, 1)
    return Outcome(delay, false_alarms, false_obs, false_unfrozen, nab_in, nab_out, first_kind, us, alarms)


# -- the benchmark ----------------------------------------------------------------------------------------
DETECTOR_NAMES = (DEFAULT_DETECTOR, "river-adwin", "river-pagehinkley", "river-kswin", "d3a")
#: Not in the JSON: the default detector without whitening, to show what autocorrelation does to a raw CUSUM.
RAW = f"{DEFAULT_DETECTOR} (no whitening)"


def vectorised_cost(name: str, n_series: int = 10_000, rounds: int = 200, warm: int = 100) -> float:
    """Microseconds per observation of ``update`` at ``n_series`` rows, in rounds of every row (after warm-up).

    Until the engine calls detectors this is the detector's own cost; the engine measurement (``Engine.process``
    with minus without the detector) replaces it at integration.
    """
    rng = np.random.default_rng(0)
    detector = make_detector(name)
    rows = np.arange(n_series)
    residuals = rng.normal(size=(warm + rounds, n_series))
    covered = np.abs(residuals) < 1.645
    for t in range(warm):
        detector.update(rows, residuals[t], covered[t])
    started = time.perf_counter()
    for t in range(warm, warm + rounds):
        detector.update(rows, residuals[t], covered[t])
    return 1e6 * (time.perf_counter() - started) / (rounds * n_series)


def bootstrap_block() -> dict | None:
    """Hook for the label-free bootstrap monitor (issue 12, built separately): CycleNet's ``spearman_error``,
    ``spearman_width``, ``lead_steps``, ``forecast_cost_ratio`` and ``train_cost_ratio``. None until then."""
    return None


def median_or_none(values: np.ndarray) -> float | None:
    return float(np.median(values)) if len(values) else None


def summarise(seg: Segments, outcomes: dict[str, Outcome]) -> dict:
    changed = seg.change >= 0
    out: dict = {"default": DEFAULT_DETECTOR, "detectors": {}, "by_kind": {}, "bootstrap": bootstrap_block(),
                 "nab": {}}
    for name in DETECTOR_NAMES:
        o = outcomes[name]
        hit = changed & (o.delay >= 0)
        out["detectors"][name] = {
            "detection_rate": float(hit.sum() / changed.sum()),
            "median_delay": median_or_none(o.delay[hit]),
            "false_alarms_per_10k": 1e4 * o.false_alarms / max(o.false_obs, 1),
            "us_per_obs": o.us_per_obs,
        }
        out["nab"][name] = {"in_window": o.nab_in, "outside": o.nab_out}
    for kind in KINDS:
        out["by_kind"][kind] = {}
        for name in DETECTOR_NAMES:
            o = outcomes[name]
            sel = changed & (seg.kind == kind)
            hit = sel & (o.delay >= 0)
            out["by_kind"][kind][name] = {"detection_rate": float(hit.sum() / sel.sum()),
                                          "median_delay": median_or_none(o.delay[hit])}
    return out


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def report(seg: Segments, outcomes: dict[str, Outcome], summary: dict, dev: bool, console) -> list[str]:
    """Print the tables; return the done-when lines (also printed)."""
    from rich.table import Table

    changed = seg.change >= 0
    names = [*DETECTOR_NAMES, RAW]
    title = "dev streams (synthetic seed 1, ETTh2 rows < 8700)" if dev else "scored streams"
    table = Table(title=f"drift detectors - {title}: {int(changed.sum())} changes, "
                        f"{outcomes[DEFAULT_DETECTOR].false_obs:,} no-change steps")
    for col in ("detector", "detected", "worst abrupt", "median delay (steps)", "(cycles)", "false alarms /10k",
                "... outside frozen data", "us/obs"):
        table.add_column(col, justify="left" if col == "detector" else "right")
    for name in names:
        o = outcomes[name]
        hit = changed & (o.delay >= 0)
        worst = min((o.delay[changed & (seg.kind == k)] >= 0).mean() for k in ABRUPT)
        table.add_row(name, f"{hit.sum() / changed.sum():.2f}", f"{worst:.2f}",
                      fmt(median_or_none(o.delay[hit]), ".0f"), fmt(median_or_none(o.delay[hit] / seg.cycle[hit])),
                      f"{1e4 * o.false_alarms / max(o.false_obs, 1):.1f}",
                      f"{1e4 * o.false_unfrozen / max(o.false_obs, 1):.1f}", f"{o.us_per_obs:.2f}")
    console.print(table)

    kinds = Table(title="detection rate / median delay in cycles, by kind of change (and by model)")
    kinds.add_column("kind")
    for name in names:
        kinds.add_column(name, justify="right")
    for kind in KINDS:
        for model in ("all", *MODELS):
            sel = changed & (seg.kind == kind) & ((seg.model == model) if model != "all" else True)
            cells = []
            for name in names:
                d = outcomes[name].delay[sel]
                hit = d >= 0
                cells.append(f"{hit.mean():.2f} / {fmt(median_or_none(d[hit] / seg.cycle[sel][hit]))}")
            kinds.add_row(kind if model == "all" else f"  {model}", *cells)
    console.print(kinds)

    fa = Table(title="false alarms on the no-change streams (count, of which on the streams' own frozen data)")
    fa.add_column("stream")
    for name in names:
        fa.add_column(name, justify="right")
    for group in dict.fromkeys(seg.group[seg.counts_false].tolist()):
        for model in MODELS:
            sel = np.flatnonzero((seg.change < 0) & seg.counts_false & (seg.group == group) & (seg.model == model))
            cells = []
            for name in names:
                o = outcomes[name]
                times = [(i, t) for i in sel for t in o.alarm_times[i]]
                cells.append(f"{len(times)} ({sum(seg.frozen[i, t] for i, t in times)})")
            fa.add_row(f"{group} / {model}", *cells)
    console.print(fa)

    nab = Table(title="NAB machine temperature, no injected change: alarms inside / outside the 4 labelled windows")
    for col in ("detector", "inside", "outside", "windows hit"):
        nab.add_column(col, justify="left" if col == "detector" else "right")
    for name in names:
        o = outcomes[name]
        hit_windows = {(i, w) for i in range(len(seg.x)) for w, (lo, hi) in enumerate(seg.windows[i])
                       for t in o.alarm_times[i] if lo <= t < hi}
        n_windows = sum(len(w) for w in seg.windows)
        nab.add_row(name, str(o.nab_in), str(o.nab_out), f"{len(hit_windows)} of {n_windows} (both models)")
    if any(seg.windows):
        console.print(nab)

    # the comparison with ADWIN is on the changes both detect
    ours, adwin = outcomes[DEFAULT_DETECTOR].delay, outcomes["river-adwin"].delay
    both = changed & (ours >= 0) & (adwin >= 0)
    med_ours, med_adwin = median_or_none(ours[both]), median_or_none(adwin[both])
    shorter = 1 - med_ours / med_adwin if med_ours is not None and med_adwin else None
    d = summary["detectors"][DEFAULT_DETECTOR]
    hit = changed & (ours >= 0)
    delay_cycles = median_or_none(ours[hit] / seg.cycle[hit])
    worst = {k: summary["by_kind"][k][DEFAULT_DETECTOR]["detection_rate"] for k in ABRUPT}
    lines = [
        f"detection >= 0.95 on every abrupt kind: {' '.join(f'{k} {v:.2f}' for k, v in worst.items())} -> "
        f"{'holds' if min(worst.values()) >= 0.95 else 'does not hold'}",
        f"median delay <= 1 cycle: {fmt(delay_cycles)} cycles -> "
        f"{'holds' if delay_cycles is not None and delay_cycles <= 1 else 'does not hold'}",
        f"median delay vs river-adwin on the {int(both.sum())} changes both detect: {fmt(med_ours, '.0f')} vs "
        f"{fmt(med_adwin, '.0f')} steps, {fmt(None if shorter is None else 100 * shorter, '.0f')} % shorter "
        f"(>= 30 %) -> "
        f"{'holds' if shorter is not None and shorter >= 0.3 else 'does not hold'}",
        f"false alarms <= 1 per 10k: {d['false_alarms_per_10k']:.1f} -> "
        f"{'holds' if d['false_alarms_per_10k'] <= 1 else 'does not hold'}",
        f"cost <= 2 us/obs at 10,000 series: {d['us_per_obs']:.3f} (update alone, not yet through Engine.process) -> "
        f"{'holds' if d['us_per_obs'] <= 2 else 'does not hold'}",
    ]
    watchers = {k: outcomes[DEFAULT_DETECTOR].first_kind.count(k) for k in ("mean", "variance", "coverage")}
    by_watcher = ", ".join(f"{k} watcher {v}" for k, v in watchers.items())
    console.print(f"{DEFAULT_DETECTOR}: changes first detected by its {by_watcher}")
    console.print("[bold]done-when, default detector[/bold]")
    for line in lines:
        console.print("  " + line)
    console.print("us/obs: cusum and d3a at 10,000 series in rounds of 10,000 rows (update alone); river's per "
                  "observation on these streams, in their Python loop.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev", action="store_true", help="the dev streams (synthetic seed 1, ETTh2 rows < 8700)")
    parser.add_argument("--refresh", action="store_true", help="recompute the cached residuals")
    parser.add_argument("--json", action="store_true", help="print the JSON object last")
    parser.add_argument("--residual", default="1", choices=("1", "H", "mean"),
                        help="what detectors watch: the h = 1 residual (default, what the engine will pass), the "
                             "h = H one, or the mean over the horizons that matured at each step")
    args = parser.parse_args()
    from rich.console import Console

    console = Console(width=160, stderr=args.json)
    seed = 1 if args.dev else 0
    runs = []
    for group in groups(args.dev):
        for model_name in MODELS:
            run = cached_run(group, model_name, seed, args.refresh)
            runs.append((group, model_name, run))
            console.print(f"residuals: {group.name} / {model_name}: {run.residual.shape[0]} streams "
                          f"({run.seconds:.0f} s when computed)")
    seg = segments(runs, args.residual)
    outcomes: dict[str, Outcome] = {}
    for name in (*DETECTOR_NAMES, RAW):
        started = time.perf_counter()
        detector = make_detector(DEFAULT_DETECTOR, whiten=False) if name == RAW else make_detector(name)
        outcomes[name] = score(seg, *watch(detector, seg))
        if not name.startswith("river-"):
            outcomes[name].us_per_obs = vectorised_cost(DEFAULT_DETECTOR if name == RAW else name)
        console.print(f"{name}: {time.perf_counter() - started:.0f} s")
    summary = summarise(seg, outcomes)
    report(seg, outcomes, summary, args.dev, console)
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
