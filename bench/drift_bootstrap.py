"""The "bootstrap" block of bench/drift.py: CycleNet's label-free bootstrap watcher on the same changed streams.

For each group of bench/drift.py (the same series, the same injected changes at the same positions), one engine
runs CycleNet with ``bootstrap=8`` replicas (warm-started on the first 2,000 steps, then frozen, as in the drift
bench: the changed copies share one backbone) with two watchers in its lane: the default label-based drift
monitor and the bootstrap watcher (:class:`tidecast.monitors.bootstrap.BootstrapMonitor`, its defaults). The
engine is fed one tick per call, so the watcher's per-origin values can be read after each call.

Per origin t of every stream (clean streams from step 2,100, changed copies from 1,000 steps before their change to
4 cycles after it), with ``s_h`` the series' residual scale per horizon (the watcher's running mean |r_h|):

* label-free **score**: mean over h of ``spread_h / s_h`` (the replicas' standard deviation, what the watcher
  averages);
* conformal **width**: mean over h of ``(upper_h - lower_h) / s_h``;
* realised **error**: mean over h of ``|y[t + h] - yhat_h| / s_h``, once every target has arrived.

``spearman_error`` / ``spearman_width``: Spearman's rank correlation of the score / the width with the error within
each stream, the median over streams. ``lead_steps``: on changed copies of the kinds that move inputs out of range
(level, trend, ramp, variance) where both fire within 4 cycles after the change, the median of (first default
alarm - first bootstrap alarm) in steps; positive: the bootstrap alarm comes first.

For scale (:func:`references`, printed, not in the JSON): how well the realised error of origin t - H (label-based)
and, on the changed streams, being told the change point rank the realised error on the same origins.

Costs (:func:`costs`): CycleNet at 64 synthetic series (P = 24, H = 24, the model's defaults otherwise, one torch
thread), B = 8 against B = 0 in the same run, taking their rounds alternately: ``forecast_cost_ratio`` is the
median time of a forecast round (``forecast_many``, plus ``spread_many``) over 200 rounds; ``train_cost_ratio`` the
warm-start fit plus 200 replay rounds at their median time (``learn_many`` with its inline replay steps,
``step_budget`` large enough that both take every step). The fit and replay ratios are printed apart too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from tidecast.models.cyclenet import CycleNetForecaster
from tidecast.monitors.bootstrap import BootstrapMonitor
from tidecast.monitors.conformal import DEFAULT_CALIBRATOR, make_calibrator
from tidecast.stream.batch import ObservationBatch
from tidecast.stream.config import EngineConfig
from tidecast.stream.engine import Engine, Lane, drift_monitors

REPLICAS = 8
CACHE_VERSION = "1"
OUT_OF_RANGE = ("level", "trend", "ramp", "variance")


@dataclass
class BootRun:
    score: np.ndarray  # (rows, T) label-free score per origin
    width: np.ndarray  # (rows, T) conformal width per origin
    error: np.ndarray  # (rows, T) realised mean |error| per origin
    boot_alarms: list[list[int]]  # ticks of the bootstrap watcher's alarms, per row
    default_alarms: list[list[int]]  # ticks of the default drift detector's alarms, per row
    lo: np.ndarray  # first watched tick per row
    hi: np.ndarray  # end of the watched stretch per row
    kind: list[str]  # the row's change ("none" for a clean stream)
    at: np.ndarray  # the change's tick (-1: none)
    cycle: int
    seconds: float


def bootstrap_run(drift, group, changes, seed: int) -> BootRun:
    """One engine over the group's clean and changed rows (bench/drift.py's ``run_model``, one tick per call)."""
    torch.set_num_threads(1)  # the engine's default (torch_threads); tiny batches run faster on one thread
    started = time.perf_counter()
    horizon, cycle, T = drift.HORIZON, group.cycle, group.length
    n_clean = len(group.series)
    n_rows = n_clean + len(changes)
    base_of = np.array(list(range(n_clean)) + [c.series for c in changes])
    end = np.array([T] * n_clean + [c.at + drift.CYCLES_AFTER * cycle for c in changes])
    values = group.values[base_of].copy()
    ids = np.array([f"{group.name}/{i}" for i in range(n_rows)], dtype=object)
    step_ns = pd.Timedelta(group.step).value
    model = CycleNetForecaster(horizon=horizon, cycle=cycle, warm_start=drift.WARM_START, online=False, defer=False,
                               seed=0, bootstrap=REPLICAS)
    config = EngineConfig(horizon=horizon, models=["cyclenet"], freq=group.step)
    watcher = BootstrapMonitor(model, horizon)
    lane = Lane(model, make_calibrator(DEFAULT_CALIBRATOR, horizon, drift.ALPHA), horizon, drift.ALPHA,
                monitors=[*drift_monitors(config), watcher])
    engine = Engine(config, [lane])
    score = np.full((n_rows, T), np.nan, dtype=np.float32)
    width = score.copy()
    mean = np.full((n_rows, T, horizon), np.nan, dtype=np.float32)  # by origin
    scale = mean.copy()
    boot_alarms: list[list[int]] = [[] for _ in range(n_rows)]
    default_alarms: list[list[int]] = [[] for _ in range(n_rows)]
    sigma_residual = np.full((n_rows, T), np.nan, dtype=np.float32)  # h = 1 residual, for the change's sigma
    rng = np.random.default_rng([seed, 7])
    pending = sorted(range(len(changes)), key=lambda k: changes[k].at)
    row_of = {sid: i for i, sid in enumerate(ids)}
    for t in range(T):
        while pending and changes[pending[0]].at <= t:
            k = pending.pop(0)
            c, row = changes[k], n_clean + k
            sigma = np.nanstd(sigma_residual[row, max(0, c.at - drift.SIGMA_WINDOW) : t])
            values[row, c.at : end[row]] = drift.inject(c.kind, group.values[c.series], c.at, sigma, cycle, rng)
        rows = np.flatnonzero(end > t)
        result = engine.process(ObservationBatch(ids[rows], drift.EPOCH_NS + t * step_ns + 0 * rows,
                                                 values[rows, t]))
        for event in result.events:
            (boot_alarms if event.detector == "bootstrap" else default_alarms)[row_of[event.series_id]].append(t)
        out = result.forecasts
        if t >= 1:
            sigma_residual[rows, t] = values[rows, t] - mean[rows, t - 1, 0]
        if not len(out):
            continue
        r = np.array([row_of[s] for s in out.series_id])
        h = out.h - 1
        slots = np.array([engine._slot_of[s] for s in ids[r]])
        s_h = watcher.pool_.scale_[slots, h]
        mean[r, t, h], scale[r, t, h] = out.mean, s_h
        with np.errstate(divide="ignore", invalid="ignore"):
            w = np.where(s_h > 0, (out.upper - out.lower) / s_h, np.nan)
        wsum = np.zeros(n_rows)
        wcnt = np.zeros(n_rows)
        np.add.at(wsum, r, np.where(np.isfinite(w), w, 0.0))
        np.add.at(wcnt, r, np.isfinite(w))
        issued = np.unique(r)
        width[issued, t] = np.where(wcnt[issued] == horizon, wsum[issued] / np.maximum(wcnt[issued], 1), np.nan)
        ratio = watcher.ratio_[np.array([engine._slot_of[s] for s in ids[issued]])]
        score[issued, t] = np.where(np.isfinite(ratio).all(axis=1), ratio.mean(axis=1), np.nan)
    # realised error per origin: the targets t + 1 .. t + H
    error = np.full((n_rows, T), np.nan, dtype=np.float32)
    for t in range(T - horizon):
        target = values[:, t + 1 : t + 1 + horizon]
        with np.errstate(divide="ignore", invalid="ignore"):
            e = np.abs(target - mean[:, t]) / scale[:, t]
        error[:, t] = np.where(np.isfinite(e).all(axis=1) & (end > t + horizon), e.mean(axis=1), np.nan)
    lo = np.array([drift.DETECT_FROM] * n_clean + [c.at - drift.PRE for c in changes])
    return BootRun(score, width, error, boot_alarms, default_alarms, lo, end,
                   ["none"] * n_clean + [c.kind for c in changes],
                   np.array([-1] * n_clean + [c.at for c in changes]), cycle, time.perf_counter() - started)


def cached_bootstrap_run(drift, group, changes, seed: int, refresh: bool = False) -> BootRun:
    """:func:`bootstrap_run`, kept under bench/.cache/ (arrays only), keyed by what shapes it: its inputs, and the
    project's source (``drift.source_fingerprint``: the default drift detector's alarms are in the run too)."""
    import hashlib
    import json

    shape = [CACHE_VERSION, drift.source_fingerprint(), group.name, group.series, group.cycle, group.step, seed,
             [[c.series, c.kind, c.at] for c in changes], drift.HORIZON, drift.ALPHA, drift.WARM_START, REPLICAS]
    key = hashlib.sha256(json.dumps(shape).encode() + group.values.tobytes()).hexdigest()[:16]
    path = drift.CACHE / f"bootstrap-{group.name}-{key}.npz"
    if path.exists() and not refresh:
        with np.load(path, allow_pickle=False) as z:
            return BootRun(z["score"], z["width"], z["error"], _lists(z["boot"], len(z["lo"])),
                           _lists(z["default"], len(z["lo"])), z["lo"], z["hi"], z["kind"].tolist(), z["at"],
                           int(z["cycle"]), float(z["seconds"]))
    run = bootstrap_run(drift, group, changes, seed)
    drift.CACHE.mkdir(exist_ok=True)
    (drift.CACHE / ".gitignore").write_text("*\n")
    np.savez_compressed(path, score=run.score, width=run.width, error=run.error, boot=_pairs(run.boot_alarms),
                        default=_pairs(run.default_alarms), lo=run.lo, hi=run.hi, kind=np.array(run.kind),
                        at=run.at, cycle=run.cycle, seconds=run.seconds)
    return run


def _pairs(alarms: list[list[int]]) -> np.ndarray:
    return np.array([(i, t) for i, ticks in enumerate(alarms) for t in ticks], dtype=np.int64).reshape(-1, 2)


def _lists(pairs: np.ndarray, n: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(n)]
    for i, t in pairs.tolist():
        out[i].append(t)
    return out


def spearman_medians(runs: list[BootRun]) -> tuple[float, float, int]:
    """Median over streams of Spearman(score, error) and Spearman(width, error), and the number of streams."""
    rho_s, rho_w = [], []
    for run in runs:
        for i in range(run.score.shape[0]):
            sl = slice(int(run.lo[i]), int(run.hi[i]))
            s, w, e = run.score[i, sl], run.width[i, sl], run.error[i, sl]
            ok = np.isfinite(s) & np.isfinite(w) & np.isfinite(e)
            if ok.sum() < 20:
                continue
            rho_s.append(spearmanr(s[ok], e[ok]).statistic)
            rho_w.append(spearmanr(w[ok], e[ok]).statistic)
    return float(np.nanmedian(rho_s)), float(np.nanmedian(rho_w)), len(rho_s)


def references(runs: list[BootRun], horizon: int) -> dict[str, float | int]:
    """What ranks the realised error at all, on the origins :func:`spearman_medians` scores (medians over streams).

    * ``lagged_error``: the realised error of origin t - H, the newest whose targets have all arrived when origin t
      is issued: what a label-based watcher could know, on every stream;
    * on the changed streams only, ``changed_score`` / ``changed_width`` (the score and the width there) against
      ``change_oracle``: 1 where the origin's targets reach the change (t + H >= change), else 0, i.e. a watcher
      told where the change is.

    On a stream whose noise is independent from step to step and whose model does not change (the clean synthetic
    streams), the realised error of an origin depends only on noise still to come, so no score, label-free or not,
    ranks it better than chance there.
    """
    lagged, changed = [], {"changed_score": [], "changed_width": [], "change_oracle": []}
    for run in runs:
        for i in range(run.score.shape[0]):
            lo, hi = int(run.lo[i]), int(run.hi[i])
            if lo < horizon:
                continue
            s, w, e = run.score[i, lo:hi], run.width[i, lo:hi], run.error[i, lo:hi]
            ok = np.isfinite(s) & np.isfinite(w) & np.isfinite(e)
            if ok.sum() < 20:
                continue
            past = run.error[i, lo - horizon : hi - horizon]
            both = ok & np.isfinite(past)
            if both.sum() >= 20:
                lagged.append(spearmanr(past[both], e[both]).statistic)
            if run.at[i] >= 0:
                told = (np.arange(lo, hi) + horizon >= run.at[i]).astype(float)
                changed["changed_score"].append(spearmanr(s[ok], e[ok]).statistic)
                changed["changed_width"].append(spearmanr(w[ok], e[ok]).statistic)
                changed["change_oracle"].append(spearmanr(told[ok], e[ok]).statistic)
    out: dict[str, float | int] = {"lagged_error": float(np.nanmedian(lagged)) if lagged else float("nan")}
    out.update({k: float(np.nanmedian(v)) if v else float("nan") for k, v in changed.items()})
    out["changed_streams"] = len(changed["change_oracle"])
    return out


def leads(runs: list[BootRun], cycles_after: int) -> dict[str, float | int | None]:
    """First bootstrap vs first default alarm after each out-of-range change."""
    lead, boot_only, default_only, neither, n = [], 0, 0, 0, 0
    for run in runs:
        for i, kind in enumerate(run.kind):
            if kind not in OUT_OF_RANGE:
                continue
            n += 1
            at, until = int(run.at[i]), int(run.at[i]) + cycles_after * run.cycle
            b = [t for t in run.boot_alarms[i] if at <= t < until]
            d = [t for t in run.default_alarms[i] if at <= t < until]
            if b and d:
                lead.append(d[0] - b[0])
            else:
                boot_only += bool(b)
                default_only += bool(d)
                neither += not (b or d)
    return {"lead_steps": float(np.median(lead)) if lead else None, "both": len(lead), "bootstrap_only": boot_only,
            "default_only": default_only, "neither": neither, "changes": n,
            "bootstrap_first": int(np.sum(np.array(lead) > 0)) if lead else 0}


def false_alarms(runs: list[BootRun], counted: list[bool]) -> tuple[int, int]:
    """Bootstrap alarms on the clean streams of the runs ``counted`` (synthetic and ETTh2: ELEC2 and NAB hold real
    drift), and their watched steps."""
    alarms = steps = 0
    for run, counts in zip(runs, counted, strict=True):
        if not counts:
            continue
        for i, kind in enumerate(run.kind):
            if kind == "none":
                alarms += sum(int(run.lo[i]) <= t < int(run.hi[i]) for t in run.boot_alarms[i])
                steps += int(run.hi[i] - run.lo[i])
    return alarms, steps


def costs(synthetic, n_series: int = 64, rounds: int = 200) -> dict[str, float]:
    """Seconds of CycleNet's warm-start fit, and median seconds of a replay round and of a forecast round, B = 8
    and B = 0 (see the module docstring); ``synthetic`` is bench/drift.py's generator. The two models take their
    rounds alternately (and in alternating order), so a busy machine slows both alike."""
    warm = 2000
    values = np.concatenate([synthetic(s, n_series=n_series // 4, length=warm + rounds).values
                             for s in range(100, 104)])
    rows = np.arange(values.shape[0])
    torch.set_num_threads(1)
    models = {b: CycleNetForecaster(horizon=24, cycle=24, defer=False, step_budget=60.0, bootstrap=b)
              for b in (0, REPLICAS)}
    fit = {b: 0.0 for b in models}
    replay: dict[int, list[float]] = {b: [] for b in models}
    forecast: dict[int, list[float]] = {b: [] for b in models}
    for t in range(warm + rounds):
        for b in (list(models) if t % 2 else list(models)[::-1]):
            model = models[b]
            started = time.perf_counter()
            model.learn_many(rows, np.full(rows.size, t), values[:, t])
            spent = time.perf_counter() - started
            if t == warm - 1:
                fit[b] = spent
            elif t >= warm:
                replay[b].append(spent)
                started = time.perf_counter()
                model.forecast_many(rows, 24)
                model.spread_many(rows, 24)
                forecast[b].append(time.perf_counter() - started)
    out: dict[str, float] = {}
    for b in models:
        out[f"fit_seconds_b{b}"] = fit[b]
        out[f"replay_round_seconds_b{b}"] = float(np.median(replay[b]))
        out[f"forecast_round_seconds_b{b}"] = float(np.median(forecast[b]))
    big = REPLICAS
    out["forecast_cost_ratio"] = out[f"forecast_round_seconds_b{big}"] / out["forecast_round_seconds_b0"]
    out["fit_cost_ratio"] = out[f"fit_seconds_b{big}"] / out["fit_seconds_b0"]
    out["replay_cost_ratio"] = out[f"replay_round_seconds_b{big}"] / out["replay_round_seconds_b0"]
    # training: the warm-start fit plus `rounds` replay rounds, each at its median
    train = {b: out[f"fit_seconds_b{b}"] + rounds * out[f"replay_round_seconds_b{b}"] for b in models}
    out["train_cost_ratio"] = train[big] / train[0]
    return out
