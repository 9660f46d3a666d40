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

Every detector sees the same residual streams (``--residual``), those the engine's drift monitor watches by
default: at each step, every horizon's residual that matured then, each divided by its own running mean |r|
(~1,000 steps, before the step), averaged (``mean``, :class:`tidecast.monitors.drift.HorizonPool`); ``1`` / ``H``
take the h = 1 / h = H residual over its running scale instead. With it come the h = 1 interval's covered flag (the
engine's default conformal calibrator) and the observed value (for the freeze watcher; river's and D3A ignore
both). A changed copy is watched from 1,000 steps before its change to 4 cycles after it; a clean series
(synthetic and ETTh2: false alarms; NAB: alarms inside/outside its labelled windows) from step 2,100 to its end.
river's detectors (at river's defaults) are fed ``|x|`` - on the dev streams that beat the signed residual for
ADWIN (0.62 against 0.39 of the changes detected, h = 1); D3A its square. A detection is the first alarm within 4
cycles after the change; ``median_delay`` is over detected changes, in steps. Every detector resets after an
alarm. ``us_per_obs``: every detector through :meth:`Engine.process` at 10,000 series (seasonal naive,
H = 24), with the drift monitor minus without it, per observation (river's in the engine's drift monitor too,
added by hand: they are references, not a setting, since their state cannot be checkpointed without pickles).
``"bootstrap"``: CycleNet's label-free bootstrap watcher on the same changed streams (bench/drift_bootstrap.py:
how its score and the conformal width rank the realised error, how far its alarm leads the default detector's on
the kinds that move inputs out of range, and what 8 replicas cost); ``--bootstrap-only`` computes just that block.

False alarms are counted three ways. ``false_alarms_per_10k``: every alarm on the no-change streams, as the issue
defines it. ``..._freeze_rule``: ETTh2's no-change streams hold real sensor freezes (every channel constant for 23 h
at a time, MUFL for 1,025 h), and a freeze is a change; the rule, fixed from the data (run lengths, repeat shares)
before detectors were scored against it, leaves out the steps inside a run of >= 6 identical values and the 4
cycles after it (the window a detection of an injected change gets), and the channels that repeat their previous
value at >= 1/3 of steps (coarsely quantised, not frozen: LUFL and LULL in the dev rows, HULL and LULL in the
scored ones). ``..._synthetic`` and ``..._etth2_freeze_rule`` split it: the synthetic streams are the only ones
known to hold no change at all; ETTh2's hold genuine events (load steps of the whole transformer: the report counts
alarms that coincide on >= 3 channels).

The default detector's parameters were chosen with ``--dev`` only (synthetic seed 1, ETTh2 rows [0, 8700)):
thresholds as the first version had them, except the level threshold raised from 16 to 18, the smallest step that
brought the dev synthetic streams to <= 1 false alarm per 10,000 steps (6 -> 5 alarms in 53,000 steps). The
trade-off table reruns the default with every threshold scaled; bench/drift_variants.py measures what was tried
and not kept (on the dev streams).

Residual runs (and the bootstrap block's runs) are cached under bench/.cache/ (numpy arrays; a few minutes to
compute, then the detectors, the trade-off table and the engine cost take ~5 min), keyed by their inputs and by the
source of models/, monitors/ and stream/: a change to the code that made them recomputes them (``--refresh``
always does).

    python bench/drift.py            # scored streams, tables
    python bench/drift.py --dev      # the dev streams the defaults were chosen on
    python bench/drift.py --json     # ... and the JSON object last
    python bench/drift.py --dev --bootstrap-only --bootstrap-groups synthetic   # the bootstrap block alone
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tidecast.models.cyclenet import CycleNetForecaster
from tidecast.models.naive import SeasonalNaive
from tidecast.monitors.conformal import DEFAULT_CALIBRATOR, make_calibrator
from tidecast.monitors.drift import DEFAULT_DETECTOR, DriftMonitor, HorizonPool, make_detector
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
CACHE_VERSION = "3"
#: the project's folders whose code shapes a cached run (the models, the calibrators and monitors, the engine):
#: their source is part of every cache key, so a table is never built from the residuals of older code
SOURCE_DIRS = ("models", "monitors", "stream")


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
    values: np.ndarray  # (rows, T) float: what the engine observed (the base series with the change injected)
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
    return Run(residual, covered, values, sigma, changes, time.perf_counter() - started)


@functools.cache
def source_fingerprint() -> str:
    """A digest of the project's source in :data:`SOURCE_DIRS` (paths and contents): part of every cache key."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for folder in SOURCE_DIRS:
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def cached_run(group: Group, model_name: str, seed: int, refresh: bool = False) -> Run:
    """:func:`run_model`, kept under bench/.cache/ (arrays only) keyed by everything that shapes the residuals,
    the project's source included (:func:`source_fingerprint`)."""
    changes = place_changes(group, seed)
    shape = [CACHE_VERSION, source_fingerprint(), group.name, group.series, group.cycle, group.step, model_name,
             seed, [[c.series, c.kind, c.at] for c in changes], HORIZON, ALPHA, WARM_START, SIGMA_WINDOW]
    key = hashlib.sha256(json.dumps(shape).encode() + group.values.tobytes()).hexdigest()[:16]
    path = CACHE / f"{group.name}-{model_name}-{key}.npz"
    if path.exists() and not refresh:
        with np.load(path, allow_pickle=False) as z:
            return Run(z["residual"], z["covered"], z["values"], z["sigma"], changes, float(z["seconds"]))
    run = run_model(group, model_name, changes, seed)
    CACHE.mkdir(exist_ok=True)
    (CACHE / ".gitignore").write_text("*\n")
    np.savez_compressed(path, residual=run.residual, covered=run.covered, values=run.values, sigma=run.sigma,
                        seconds=run.seconds)
    return run


# -- detectors on the residual streams --------------------------------------------------------------------
@dataclass
class Segments:
    """Stretches of residual streams every detector watches, stacked (n, L) and NaN-padded."""

    x: np.ndarray  # the watched residual stream (see signal())
    covered: np.ndarray  # int8, -1 where nothing matured
    values: np.ndarray  # what the engine observed
    model: np.ndarray  # str
    group: np.ndarray  # str
    kind: np.ndarray  # str: the injected change, or "none" for a clean stream
    change: np.ndarray  # offset of the change in the segment (-1: none)
    cycle: np.ndarray
    start: np.ndarray  # the segment's first step in its stream
    series: np.ndarray  # index of the base series in its group
    counts_false: np.ndarray  # bool: a clean stream whose alarms are false alarms
    quantised: np.ndarray  # bool: a clean stream whose values repeat so often that the freeze rule leaves it out
    excluded: np.ndarray  # bool (n, L): a clean stream's own freeze, or up to CYCLES_AFTER cycles after it
    windows: list[list[tuple[int, int]]]  # labelled windows, in segment offsets (NAB)


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
    """The stream detectors watch, (rows, T), and the covered flags that go with it.

    ``"mean"`` (the default, what the engine's drift monitor watches): every horizon that matured at a step, each
    divided by its own running mean |r|, averaged (:class:`tidecast.monitors.drift.HorizonPool`), with the h = 1
    interval's flags. ``"1"`` / ``"H"``: the h = 1 / h = H residual divided by its running scale."""
    if horizon == "mean":
        pool = HorizonPool(HORIZON, SCALE_MEMORY)
        rows = np.arange(run.residual.shape[0])
        x = np.empty(run.residual.shape[:2])
        for t in range(x.shape[1]):
            x[:, t] = pool.pool(rows, run.residual[:, t, :])
        return x, run.covered[:, :, 0]
    h = HORIZON - 1 if horizon == "H" else int(horizon) - 1
    r = run.residual[:, :, h].astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero scale (constant start) gives inf: skipped
        return r / running_scale(r), run.covered[:, :, h]


# The freeze rule for the no-change streams, fixed from the data (run lengths, repeat shares) before detectors were
# scored against it: a frozen sensor is a change, so a clean stream's own freezes are not a no-change stretch.
FREEZE_RUN = 6  # identical consecutive values that make a freeze
QUANTISED_SHARE = 1 / 3  # a channel repeating its previous value this often is quantised, not frozen: left out


def freeze_rule(values: np.ndarray, cycle: int) -> np.ndarray:
    """Steps inside a run of >= FREEZE_RUN identical values, or within CYCLES_AFTER cycles after its end (the
    window a detection of an injected change gets)."""
    out = np.zeros(values.size, dtype=bool)
    same = np.r_[False, values[1:] == values[:-1]]
    starts = np.flatnonzero(np.diff(np.r_[0, same.astype(np.int8)]) == 1)  # first repeat of each run
    ends = np.flatnonzero(np.diff(np.r_[same.astype(np.int8), 0]) == -1)  # last repeat
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        if b - a + 2 >= FREEZE_RUN:  # b - a + 1 repeats of the value at a - 1
            out[a - 1 : b + 1 + CYCLES_AFTER * cycle] = True
    return out


def quantised(values: np.ndarray) -> bool:
    return bool(np.mean(values[1:] == values[:-1]) >= QUANTISED_SHARE)


def segments(runs: list[tuple[Group, str, Run]], horizon: str = "mean") -> Segments:
    parts: list[dict] = []
    for group, model_name, run in runs:
        x_all, covered = signal(run, horizon)
        n_clean = len(group.series)
        for row in range(x_all.shape[0]):
            if row < n_clean:
                lo, hi, kind, change, series = DETECT_FROM, group.length, "none", -1, row
            else:
                c = run.changes[row - n_clean]
                lo, hi, kind, change, series = c.at - PRE, c.at + CYCLES_AFTER * group.cycle, c.kind, PRE, c.series
            clean = row < n_clean
            parts.append(dict(x=x_all[row, lo:hi], covered=covered[row, lo:hi], values=run.values[row, lo:hi],
                              model=model_name, group=group.name, kind=kind, change=change, cycle=group.cycle,
                              start=lo, series=series, counts_false=clean and group.false_alarms,
                              quantised=clean and group.false_alarms and quantised(group.values[row]),
                              excluded=freeze_rule(group.values[row], group.cycle)[lo:hi] if clean
                              else np.zeros(hi - lo, bool),
                              windows=[(a - lo, b - lo) for a, b in group.windows] if clean else []))
    width = max(p["x"].size for p in parts)
    x, values = np.full((len(parts), width), np.nan), np.full((len(parts), width), np.nan)
    cov = np.full((len(parts), width), -1, dtype=np.int8)
    excluded = np.zeros((len(parts), width), dtype=bool)
    for i, p in enumerate(parts):
        n = p["x"].size
        x[i, :n], cov[i, :n], values[i, :n], excluded[i, :n] = p["x"], p["covered"], p["values"], p["excluded"]
    col = {k: np.array([p[k] for p in parts]) for k in ("model", "group", "kind", "change", "cycle", "start",
                                                          "series", "counts_false", "quantised")}
    return Segments(x, cov, values, excluded=excluded, windows=[p["windows"] for p in parts], **col)


def watch(detector, seg: Segments) -> tuple[list[list[int]], list[list[str]], float, int]:
    """Run ``detector`` over every segment (rows = segments) step by step; alarms per segment, time, updates."""
    alarms: list[list[int]] = [[] for _ in range(len(seg.x))]
    kinds: list[list[str]] = [[] for _ in range(len(seg.x))]
    detector.resize(len(seg.x))
    spent, n_obs = 0.0, 0
    for j in range(seg.x.shape[1]):
        col = seg.x[:, j]
        rows = np.flatnonzero(np.isfinite(col) | np.isfinite(seg.values[:, j]))
        if not rows.size:
            continue
        covered = np.where(seg.covered[rows, j] < 0, np.nan, seg.covered[rows, j])
        started = time.perf_counter()
        out = detector.update(rows, col[rows], covered=covered, values=seg.values[rows, j])
        spent += time.perf_counter() - started
        n_obs += rows.size
        for r, k in zip(out.rows.tolist(), out.kind.tolist(), strict=True):
            alarms[r].append(j)
            kinds[r].append(k)
    return alarms, kinds, spent, n_obs


@dataclass
class Outcome:
    delay: np.ndarray  # per segment with a change: steps from the change to the first alarm in the window, or -1
    first_kind: list[str]  # the alarm kind that detected each change ("" if missed)
    alarm_times: list[list[int]]  # per segment, offsets of every alarm
    us_per_obs: float


def score(seg: Segments, alarms: list[list[int]], kinds: list[list[str]], spent: float, n_obs: int) -> Outcome:
    delay = np.full(len(seg.x), -1)
    first_kind = [""] * len(seg.x)
    for i, times in enumerate(alarms):
        c = seg.change[i]
        if c >= 0:
            hits = [(t, k) for t, k in zip(times, kinds[i], strict=True)
                    if c <= t < c + CYCLES_AFTER * seg.cycle[i]]
            if hits:
                delay[i], first_kind[i] = hits[0][0] - c, hits[0][1]
    return Outcome(delay, first_kind, alarms, 1e6 * spent / max(n_obs, 1))


def false_alarms(seg: Segments, alarm_times: list[list[int]]) -> dict[str, dict[str, float]]:
    """Alarms on the no-change streams: ``{"all"|"rule"|"synthetic"|"etth2"|"etth2_rule": {count, steps, per_10k}}``.

    ``rule``: the freeze rule applied (a stream's own freezes and the CYCLES_AFTER cycles after them excluded,
    quantised channels left out)."""
    out = {k: {"count": 0, "steps": 0} for k in ("all", "rule", "synthetic", "etth2", "etth2_rule")}
    for i in np.flatnonzero((seg.change < 0) & seg.counts_false).tolist():
        observed = np.isfinite(seg.x[i])
        times = np.array(alarm_times[i], dtype=np.int64)
        kept = observed & ~seg.excluded[i]
        n_kept = 0 if seg.quantised[i] else int(np.sum(~seg.excluded[i][times]))
        counts = {"all": (len(times), int(observed.sum())),
                  "rule": (n_kept, 0 if seg.quantised[i] else int(kept.sum()))}
        counts[str(seg.group[i])] = counts["all"]
        if seg.group[i] == "etth2":
            counts["etth2_rule"] = counts["rule"]
        for key, (count, steps) in counts.items():
            out[key]["count"] += count
            out[key]["steps"] += steps
    for v in out.values():
        v["per_10k"] = 1e4 * v["count"] / max(v["steps"], 1)
    return out


def coincident(seg: Segments, alarm_times: list[list[int]], within: int = 2, channels: int = 3) -> tuple[int, int]:
    """ETTh2 false alarms (freeze rule applied) and how many of them fall within ``within`` steps of alarms on
    at least ``channels - 1`` other ETTh2 channels under the same model: events of the whole transformer."""
    total = together = 0
    for model in MODELS:
        rows = np.flatnonzero((seg.change < 0) & (seg.group == "etth2") & (seg.model == model) & ~seg.quantised)
        stamps = {int(seg.series[i]): np.array([seg.start[i] + t for t in alarm_times[i]
                                                 if not seg.excluded[i, t]], dtype=np.int64) for i in rows}
        for s, times in stamps.items():
            for t in times.tolist():
                total += 1
                others = sum(bool(np.any(np.abs(o - t) <= within)) for k, o in stamps.items() if k != s)
                together += others >= channels - 1
    return total, together


def nab_counts(seg: Segments, alarm_times: list[list[int]]) -> tuple[int, int, int, int]:
    """NAB: alarms inside / outside its labelled windows, windows hit, windows."""
    inside = outside = 0
    hit: set[tuple[int, int]] = set()
    for i, windows in enumerate(seg.windows):
        for t in alarm_times[i]:
            w = [k for k, (lo, hi) in enumerate(windows) if lo <= t < hi]
            inside += bool(w)
            outside += not w
            hit.update((i, k) for k in w)
    return inside, outside, len(hit), sum(len(w) for w in seg.windows)


# -- the benchmark ----------------------------------------------------------------------------------------
DETECTOR_NAMES = (DEFAULT_DETECTOR, "river-adwin", "river-pagehinkley", "river-kswin", "d3a")
#: Not in the JSON: the default detector without whitening, to show what autocorrelation does to a raw CUSUM.
RAW = f"{DEFAULT_DETECTOR} (no whitening)"
#: Threshold factors of the default detector's trade-off table (1 = its defaults).
FACTORS = (0.75, 1.0, 1.5, 2.0, 3.0)


def scaled(factor: float) -> dict[str, float]:
    """The default detector's parameters with every threshold multiplied by ``factor`` (the freeze tail raised
    to that power: its threshold is on a log-probability)."""
    detector = make_detector(DEFAULT_DETECTOR)
    params = detector.get_params()
    out = {k: params[k] * factor for k in ("h", "variance_h", "collapse_h", "coverage_h")}
    out["freeze_tail"] = params["freeze_tail"] ** factor
    return out


def engine_cost(name: str, n_series: int = 10_000, rounds: int = 60, warm: int = 60) -> float:
    """Microseconds per observation that detector ``name`` adds to :meth:`Engine.process` at ``n_series`` series.

    Two engines (seasonal naive, H = 24, hourly grid), one with the drift monitor and one without, process the same
    rounds of one observation per series (random walks), in alternating order; the difference of their median
    round times, per observation, after ``warm`` rounds (forecasts mature and the detector is past its warm-up).
    """
    rng = np.random.default_rng(0)
    ids = np.array([f"s{i}" for i in range(n_series)], dtype=object)
    values = rng.normal(size=(warm + rounds, n_series)).cumsum(axis=0)
    step = pd.Timedelta("1h").value
    engines = {}
    for detector in ("none", name):
        river = detector.startswith("river-")
        config = EngineConfig(horizon=HORIZON, models=["seasonal-naive"], freq="1h",
                              drift_detector="none" if river else detector,
                              model_params={"seasonal-naive": {"period": 24}})
        engines[detector] = Engine.from_config(config)
        if river:  # not a setting (river's objects cannot be checkpointed without pickles): the engine's own
            # drift monitor around them, added after the engine has taken its blank row's state
            lane = engines[detector].lanes[0]
            lane.monitors.append(DriftMonitor(make_detector(detector), HORIZON))
            lane.resize(n_series)
    times: dict[str, list[float]] = {k: [] for k in engines}
    for t in range(warm + rounds):
        batch = ObservationBatch(ids, np.full(n_series, EPOCH_NS + t * step), values[t])
        for key in (list(engines) if t % 2 else list(engines)[::-1]):
            started = time.perf_counter()
            engines[key].process(batch)
            if t >= warm:
                times[key].append(time.perf_counter() - started)
    return 1e6 * (float(np.median(times[name])) - float(np.median(times["none"]))) / n_series


def vectorised_cost(name: str, n_series: int = 10_000, rounds: int = 200, warm: int = 100) -> float:
    """Microseconds per observation of ``update`` alone at ``n_series`` rows, in rounds of every row."""
    rng = np.random.default_rng(0)
    detector = make_detector(name)
    rows = np.arange(n_series)
    residuals = rng.normal(size=(warm + rounds, n_series))
    covered = (np.abs(residuals) < 1.645).astype(float)
    values = rng.normal(size=(warm + rounds, n_series))
    for t in range(warm):
        detector.update(rows, residuals[t], covered[t], values=values[t])
    started = time.perf_counter()
    for t in range(warm, warm + rounds):
        detector.update(rows, residuals[t], covered[t], values=values[t])
    return 1e6 * (time.perf_counter() - started) / (rounds * n_series)


def bootstrap_block(chosen: list[Group], seed: int, console, refresh: bool = False) -> dict:
    """CycleNet's label-free bootstrap watcher on ``chosen`` groups (bench/drift_bootstrap.py): ``spearman_error``,
    ``spearman_width``, ``lead_steps``, ``forecast_cost_ratio`` and ``train_cost_ratio``, then the details."""
    import drift_bootstrap as boot  # bench/ is on the path when this file runs as a script

    runs = []
    for group in chosen:
        runs.append(boot.cached_bootstrap_run(_this_module(), group, place_changes(group, seed), seed, refresh))
        console.print(f"bootstrap: {group.name}: {runs[-1].score.shape[0]} streams, {runs[-1].seconds:.0f} s")
    rho_error, rho_width, n_streams = boot.spearman_medians(runs)
    lead = boot.leads(runs, CYCLES_AFTER)
    refs = boot.references(runs, HORIZON)
    alarms, steps = boot.false_alarms(runs, [g.false_alarms for g in chosen])
    cost = boot.costs(synthetic)
    return {"spearman_error": rho_error, "spearman_width": rho_width, "lead_steps": lead["lead_steps"],
            "forecast_cost_ratio": cost["forecast_cost_ratio"], "train_cost_ratio": cost["train_cost_ratio"],
            "details": {"groups": [g.name for g in chosen], "streams": n_streams, "leads": lead, "references": refs,
                        "false_alarms": alarms, "no_change_steps": steps, "costs": cost}}


def _this_module():
    import sys

    return sys.modules[__name__]


def bootstrap_report(block: dict, console) -> list[str]:
    """Print the bootstrap table; return its done-when lines."""
    from rich.table import Table

    d, lead, cost = block["details"], block["details"]["leads"], block["details"]["costs"]
    table = Table(title=f"bootstrap watcher (CycleNet, B = 8) on {', '.join(d['groups'])}: {d['streams']} streams")
    for col in ("spearman: score", "spearman: width", "lead (steps)", "both fire", "bootstrap first",
                "bootstrap only", "default only", "neither", "false alarms /10k", "forecast x", "train x",
                "(fit x", "replay x)"):
        table.add_column(col, justify="right")
    per_10k = 1e4 * d["false_alarms"] / max(d["no_change_steps"], 1)
    table.add_row(f"{block['spearman_error']:.2f}", f"{block['spearman_width']:.2f}", fmt(block["lead_steps"], ".0f"),
                  str(lead["both"]), str(lead["bootstrap_first"]), str(lead["bootstrap_only"]),
                  str(lead["default_only"]), str(lead["neither"]), f"{per_10k:.1f}",
                  f"{cost['forecast_cost_ratio']:.2f}", f"{cost['train_cost_ratio']:.2f}",
                  f"{cost['fit_cost_ratio']:.2f}", f"{cost['replay_cost_ratio']:.2f}")
    console.print(table)
    refs = d["references"]
    ref_table = Table(title="what ranks the realised error at all (Spearman with it, median over streams; "
                            "bench/drift_bootstrap.py:references)")
    for col in ("all streams: score", "... error of origin t - H", f"{refs['changed_streams']} changed streams: score",
                "... width", "... told the change"):
        ref_table.add_column(col, justify="right")
    ref_table.add_row(f"{block['spearman_error']:.2f}", f"{refs['lagged_error']:.2f}", f"{refs['changed_score']:.2f}",
                      f"{refs['changed_width']:.2f}", f"{refs['change_oracle']:.2f}")
    console.print(ref_table)
    rho_ok = block["spearman_error"] > block["spearman_width"] and block["spearman_error"] >= 0.5
    lines = [
        f"spearman_error {block['spearman_error']:.2f} > spearman_width {block['spearman_width']:.2f} and >= 0.5 -> "
        f"{'holds' if rho_ok else 'does not hold'}",
        f"lead_steps {fmt(block['lead_steps'], '.0f')} > 0 -> "
        f"{'holds' if block['lead_steps'] is not None and block['lead_steps'] > 0 else 'does not hold'}",
        f"forecast_cost_ratio {block['forecast_cost_ratio']:.2f} <= 2 -> "
        f"{'holds' if block['forecast_cost_ratio'] <= 2 else 'does not hold'} (train_cost_ratio "
        f"{block['train_cost_ratio']:.2f})",
    ]
    console.print("[bold]done-when, bootstrap[/bold]")
    for line in lines:
        console.print("  " + line)
    return lines


def median_or_none(values: np.ndarray) -> float | None:
    return float(np.median(values)) if len(values) else None


def detection(seg: Segments, o: Outcome, kinds: tuple[str, ...] = KINDS) -> dict[str, float]:
    changed = seg.change >= 0
    return {k: float((o.delay[changed & (seg.kind == k)] >= 0).mean()) for k in kinds}


def summarise(seg: Segments, outcomes: dict[str, Outcome], tradeoff: list[dict], bootstrap: dict | None) -> dict:
    changed = seg.change >= 0
    out: dict = {"default": DEFAULT_DETECTOR, "detectors": {}, "by_kind": {}, "bootstrap": bootstrap,
                 "nab": {}, "tradeoff": tradeoff}
    for name in DETECTOR_NAMES:
        o = outcomes[name]
        hit = changed & (o.delay >= 0)
        fa = false_alarms(seg, o.alarm_times)
        out["detectors"][name] = {
            "detection_rate": float(hit.sum() / changed.sum()),
            "median_delay": median_or_none(o.delay[hit]),
            "median_delay_cycles": median_or_none(o.delay[hit] / seg.cycle[hit]),
            "false_alarms_per_10k": fa["all"]["per_10k"],
            "false_alarms_per_10k_freeze_rule": fa["rule"]["per_10k"],
            "false_alarms_per_10k_synthetic": fa["synthetic"]["per_10k"],
            "false_alarms_per_10k_etth2_freeze_rule": fa["etth2_rule"]["per_10k"],
            "us_per_obs": None if np.isnan(o.us_per_obs) else o.us_per_obs,  # --skip-kswin: JSON has no NaN
        }
        inside, outside, _, _ = nab_counts(seg, o.alarm_times)
        out["nab"][name] = {"in_window": inside, "outside": outside}
    for kind in KINDS:
        out["by_kind"][kind] = {}
        for name in DETECTOR_NAMES:
            o = outcomes[name]
            sel = changed & (seg.kind == kind)
            hit = sel & (o.delay >= 0)
            out["by_kind"][kind][name] = {"detection_rate": float(hit.sum() / sel.sum()),
                                          "median_delay": median_or_none(o.delay[hit])}
    return out


#: The keys issue [4/8] names for the JSON line, and nothing else (the tables print the rest).
CONTRACT_DETECTOR_KEYS = ("detection_rate", "median_delay", "false_alarms_per_10k", "us_per_obs")
CONTRACT_BOOTSTRAP_KEYS = ("spearman_error", "spearman_width", "lead_steps", "forecast_cost_ratio", "train_cost_ratio")


def contract(summary: dict) -> dict:
    """``summary`` cut to the JSON object the issue specifies: ``default``, ``detectors``, ``by_kind``,
    ``bootstrap`` and ``nab`` with exactly their named keys (the freeze-rule false alarms, delays in cycles,
    the trade-off rows and the bootstrap details stay in the printed tables)."""
    out: dict = {}
    if "default" in summary:
        out["default"] = summary["default"]
        out["detectors"] = {name: {k: row[k] for k in CONTRACT_DETECTOR_KEYS}
                            for name, row in summary["detectors"].items()}
        out["by_kind"] = summary["by_kind"]
    boot = summary.get("bootstrap")
    out["bootstrap"] = None if boot is None else {k: boot[k] for k in CONTRACT_BOOTSTRAP_KEYS}
    if "nab" in summary:
        out["nab"] = summary["nab"]
    return out


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def report(seg: Segments, outcomes: dict[str, Outcome], summary: dict, dev: bool, console) -> list[str]:
    """Print the tables; return the done-when lines (also printed)."""
    from rich.table import Table

    changed = seg.change >= 0
    names = [*DETECTOR_NAMES, RAW]
    title = "dev streams (synthetic seed 1, ETTh2 rows < 8700)" if dev else "scored streams"
    fa_default = false_alarms(seg, outcomes[DEFAULT_DETECTOR].alarm_times)
    table = Table(title=f"drift detectors - {title}: {int(changed.sum())} changes, {fa_default['all']['steps']:,} "
                        f"no-change steps ({fa_default['rule']['steps']:,} with the freeze rule)")
    for col in ("detector", "detected", "worst abrupt", "median delay (steps)", "(cycles)", "false alarms /10k",
                "freeze rule", "synthetic", "ETTh2, rule", "us/obs"):
        table.add_column(col, justify="left" if col == "detector" else "right")
    for name in names:
        o = outcomes[name]
        hit = changed & (o.delay >= 0)
        worst = min(detection(seg, o, ABRUPT).values())
        fa = false_alarms(seg, o.alarm_times)
        table.add_row(name, f"{hit.sum() / changed.sum():.2f}", f"{worst:.2f}",
                      fmt(median_or_none(o.delay[hit]), ".0f"), fmt(median_or_none(o.delay[hit] / seg.cycle[hit])),
                      f"{fa['all']['per_10k']:.1f}", f"{fa['rule']['per_10k']:.1f}",
                      f"{fa['synthetic']['per_10k']:.1f}", f"{fa['etth2_rule']['per_10k']:.1f}",
                      f"{o.us_per_obs:.2f}")
    console.print(table)

    kinds = Table(title="detection rate / median delay in cycles, by kind of change (and by model and data set)")
    kinds.add_column("kind")
    for name in names:
        kinds.add_column(name, justify="right")
    for kind in KINDS:
        for model in ("all", *MODELS, *dict.fromkeys(seg.group[changed].tolist())):
            part = seg.model if model in MODELS else seg.group
            sel = changed & (seg.kind == kind) & ((part == model) if model != "all" else True)
            cells = []
            for name in names:
                d = outcomes[name].delay[sel]
                hit = d >= 0
                cells.append(f"{hit.mean():.2f} / {fmt(median_or_none(d[hit] / seg.cycle[sel][hit]))}")
            kinds.add_row(kind if model == "all" else f"  {model}", *cells)
    console.print(kinds)

    fa = Table(title="false alarms on the no-change streams: count (of which the freeze rule excludes)")
    fa.add_column("stream")
    for name in names:
        fa.add_column(name, justify="right")
    for group in dict.fromkeys(seg.group[seg.counts_false].tolist()):
        for model in MODELS:
            sel = np.flatnonzero((seg.change < 0) & seg.counts_false & (seg.group == group) & (seg.model == model))
            cells = []
            for name in names:
                times = [(i, t) for i in sel for t in outcomes[name].alarm_times[i]]
                left_out = sum(bool(seg.quantised[i] or seg.excluded[i, t]) for i, t in times)
                cells.append(f"{len(times)} ({left_out})")
            fa.add_row(f"{group} / {model}", *cells)
    console.print(fa)
    total, together = coincident(seg, outcomes[DEFAULT_DETECTOR].alarm_times)
    console.print(f"{DEFAULT_DETECTOR}: of its {total} ETTh2 false alarms under the freeze rule, {together} fall "
                  "within 2 h of alarms on >= 2 other ETTh2 channels (same model): events of the whole transformer")

    trade = Table(title=f"{DEFAULT_DETECTOR}: every threshold x factor (1 = the defaults)")
    for col in ("factor", "detected", "worst abrupt", *ABRUPT, "median delay (cycles)", "false alarms /10k",
                "freeze rule", "synthetic", "ETTh2, rule"):
        trade.add_column(col, justify="right")
    for row in summary["tradeoff"]:
        trade.add_row(f"{row['factor']:g}", f"{row['detection_rate']:.2f}", f"{row['worst_abrupt']:.2f}",
                      *(f"{row['by_kind'][k]:.2f}" for k in ABRUPT), fmt(row["median_delay_cycles"]),
                      f"{row['false_alarms_per_10k']:.1f}", f"{row['false_alarms_per_10k_freeze_rule']:.1f}",
                      f"{row['false_alarms_per_10k_synthetic']:.1f}",
                      f"{row['false_alarms_per_10k_etth2_freeze_rule']:.1f}")
    console.print(trade)

    if any(seg.windows):
        nab = Table(title="NAB machine temperature, no injected change: alarms inside / outside the 4 labelled "
                          "windows")
        for col in ("detector", "inside", "outside", "windows hit"):
            nab.add_column(col, justify="left" if col == "detector" else "right")
        for name in names:
            inside, outside, hit_windows, n_windows = nab_counts(seg, outcomes[name].alarm_times)
            nab.add_row(name, str(inside), str(outside), f"{hit_windows} of {n_windows} (both models)")
        console.print(nab)

    # the comparison with ADWIN is on the changes both detect
    ours, adwin = outcomes[DEFAULT_DETECTOR].delay, outcomes["river-adwin"].delay
    both = changed & (ours >= 0) & (adwin >= 0)
    med_ours, med_adwin = median_or_none(ours[both]), median_or_none(adwin[both])
    shorter = 1 - med_ours / med_adwin if med_ours is not None and med_adwin else None
    d = summary["detectors"][DEFAULT_DETECTOR]
    delay_cycles = d["median_delay_cycles"]
    worst = {k: summary["by_kind"][k][DEFAULT_DETECTOR]["detection_rate"] for k in ABRUPT}
    fa_line = "holds" if d["false_alarms_per_10k"] <= 1 else (
        "does not hold (holds with the freeze rule)" if d["false_alarms_per_10k_freeze_rule"] <= 1 else "does not hold")
    lines = [
        f"detection >= 0.95 on every abrupt kind: {' '.join(f'{k} {v:.2f}' for k, v in worst.items())} -> "
        f"{'holds' if min(worst.values()) >= 0.95 else 'does not hold'}",
        f"median delay <= 1 cycle: {fmt(delay_cycles)} cycles -> "
        f"{'holds' if delay_cycles is not None and delay_cycles <= 1 else 'does not hold'}",
        f"median delay vs river-adwin on the {int(both.sum())} changes both detect: {fmt(med_ours, '.0f')} vs "
        f"{fmt(med_adwin, '.0f')} steps, {fmt(None if shorter is None else 100 * shorter, '.0f')} % shorter "
        f"(>= 30 %) -> "
        f"{'holds' if shorter is not None and shorter >= 0.3 else 'does not hold'}",
        f"false alarms <= 1 per 10k: {d['false_alarms_per_10k']:.1f} ({d['false_alarms_per_10k_freeze_rule']:.1f} "
        f"with the freeze rule; synthetic {d['false_alarms_per_10k_synthetic']:.1f}, ETTh2 with the rule "
        f"{d['false_alarms_per_10k_etth2_freeze_rule']:.1f}) -> {fa_line}",
        f"cost <= 2 us/obs at 10,000 series through Engine.process: {d['us_per_obs']:.3f} -> "
        f"{'holds' if d['us_per_obs'] <= 2 else 'does not hold'}",
    ]
    watchers = {k: outcomes[DEFAULT_DETECTOR].first_kind.count(k) for k in ("mean", "variance", "coverage", "freeze")}
    console.print(f"{DEFAULT_DETECTOR}: changes first detected by its "
                  + ", ".join(f"{k} watcher {v}" for k, v in watchers.items()))
    console.print("[bold]done-when, default detector[/bold]")
    for line in lines:
        console.print("  " + line)
    console.print("us/obs: every detector through Engine.process at 10,000 series (with minus without the drift "
                  f"monitor; river's in their per-row Python loop inside it); {RAW}: its update alone at 10,000 rows.")
    return lines


def tradeoff_rows(seg: Segments, console) -> list[dict]:
    rows = []
    for factor in FACTORS:
        o = score(seg, *watch(make_detector(DEFAULT_DETECTOR, **scaled(factor)), seg))
        changed = seg.change >= 0
        hit = changed & (o.delay >= 0)
        by_kind = detection(seg, o, ABRUPT)
        fa = false_alarms(seg, o.alarm_times)
        rows.append({"factor": factor, "detection_rate": float(hit.mean() / changed.mean()),
                     "worst_abrupt": min(by_kind.values()), "by_kind": by_kind,
                     "median_delay_cycles": median_or_none(o.delay[hit] / seg.cycle[hit]),
                     "false_alarms_per_10k": fa["all"]["per_10k"],
                     "false_alarms_per_10k_freeze_rule": fa["rule"]["per_10k"],
                     "false_alarms_per_10k_synthetic": fa["synthetic"]["per_10k"],
                     "false_alarms_per_10k_etth2_freeze_rule": fa["etth2_rule"]["per_10k"]})
        console.print(f"trade-off x{factor:g} done")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev", action="store_true", help="the dev streams (synthetic seed 1, ETTh2 rows < 8700)")
    parser.add_argument("--refresh", action="store_true",
                        help="recompute the cached runs (residuals and bootstrap scores) even where the key matches")
    parser.add_argument("--json", action="store_true", help="print the JSON object last")
    parser.add_argument("--residual", default="mean", choices=("mean", "1", "H"),
                        help="what detectors watch: every matured horizon pooled (default, what the engine's drift "
                             "monitor watches), the h = 1 residual or the h = H one")
    parser.add_argument("--skip-kswin", action="store_true", help="leave river's KSWIN out (about 1 min per run)")
    parser.add_argument("--bootstrap-only", action="store_true",
                        help="only the bootstrap block (its JSON object holds only that key)")
    parser.add_argument("--bootstrap-groups", nargs="*", default=None, metavar="GROUP",
                        help="data sets the bootstrap block runs on (default: all of the split)")
    args = parser.parse_args()
    from rich.console import Console

    console = Console(width=200, stderr=args.json)
    seed = 1 if args.dev else 0
    chosen = [g for g in groups(args.dev) if args.bootstrap_groups is None or g.name in args.bootstrap_groups]
    if args.bootstrap_only:
        block = bootstrap_block(chosen, seed, console, args.refresh)
        bootstrap_report(block, console)
        if args.json:
            print(json.dumps(contract({"bootstrap": block})))
        return
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
        if name == "river-kswin" and args.skip_kswin:
            outcomes[name] = Outcome(np.full(len(seg.x), -1), [""] * len(seg.x), [[] for _ in seg.x], float("nan"))
            continue
        detector = make_detector(DEFAULT_DETECTOR, whiten=False) if name == RAW else make_detector(name)
        outcomes[name] = score(seg, *watch(detector, seg))
        if name == RAW:
            outcomes[name].us_per_obs = vectorised_cost(DEFAULT_DETECTOR)
        else:  # river's: past their windows (KSWIN's 100 values, after H steps before a residual matures) before
            # timing; their per-row loop (up to ~180 us an observation) varies little, so fewer timed rounds
            outcomes[name].us_per_obs = engine_cost(name, **({"rounds": 10, "warm": 150} if "river" in name else {}))
        console.print(f"{name}: {time.perf_counter() - started:.0f} s")
    block = bootstrap_block(chosen, seed, console, args.refresh)
    summary = summarise(seg, outcomes, tradeoff_rows(seg, console), block)
    report(seg, outcomes, summary, args.dev, console)
    bootstrap_report(block, console)
    if args.json:
        print(json.dumps(contract(summary)))


if __name__ == "__main__":
    main()
