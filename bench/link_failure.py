"""Link-load forecasting through a link failure: liquid CfC vs incremental MLPs, the seed paper's setting.

The seed paper (Ayoub, Andreoletti et al., arXiv 2404.05304) forecasts link loads of the Euro28 network with
sum-of-sines traffic, fails a link, reroutes its flows, and compares liquid networks that adapt online with
incremental learning (an MLP re-fitted on every batch of B new samples). Its claim: the liquid network wins after
a drastic shift, incremental learning after a moderate one. This bench rebuilds that setting and runs every model
through the streaming engine (:class:`tidecast.stream.engine.Engine`, the object ``replay`` and ``serve`` run).

The simulator, fixed before any model was tuned on it:

* **Topology** (the same in every run): 28 nodes at uniform random points of the unit square (numpy seed 28),
  linked by their Delaunay triangulation; links are then removed longest first, each only if every link stays
  on a cycle (so any single failure leaves the network connected), down to 41 links - Euro28's node and link
  counts (mean degree 2.93).
* **Demand** of each of the 378 node pairs, hourly: ``A * (1 + 0.5 sin(2 pi t / 24 + p1) + 0.25 sin(2 pi t / 168 +
  p2)) + 0.1 * A * e_t``, clipped at 0, with ``A ~ U(0.5, 1.5)``, phases ``~ U(0, 2 pi)`` and ``e_t ~ N(0, 1)``
  drawn per pair from the run's seed.
* **Routing**: every pair's demand takes its shortest path (link length = Euclidean distance); a link's load is
  the sum of the demands routed over it (both directions: one series per link).
* **Event** at hour ``t_f = 672 + U{0..23}`` (after four weeks, at a random hour of the day); the run ends two
  weeks later (``t_f + 336``).
  - ``drastic``: a link fails, drawn uniformly among the links whose mean demand share is >= 10 % of all
    traffic; from ``t_f`` every path is recomputed without it, so the loads of the surviving links jump. The
    failed link leaves the scored set (before and after).
  - ``moderate``: no failure; from ``t_f`` every demand ramps up linearly by 30 % over 168 hours and stays there.
* Both variants of a seed share the same draws. Scored seeds are 0, 1, ...; ``--dev`` uses seeds 1000, 1001, ...
  (the ones cfc's settings were chosen on).

Models, each a lane of one engine (horizon 12, hourly grid), learned ones warm-started on the first 480 hours:

* ``cfc-online`` / ``cfc-frozen`` - :class:`tidecast.models.liquid.CfCForecaster` (settings in ``CFC``);
* ``mlp-b16``, ``mlp-b96``, ``mlp-b384`` - the paper's incremental learning: an MLP (24 -> 64 -> 64 -> 12, ReLU)
  on the last 24 values of a link, one network shared by all links (each standardised by its warm-start
  scaler), fitted at the warm start and re-fitted (``REFIT_EPOCHS`` epochs) on each batch of B new completed
  samples of every link; its settings were fixed a priori, not tuned;
* ``cyclenet-online`` - :class:`tidecast.models.cyclenet.CycleNetForecaster` (lookback 96, cycle detected at the warm
  start, online replay with its defaults);
* ``seasonal-naive`` - the value 24 hours earlier.

Metrics per model and horizon h (1 and 12), over the surviving links, on the load scale: ``rmse_before`` over the
targets in the week before ``t_f``; ``rmse_after`` and ``smape_after`` (percent, ``200 |y - f| / (|y| + |f|)``,
0/0 counted as 0) over the 336 targets from ``t_f`` on; ``converge_steps``: the first step s >= 0 after ``t_f``
from which the RMSE of the next 24 steps is within 10 % of the model's own ``rmse_before`` (336 if never);
``wins``: the share of seeds in which the model had the lowest ``rmse_after``. Values are means over seeds.

    .venv/bin/python bench/link_failure.py [--seeds 10] [--jobs 2] [--json]
    .venv/bin/python bench/link_failure.py --seeds 0      # the serving-cost table alone (~1 min)
    .venv/bin/python bench/link_failure.py --dev --models cfc-online,cfc-frozen,seasonal-naive --cfc lr=0.01
"""

from __future__ import annotations

import argparse
import heapq
import json
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import Any

import numpy as np
import torch
from scipy.spatial import Delaunay
from torch import nn

from tidecast.models.base import ArrayDict, BatchForecaster
from tidecast.models.cyclenet import CycleNetForecaster
from tidecast.models.liquid import CfCForecaster
from tidecast.models.liquid import build as build_cfc
from tidecast.models.naive import SeasonalNaive
from tidecast.models.registry import MODELS as MODELS_REGISTRY
from tidecast.monitors.conformal import DEFAULT_CALIBRATOR, make_calibrator
from tidecast.stream.batch import ObservationBatch
from tidecast.stream.config import EngineConfig
from tidecast.stream.engine import Engine, Lane

HOUR = 3_600_000_000_000
T0 = 1_704_067_200 * 1_000_000_000  # 2024-01-01T00:00Z, a Monday
N_NODES, N_LINKS, TOPOLOGY_SEED = 28, 41, 28
FAIL_AFTER, SCORED, BEFORE = 672, 336, 168  # hours: four weeks, then two scored weeks; the week before
WARM_START, HORIZON, HORIZONS = 480, 12, (1, 12)
MIN_SHARE, RAMP, RAMP_HOURS = 0.10, 0.30, 168
DEV_SEED0 = 1000
MODELS = ("cfc-online", "cfc-frozen", "mlp-b16", "mlp-b96", "mlp-b384", "cyclenet-online", "seasonal-naive")

#: cfc's settings, chosen on --dev seeds only (the scored seeds were never used to choose). First on seeds
#: 1000-1002 (drastic): 10 warm-start epochs fit as well as 30 at a third of the cost; online_lr 1e-3 / 1e-2,
#: 3 replay steps, 16 units, no phase inputs and the adaptive scaler were within 2 % or worse; so was replay
#: drawn by recent error (tried, then removed from the model). Then on seeds 1000-1009, after a first scored run
#: in which online learning lost to the frozen model in 3 of 10 seeds: a Huber replay loss (threshold 1) took
#: h = 1 rmse_after from 1.822 to 1.780 and converge_steps from 245 to 171; with replay_window 48, 1.767 and
#: 111 (thresholds 0.5 and 2, online_lr 1e-3 and threshold 2 with window 48 were within 1 %, not better).
#: Not adopted (2026-12-03, seeds 1000-1009): the blend with the last value (persistence_half_life=168). It improves
#: cfc-online (drastic h = 1 rmse_after 1.767 -> 1.734, converge_steps 111 -> 84), but blended the frozen network
#: does as well (1.726; below online in 8 of 10 seeds): the blend, not the network's learning, would do the work,
#: and this bench tests the network's learning (README, "Liquid CfC through a link failure").
CFC: dict[str, Any] = dict(lookback=24, units=32, backbone_units=64, periods=(24, 168), skip=True,
                           batch_size=256, lr=0.005, epochs=10, online_lr=3e-3, online_huber=1.0, replay_window=48,
                           replay_steps=1, replay_batch=128)
REFIT_EPOCHS = 10  # the incremental MLP's passes over each new batch (fixed a priori)


# -- the simulator ------------------------------------------------------------------------------------------


def topology() -> tuple[np.ndarray, np.ndarray]:
    """Node coordinates (28, 2) and links (41, 2) of the fixed Euro28-sized mesh."""
    points = np.random.default_rng(TOPOLOGY_SEED).random((N_NODES, 2))
    links = set()
    for tri in Delaunay(points).simplices:
        for i in range(3):
            a, b = sorted((int(tri[i]), int(tri[(i + 1) % 3])))
            links.add((a, b))
    ordered = sorted(links, key=lambda e: -float(np.linalg.norm(points[e[0]] - points[e[1]])))
    kept = list(ordered)
    for link in ordered:  # longest first
        if len(kept) <= N_LINKS:
            break
        trial = [e for e in kept if e != link]
        if all(_connected(trial, skip=k) for k in range(len(trial))):
            kept = trial
    return points, np.array(sorted(kept))


def _connected(links: list[tuple[int, int]], skip: int) -> bool:
    adj: dict[int, list[int]] = {i: [] for i in range(N_NODES)}
    for k, (a, b) in enumerate(links):
        if k != skip:
            adj[a].append(b)
            adj[b].append(a)
    seen, todo = {0}, [0]
    while todo:
        for v in adj[todo.pop()]:
            if v not in seen:
                seen.add(v)
                todo.append(v)
    return len(seen) == N_NODES


def routing(points: np.ndarray, links: np.ndarray, removed: int | None = None) -> np.ndarray:
    """Incidence (pairs, links): 1 where a pair's shortest path uses the link (Dijkstra on link lengths)."""
    length = np.linalg.norm(points[links[:, 0]] - points[links[:, 1]], axis=1)
    adj: dict[int, list[tuple[int, float, int]]] = {i: [] for i in range(N_NODES)}
    for k, (a, b) in enumerate(links.tolist()):
        if k != removed:
            adj[a].append((b, length[k], k))
            adj[b].append((a, length[k], k))
    pairs = [(i, j) for i in range(N_NODES) for j in range(i + 1, N_NODES)]
    incidence = np.zeros((len(pairs), len(links)))
    for src in range(N_NODES):
        dist, via = {src: 0.0}, {}
        queue = [(0.0, src)]
        while queue:
            d, u = heapq.heappop(queue)
            if d > dist[u]:
                continue
            for v, w, k in adj[u]:
                if d + w < dist.get(v, np.inf):
                    dist[v], via[v] = d + w, (u, k)
                    heapq.heappush(queue, (d + w, v))
        for p, (i, j) in enumerate(pairs):
            if i == src:
                node = j
                while node != src:
                    node, k = via[node]
                    incidence[p, k] = 1.0
    return incidence


def simulate(seed: int, variant: str) -> dict[str, Any]:
    """One run's link loads (T, links), event hour, failed link (drastic) and the scored links."""
    points, links = topology()
    rng = np.random.default_rng(seed)
    base = routing(points, links)
    n_pairs = base.shape[0]
    amp = rng.uniform(0.5, 1.5, n_pairs)
    phases = rng.uniform(0, 2 * np.pi, (2, n_pairs))
    t_f = FAIL_AFTER + int(rng.integers(24))
    share = amp @ base / amp.sum()
    candidates = np.flatnonzero(share >= MIN_SHARE)
    failed = int(rng.choice(candidates))
    t = np.arange(t_f + SCORED)[:, None]
    clean = amp * (1 + 0.5 * np.sin(2 * np.pi * t / 24 + phases[0]) + 0.25 * np.sin(2 * np.pi * t / 168 + phases[1]))
    demand = np.maximum(clean + 0.1 * amp * rng.normal(size=clean.shape), 0.0)
    if variant == "drastic":
        after = routing(points, links, removed=failed)
        loads, expected = demand @ base, clean @ base
        loads[t_f:], expected[t_f:] = demand[t_f:] @ after, clean[t_f:] @ after
        scored = np.flatnonzero(np.arange(len(links)) != failed)
    elif variant == "moderate":
        ramp = 1 + RAMP * np.clip((t - t_f + 1) / RAMP_HOURS, 0, 1)
        loads, expected = (demand * ramp) @ base, (clean * ramp) @ base
        scored = np.arange(len(links))
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return {"loads": loads, "expected": expected, "t_f": t_f, "failed": failed, "share": float(share[failed]),
            "scored": scored}


def noise_floor(sim: dict[str, Any]) -> dict[str, float]:
    """RMSE of the noise-free load (an oracle of every horizon) before and after the event: the floor under
    every model's RMSE. Rerouted demand brings its noise along, so the floor itself rises after a failure."""
    t_f, scored = sim["t_f"], sim["scored"]
    err = (sim["expected"] - sim["loads"])[:, scored]
    return {"before": float(np.sqrt(np.mean(err[t_f - BEFORE : t_f] ** 2))),
            "after": float(np.sqrt(np.mean(err[t_f : t_f + SCORED] ** 2)))}


# -- the incremental MLP --------------------------------------------------------------------------------------


class IncrementalMLP(BatchForecaster):
    """The seed paper's incremental learning as a group model: an MLP on the last ``lookback`` standardised values
    forecasts ``horizon`` steps; fitted at the warm start (Adam, early stopping on the last 20 %), then re-fitted
    for ``refit_epochs`` epochs on the ``every`` newest completed samples of every row each time they are in.
    Assumes rows on one gap-free clock (this bench's streams)."""

    def __init__(self, horizon: int, every: int, lookback: int = 24, hidden: int = 64, warm_start: int = WARM_START,
                 lr: float = 1e-3, epochs: int = 50, patience: int = 5, batch_size: int = 256,
                 refit_epochs: int = REFIT_EPOCHS, seed: int = 0) -> None:
        self.name = f"mlp-b{every}"
        self.horizon, self.every, self.lookback, self.warm_start = horizon, every, lookback, warm_start
        self.lr, self.epochs, self.patience, self.batch_size = lr, epochs, patience, batch_size
        self.refit_epochs = refit_epochs
        self.ring = max(warm_start, every + lookback + horizon)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(lookback, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, horizon))
        self.rng = np.random.default_rng(seed)
        self.fitted_ = False
        self.hist_ = np.zeros((0, self.ring))
        self.seen_ = np.zeros(0, np.int64)
        self.last_tick_ = np.zeros(0, np.int64)
        self.pending_ = np.zeros(0, np.int64)  # completed samples since the last (re)fit
        self.mean_, self.scale_ = np.zeros(0), np.ones(0)

    def resize(self, n_rows: int) -> None:
        extra = n_rows - self.seen_.size
        if extra > 0:
            self.hist_ = np.concatenate([self.hist_, np.zeros((extra, self.ring))])
            self.seen_, self.last_tick_, self.pending_ = (np.concatenate([a, np.zeros(extra, np.int64)])
                                                          for a in (self.seen_, self.last_tick_, self.pending_))
            self.mean_, self.scale_ = np.concatenate([self.mean_, np.zeros(extra)]), np.concatenate(
                [self.scale_, np.ones(extra)])

    def _windows(self, rows: np.ndarray, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``count`` newest completed (input, target) samples of each row, standardised."""
        w = self.lookback + self.horizon
        ends = self.last_tick_[rows, None] - np.arange(count)[::-1]  # last target tick of each sample
        ticks = ends[:, :, None] - w + 1 + np.arange(w)
        z = (self.hist_[rows[:, None, None], ticks % self.ring] - self.mean_[rows, None, None]) / self.scale_[
            rows, None, None]
        z = torch.from_numpy(z.reshape(-1, w).astype(np.float32))
        return z[:, : self.lookback], z[:, self.lookback :]

    def _train(self, x: torch.Tensor, y: torch.Tensor, epochs: int, val: tuple | None = None) -> None:
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        best, best_state, bad = np.inf, None, 0
        for _ in range(epochs):
            order = self.rng.permutation(len(x))
            for lo in range(0, len(x), self.batch_size):
                idx = torch.from_numpy(order[lo : lo + self.batch_size])
                loss = torch.mean((self.net(x[idx]) - y[idx]) ** 2)
                opt.zero_grad()
                loss.backward()
                opt.step()
            if val is not None:
                with torch.no_grad():
                    v = float(torch.mean((self.net(val[0]) - val[1]) ** 2))
                if v < best:
                    best, bad, best_state = v, 0, {k: t.clone() for k, t in self.net.state_dict().items()}
                else:
                    bad += 1
                    if bad >= self.patience:
                        break
        if best_state is not None:
            self.net.load_state_dict(best_state)

    def learn_many(self, rows: np.ndarray, ticks: np.ndarray, values: np.ndarray,
                   filled: np.ndarray | None = None) -> None:
        self.resize(int(rows.max()) + 1)
        self.hist_[rows, ticks % self.ring] = values
        self.last_tick_[rows] = ticks
        self.seen_[rows] += 1
        w = self.lookback + self.horizon
        if not self.fitted_:
            warm = rows[self.seen_[rows] >= self.warm_start]
            if warm.size:
                self._warm_fit(warm)
            return
        self.pending_[rows[self.seen_[rows] >= w]] += 1
        due = rows[self.pending_[rows] >= self.every]
        if due.size:
            x, y = self._windows(due, self.every)
            self._train(x, y, self.refit_epochs)
            self.pending_[due] = 0

    def _warm_fit(self, rows: np.ndarray) -> None:
        n_train = int(round(self.warm_start * 0.8))
        lo = self.last_tick_[rows, None] - self.warm_start + 1
        history = self.hist_[rows[:, None], (lo + np.arange(self.warm_start)) % self.ring]
        self.mean_[rows] = history[:, :n_train].mean(axis=1)
        std = history[:, :n_train].std(axis=1)
        self.scale_[rows] = np.where(std > 0, std, 1.0)
        w = self.lookback + self.horizon
        z = (history - self.mean_[rows, None]) / self.scale_[rows, None]
        starts = np.arange(self.warm_start - w + 1)
        windows = z[:, starts[:, None] + np.arange(w)]  # (rows, windows, w)
        is_val = starts + w > n_train
        train = torch.from_numpy(windows[:, ~is_val].reshape(-1, w).astype(np.float32))
        val = torch.from_numpy(windows[:, is_val].reshape(-1, w).astype(np.float32))
        self._train(train[:, : self.lookback], train[:, self.lookback :], self.epochs,
                    (val[:, : self.lookback], val[:, self.lookback :]))
        self.fitted_ = True

    def forecast_many(self, rows: np.ndarray, horizon: int) -> np.ndarray:
        out = np.full((rows.size, horizon), np.nan)
        if not self.fitted_:
            return out
        ticks = self.last_tick_[rows, None] - self.lookback + 1 + np.arange(self.lookback)
        z = (self.hist_[rows[:, None], ticks % self.ring] - self.mean_[rows, None]) / self.scale_[rows, None]
        with torch.inference_mode():
            y = self.net(torch.from_numpy(z.astype(np.float32))).numpy()
        out[:, : self.horizon] = y[:, :horizon] * self.scale_[rows, None] + self.mean_[rows, None]
        return out

    def export_rows(self, rows: np.ndarray) -> ArrayDict:  # the bench never moves series
        return {}

    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        self.resize(int(rows.max()) + 1 if rows.size else 0)


# -- running the models ---------------------------------------------------------------------------------------


def make_models(names: list[str], seed: int, cfc: dict[str, Any]) -> list[BatchForecaster]:
    common = dict(horizon=HORIZON, warm_start=WARM_START, seed=seed, defer=False, step_budget=60.0)
    models: list[BatchForecaster] = []
    for name in names:
        if name.startswith("cfc-"):
            model = build_cfc(mode=name.removeprefix("cfc-"), **{**common, **cfc})  # members=K: an ensemble
        elif name.startswith("mlp-b"):
            model = IncrementalMLP(HORIZON, every=int(name.removeprefix("mlp-b")), seed=seed)
        elif name == "cyclenet-online":
            model = CycleNetForecaster(lookback=96, cycle=None, online=True, **common)
        elif name == "seasonal-naive":
            model = SeasonalNaive(period=24)
        else:
            raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
        model.name = name
        models.append(model)
    return models


def lane_labels(models: list[BatchForecaster]) -> list[str]:
    """The config's ``ALIAS=MODEL`` lane names: each lane's alias and its class's registry name. The engine is
    handed its lanes ready-made, so the config's names only label them; it still checks each against the registry,
    where this file's own MLP has no name and is labelled as the seasonal-naive model it is compared with."""
    return [f"{m.name}={type(m).name if type(m).name in MODELS_REGISTRY else 'seasonal-naive'}" for m in models]


def forecasts(loads: np.ndarray, t_f: int, failed: int | None, models: list[BatchForecaster],
              ticks_per_batch: int = 24) -> dict[str, np.ndarray]:
    """Stream the loads hour by hour through one engine; each model's forecasts by origin (T, H, links)."""
    lanes = [Lane(m, make_calibrator(DEFAULT_CALIBRATOR, HORIZON, 0.1), HORIZON, 0.1) for m in models]
    engine = Engine(EngineConfig(horizon=HORIZON, models=lane_labels(models), freq="1h"), lanes)
    n_ticks, n_links = loads.shape
    ids = np.array([f"link-{k:02d}" for k in range(n_links)], dtype=object)
    preds = {m.name: np.full((n_ticks, HORIZON, n_links), np.nan) for m in models}
    for lo in range(0, n_ticks, ticks_per_batch):
        ticks = np.arange(lo, min(lo + ticks_per_batch, n_ticks))
        alive = np.ones((ticks.size, n_links), dtype=bool)
        if failed is not None:
            alive[ticks >= t_f, failed] = False  # a failed link sends nothing more
        tick_of, link_of = np.nonzero(alive)
        batch = ObservationBatch(ids[link_of], T0 + ticks[tick_of] * HOUR, loads[ticks[tick_of], link_of])
        out = engine.process(batch).forecasts
        engine.maintenance()
        if not len(out):
            continue
        origin = (out.issued_at_ns - T0) // HOUR
        link = np.array([int(s[5:]) for s in out.series_id])
        for name, pred in preds.items():
            m = out.model == name
            pred[origin[m], out.h[m] - 1, link[m]] = out.mean[m]
    return preds


def score(loads: np.ndarray, pred: np.ndarray, t_f: int, scored: np.ndarray, h: int) -> dict[str, float]:
    """rmse_before, rmse_after, smape_after and converge_steps of one model at horizon h (module docstring)."""
    def errors(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f = pred[targets[:, None] - h, h - 1, scored[None, :]]
        y = loads[targets[:, None], scored[None, :]]
        if np.isnan(f).any():
            raise RuntimeError(f"{int(np.isnan(f).sum())} scored forecasts missing (h={h})")
        return f, y

    f_b, y_b = errors(np.arange(t_f - BEFORE, t_f))
    f_a, y_a = errors(np.arange(t_f, t_f + SCORED))
    before = float(np.sqrt(np.mean((f_b - y_b) ** 2)))
    sq = ((f_a - y_a) ** 2).mean(axis=1)  # per step, over links
    denom = np.abs(y_a) + np.abs(f_a)
    smape = np.where(denom > 0, 200 * np.abs(f_a - y_a) / np.where(denom > 0, denom, 1), 0.0)
    rolling = np.sqrt(np.convolve(sq, np.ones(24) / 24, mode="valid"))  # RMSE of steps [s, s + 24)
    back = np.flatnonzero(rolling <= 1.1 * before)
    return {"rmse_before": before, "rmse_after": float(np.sqrt(sq.mean())), "smape_after": float(smape.mean()),
            "converge_steps": int(back[0]) if back.size else SCORED}


def run_seed(seed: int, variants: list[str], names: list[str], cfc: dict[str, Any], threads: int) -> dict[str, Any]:
    """Every model on both variants of one seed: {variant: {h: {model: metrics}}} plus timings."""
    torch.set_num_threads(threads)
    out: dict[str, Any] = {"seed": seed}
    for variant in variants:
        sim = simulate(seed, variant)
        began = time.perf_counter()
        preds = forecasts(sim["loads"], sim["t_f"], sim["failed"] if variant == "drastic" else None,
                          make_models(names, seed, cfc))
        out[variant] = {str(h): {name: score(sim["loads"], p, sim["t_f"], sim["scored"], h)
                                 for name, p in preds.items()} for h in HORIZONS}
        out[variant]["seconds"] = time.perf_counter() - began
        out[variant]["share"] = sim["share"]
        out[variant]["floor"] = noise_floor(sim)
    return out


def summarise(runs: list[dict[str, Any]], variants: list[str], names: list[str]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for variant in variants:
        result[variant] = {}
        for h in map(str, HORIZONS):
            per = {name: [r[variant][h][name] for r in runs] for name in names}
            winners = [min(names, key=lambda n, r=r: r[variant][h][n]["rmse_after"]) for r in runs]
            result[variant][h] = {
                name: {**{k: float(np.mean([m[k] for m in per[name]]))
                          for k in ("rmse_before", "rmse_after", "smape_after", "converge_steps")},
                       "wins": winners.count(name) / len(runs)}
                for name in names
            }
    result["seeds"] = len(runs)
    return result


def print_tables(summary: dict[str, Any], runs: list[dict[str, Any]], variants: list[str]) -> None:
    for variant in variants:
        seconds = np.mean([r[variant]["seconds"] for r in runs])
        floor = {k: np.mean([r[variant]["floor"][k] for r in runs]) for k in ("before", "after")}
        print(f"\n{variant}: {len(runs)} seeds ({', '.join(str(r['seed']) for r in runs)}), "
              f"{seconds:.0f} s of streaming per seed; noise floor (RMSE of the noise-free load) "
              f"{floor['before']:.4f} before, {floor['after']:.4f} after")
        for h, table in summary[variant].items():
            print(f"  h = {h}")
            print(f"    {'model':<16} {'rmse_before':>11} {'rmse_after':>10} {'smape_after':>11} "
                  f"{'converge':>8} {'wins':>5}")
            for name, m in sorted(table.items(), key=lambda kv: kv[1]["rmse_after"]):
                print(f"    {name:<16} {m['rmse_before']:>11.4f} {m['rmse_after']:>10.4f} {m['smape_after']:>10.2f}%"
                      f" {m['converge_steps']:>8.1f} {m['wins']:>5.2f}")
        print_claims(runs, variant)


def print_claims(runs: list[dict[str, Any]], variant: str) -> None:
    """Per-seed counts behind the done-when points (h = 1): cfc-online against frozen, naive and the MLPs."""
    cells = [r[variant]["1"] for r in runs]
    names = set(cells[0])
    if "cfc-online" not in names:
        return
    online = [c["cfc-online"] for c in cells]
    if {"cfc-frozen", "seasonal-naive"} <= names:
        beats = sum(o["rmse_after"] < min(c["cfc-frozen"]["rmse_after"], c["seasonal-naive"]["rmse_after"])
                    for o, c in zip(online, cells, strict=True))
        print(f"  h = 1: cfc-online's rmse_after below cfc-frozen's and seasonal-naive's in {beats}/{len(runs)} seeds")
    mlps = sorted(n for n in names if n.startswith("mlp-"))
    if "mlp-b384" in names:
        faster = sum(o["converge_steps"] < c["mlp-b384"]["converge_steps"] for o, c in zip(online, cells, strict=True))
        print(f"  h = 1: cfc-online converges faster than mlp-b384 in {faster}/{len(runs)} seeds")
    if mlps:
        as_fast = sum(o["converge_steps"] <= min(c[m]["converge_steps"] for m in mlps)
                      for o, c in zip(online, cells, strict=True))
        print(f"  h = 1: cfc-online converges at least as fast as the fastest MLP in {as_fast}/{len(runs)} seeds")


def serving_cost(n_series: int = 1000, repeats: int = 50) -> dict[str, float]:
    """Median seconds of one batched cfc round for ``n_series`` series - the cell step (``learn_many``) and the
    H-step forecast (``forecast_many``) - against seasonal naive's forecast of the same rows, measured in the same
    run; and cfc's own per-series state (``export_rows`` without the history ring) in bytes."""
    torch.set_num_threads(1)
    model = CfCForecaster(horizon=HORIZON, warm_start=WARM_START, mode="frozen", defer=False, **{**CFC, "epochs": 1})
    naive = SeasonalNaive(period=24)
    naive.resize(n_series)
    rows = np.arange(n_series)
    t = np.arange(WARM_START + 24)
    values = 50 + 10 * np.sin(2 * np.pi * (t[:, None] + rows[None, :]) / 24)
    for k in t:
        model.learn_many(rows, np.full(n_series, k), values[k])
        naive.learn_many(rows, np.full(n_series, k), values[k])

    def median(call) -> float:
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            call()
            times.append(time.perf_counter() - began)
        return float(np.median(times))

    tick = iter(range(int(t[-1]) + 1, int(t[-1]) + 10 * repeats))
    state = model.export_rows(rows[:1])
    return {
        "cfc_forecast": median(lambda: model.forecast_many(rows, HORIZON)),
        "cfc_learn": median(lambda: model.learn_many(rows, np.full(n_series, next(tick)), values[-1])),
        "naive_forecast": median(lambda: naive.forecast_many(rows, HORIZON)),
        "state_bytes": float(sum(v.nbytes for k, v in state.items() if not k.startswith("history"))),
    }


def print_cost(cost: dict[str, float], n_series: int) -> None:
    base = cost["naive_forecast"]
    print(f"\nserving cost, {n_series} series, one thread (median of 50 calls)")
    print(f"    {'call':<42} {'ms':>8} {'x naive':>8}")
    for key, label in (("naive_forecast", "seasonal-naive forecast_many (baseline)"),
                       ("cfc_forecast", "cfc forecast_many, H = 12 from the states"),
                       ("cfc_learn", "cfc learn_many: one cell step of every state")):
        print(f"    {label:<42} {1e3 * cost[key]:>8.3f} {cost[key] / base:>8.1f}")
    print(f"    cfc's own state per series (export_rows without the history ring): {cost['state_bytes']:.0f} bytes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10,
                        help="number of seeds (failure link and time); 0: only the serving-cost table")
    parser.add_argument("--dev", action="store_true", help=f"dev seeds ({DEV_SEED0}, ...) to choose settings on")
    parser.add_argument("--variants", default="drastic,moderate")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--cfc", action="append", default=[], metavar="KEY=VALUE",
                        help="override a cfc setting (JSON value), e.g. online_lr=0.003")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--cost-series", type=int, default=1000, help="series in the serving-cost table (0: skip)")
    parser.add_argument("--runs-json", metavar="PATH", help="also write every seed's metrics to this file")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parser.parse_args(argv)
    cfc = dict(CFC)
    for item in args.cfc:
        key, _, value = item.partition("=")
        cfc[key] = json.loads(value)
    if args.seeds == 0:  # the serving-cost table alone
        print_cost(serving_cost(args.cost_series or 1000), args.cost_series or 1000)
        return 0
    variants, names = args.variants.split(","), args.models.split(",")
    seeds = [(DEV_SEED0 if args.dev else 0) + i for i in range(args.seeds)]
    began = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            job = partial(run_seed, variants=variants, names=names, cfc=cfc, threads=args.threads)
            runs = list(pool.map(job, seeds))
    else:
        runs = [run_seed(s, variants, names, cfc, args.threads) for s in seeds]
    summary = summarise(runs, variants, names)
    if args.runs_json:
        with open(args.runs_json, "w") as out:
            json.dump({"cfc": cfc, "runs": runs}, out)
    print(f"link failure bench: {N_NODES} nodes, {N_LINKS} links, horizons {HORIZONS}, "
          f"{'dev' if args.dev else 'scored'} seeds, cfc {cfc}; {time.perf_counter() - began:.0f} s")
    print_tables(summary, runs, variants)
    if args.cost_series:
        print_cost(serving_cost(args.cost_series), args.cost_series)
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
