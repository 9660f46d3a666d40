"""Irregular sampling on ETTh2: the liquid CfC (Δt-aware) against CycleNet (gap-filled) with 30 % of values missing.

The online protocol's data and split (DSOF, Lau et al., ICLR 2025; see ../shared/reference/anchors.md): ETTh2
rows [0, 14400), all 7 channels, each a series; train [0, 2880), validation [2880, 3600), online test [3600,
14400); MSE on the scale of a StandardScaler fitted on the train rows. H = 24.

Every model runs as a lane of one engine (:class:`tidecast.stream.engine.Engine`, the object ``replay`` and
``serve`` run), rows fed hour by hour in batches of a day, twice:

* **complete** - every value arrives;
* **missing** - 30 % of the (row, channel) values never arrive, the same removal for every model (seed
  ``--seed``): half in bursts (start uniform, length uniform in 1..12 steps) drawn until 15 % are gone, the
  other half drawn uniformly from the values left. The engine fills a gap by linear interpolation before the
  next value (``max_gap`` is set above the longest gap, so no series is reset): CycleNet learns the filled
  ticks, ``cfc`` skips them and advances its state by the real time since the previous value.

Models, both warm-started when 3,600 ticks have passed (train + validation rows, the last 20 % for early
stopping) and then learning online:

* ``cfc`` - :class:`tidecast.models.liquid.CfCForecaster`, settings in ``CFC``, chosen with ``--dev``;
* ``cyclenet-online`` - :class:`tidecast.models.cyclenet.CycleNetForecaster`, lookback 96 (the protocol's L),
  cycle detected at the warm start, its default online replay (not tuned here).

``--dev`` runs the same protocol one block earlier: warm start on [0, 2880) (its last 20 % for early stopping),
scored on the validation rows [2880, 3600). Settings were chosen there only, never on the test rows.

Scoring: a forecast issued after row ``o`` covers rows ``o + 1 .. o + 24``; origins are the rows from the
warm-start end - 1 on whose 24 targets are in the stream. Errors are taken against the complete data (a
missing value is still a target). Both JSON figures are on the (origin, channel) cells where the value at ``o``
arrived - a forecast is only issued on an observation - and every model has a forecast: ``mse_complete`` the
complete run's, ``mse_missing`` the run with values removed, so ``mse_missing / mse_complete - 1`` is the growth
on equal footing; ``origins_kept`` is those cells' share of all (origin, channel) cells. The table also shows
the complete run's MSE over every cell ("MSE complete"; "same cells" is the JSON's ``mse_complete``).

Runtime: two engine passes over 14,400 rows x 7 series, one torch thread each, about 6.5 CPU-minutes a pass
(cfc takes one replay step a round); ``--jobs 2`` runs them side by side (35 min of wall time on a 2-core
machine shared with other jobs), ``--dev`` takes about a quarter of that.

    .venv/bin/python bench/irregular.py [--json]
    .venv/bin/python bench/irregular.py --dev --cfc lookback=48
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cyclenet_etth import DATA_DIR, ETT  # noqa: E402

from tidecast.models.cyclenet import CycleNetForecaster  # noqa: E402
from tidecast.models.liquid import build as build_cfc  # noqa: E402
from tidecast.monitors.conformal import DEFAULT_CALIBRATOR, make_calibrator  # noqa: E402
from tidecast.stream.batch import ObservationBatch  # noqa: E402
from tidecast.stream.config import EngineConfig  # noqa: E402
from tidecast.stream.engine import Engine, Lane  # noqa: E402

TRAIN_END, VAL_END, TEST_END = 2880, 3600, 14400  # the online protocol's split
HORIZON = 24
MISSING, BURST_SHARE, MAX_BURST = 0.30, 0.5, 12
MODELS = ("cfc", "cyclenet-online")

#: cfc's settings, chosen on the --dev split (validation rows only); see the README's irregular-sampling section.
#: The blend with the last value (persistence_half_life, models/persistence.py; 2026-12-02, dev seeds 0 / 1 / 2):
#: complete MSE 0.766 / 0.837 / 0.794 and growth +2.6 / -1.3 / +3.9 % with it, against growth -11.2 / +14.2 /
#: +6.5 % without (CycleNet +3.1 / +1.8 / +1.7 %; with the blend too +5.8 / +1.3 / +3.4 %). Its half-life is the
#: one bench/retrain.py chose on its own dev data, not tuned here.
#: input_dropout=0.5 (training windows lose inputs at random, models/liquid.py; 2026-12-03, dev seeds 0-5, with the
#: blend): growth -4.4 / +1.4 / +2.3 / -1.5 / +7.6 / -0.5 % (mean +0.8, below CycleNet's in 5 of 6) against
#: +2.6 / -1.3 / +3.9 / +7.6 / +8.0 / -1.8 % without (mean +3.2, 3 of 6); CycleNet +3.1 / +1.8 / +1.7 / +1.3 /
#: +3.5 / +5.7 % (mean +2.9). Two networks averaged (members=2, blended around their mean) grew +0.0 / +4.3 / +3.6
#: / +3.5 / +7.8 / +5.8 % (mean +4.2): lower errors, not a smaller growth, so not taken.
CFC: dict[str, Any] = dict(lookback=48, units=32, backbone_units=64, periods=(24, 168), skip=True, epochs=10,
                           lr=0.005, online_lr=1e-3, online_huber=1.0, replay_window=168, replay_steps=1,
                           replay_batch=128, persistence_half_life=168, input_dropout=0.5)
#: CycleNet: the protocol's lookback; the online replay is the class default.
CYCLENET: dict[str, Any] = dict(lookback=96)


class Split:
    """Rows of one run: warm start when ``warm`` ticks have passed, stream to ``end``, scored origins."""

    def __init__(self, dev: bool) -> None:
        self.train_end = int(round(TRAIN_END * 0.8)) if dev else TRAIN_END  # the scaler's rows
        self.warm = TRAIN_END if dev else VAL_END
        self.end = VAL_END if dev else TEST_END
        self.origins = np.arange(self.warm - 1, self.end - HORIZON)


def removal(n_rows: int, n_series: int, seed: int) -> np.ndarray:
    """Boolean ``(n_rows, n_series)``, True where a value is removed: ``MISSING`` of all, half of it in bursts of
    1..``MAX_BURST`` steps, the rest uniformly among the values left but those next to a burst. A burst that would
    overlap or touch an earlier one is drawn again: merged, bursts made gaps longer than ``MAX_BURST`` (up to 48
    steps before this rule), and so did random removals beside them."""
    rng = np.random.default_rng(seed)
    gone = np.zeros((n_rows, n_series), dtype=bool)
    total = int(round(MISSING * gone.size))
    while gone.sum() < BURST_SHARE * total:
        series, start, length = rng.integers(n_series), rng.integers(n_rows), rng.integers(1, MAX_BURST + 1)
        if gone[max(start - 1, 0) : start + length + 1, series].any():
            continue
        gone[start : start + length, series] = True
    beside = np.zeros_like(gone)  # values next to a burst: removed at random, they would lengthen it
    beside[1:] |= gone[:-1]
    beside[:-1] |= gone[1:]
    left = np.flatnonzero(~gone & ~beside)
    gone.flat[rng.choice(left, size=total - int(gone.sum()), replace=False)] = True
    return gone


def longest_gap(gone: np.ndarray) -> int:
    longest = 0
    for col in gone.T:
        run = 0
        for g in col:
            run = run + 1 if g else 0
            longest = max(longest, run)
    return longest


def make_lanes(split: Split, cfc: dict[str, Any], seed: int, cyclenet: dict[str, Any] | None = None) -> list[Lane]:
    common = dict(horizon=HORIZON, warm_start=split.warm, val_fraction=0.2, seed=seed, defer=False,
                  step_budget=60.0)  # a generous budget: every due replay step is taken, the run is repeatable
    liquid = build_cfc(**{"mode": "online", **common, **cfc})  # --cfc mode="frozen" overrides; members=K: ensemble
    cyclenet = CycleNetForecaster(**{"online": True, **common, **(CYCLENET if cyclenet is None else cyclenet)})
    cyclenet.name = "cyclenet-online"
    return [Lane(m, make_calibrator(DEFAULT_CALIBRATOR, HORIZON, 0.1), HORIZON, 0.1) for m in (liquid, cyclenet)]


def stream(ett: ETT, split: Split, gone: np.ndarray | None, cfc: dict[str, Any], seed: int,
           threads: int = 1, cyclenet: dict[str, Any] | None = None) -> dict[str, Any]:
    """Feed rows [0, end) (without the ``gone`` values) through one engine; each model's forecasts
    ``(origins, H, channels)`` (NaN where none was issued) and the engine's gap counts."""
    torch.set_num_threads(threads)
    lanes = make_lanes(split, cfc, seed, cyclenet)
    max_gap = HORIZON if gone is None else max(HORIZON, longest_gap(gone[: split.end]) + 1)
    engine = Engine(EngineConfig(horizon=HORIZON, models=["cfc", "cyclenet-online=cyclenet"], freq="1h",
                                 max_gap=max_gap), lanes)
    n_ch = len(ett.columns)
    ids = np.array([f"{ett.name}/{c}" for c in ett.columns], dtype=object)
    channel = {sid: i for i, sid in enumerate(ids)}
    stamps = ett.timestamps.astype("datetime64[ns]").astype(np.int64)
    step = int(stamps[1] - stamps[0])
    preds = {name: np.full((split.origins.size, HORIZON, n_ch), np.nan) for name in MODELS}
    kept = np.ones((split.end, n_ch), dtype=bool) if gone is None else ~gone[: split.end]
    offsets = np.arange(split.end * n_ch).reshape(split.end, n_ch)
    filled = resets = 0
    began = time.perf_counter()
    for lo in range(0, split.end, 24):
        hi = min(lo + 24, split.end)
        k = kept[lo:hi]
        batch = ObservationBatch(
            series_ids=np.tile(ids, hi - lo)[k.ravel()], timestamps_ns=np.repeat(stamps[lo:hi], n_ch)[k.ravel()],
            values=ett.values[lo:hi][k], offsets=offsets[lo:hi][k],
        )
        result = engine.process(batch)
        filled, resets = filled + result.n_gap_filled, resets + result.n_resets
        out = result.forecasts
        if not len(out) or hi <= split.origins[0]:
            continue
        origin = (out.issued_at_ns - stamps[0]) // step - split.origins[0]
        keep = (origin >= 0) & (origin < split.origins.size)
        if not keep.any():
            continue
        chan = np.array([channel[s] for s in out.series_id[keep]])
        for name in MODELS:
            m = (out.model[keep] == name)
            preds[name][origin[keep][m], out.h[keep][m] - 1, chan[m]] = out.mean[keep][m]
    return {"preds": preds, "gap_filled": int(filled), "resets": int(resets), "max_gap": max_gap,
            "seconds": time.perf_counter() - began}


def errors(ett: ETT, split: Split, pred: np.ndarray) -> np.ndarray:
    """Squared errors ``(origins, H, channels)`` on the train-standardised scale, against the complete data."""
    train = ett.values[: split.train_end]
    mean, std = train.mean(axis=0), train.std(axis=0)
    rows = split.origins[:, None] + 1 + np.arange(HORIZON)
    return (((pred - mean) / std - (ett.values[rows] - mean) / std) ** 2)


def run_pass(args: tuple[str, bool, bool, int, dict[str, Any], int, dict[str, Any]]) -> dict[str, Any]:
    path, dev, missing, seed, cfc, threads, cyclenet = args
    ett = ETT(path)
    split = Split(dev)
    gone = removal(TEST_END, len(ett.columns), seed) if missing else None
    return stream(ett, split, gone, cfc, seed, threads, cyclenet)


def evaluate(path: str, dev: bool, seed: int, cfc: dict[str, Any], jobs: int, threads: int,
             cyclenet: dict[str, Any] | None = None) -> dict[str, Any]:
    ett = ETT(path)
    split = Split(dev)
    gone = removal(TEST_END, len(ett.columns), seed)
    passes = [(path, dev, missing, seed, cfc, threads, CYCLENET if cyclenet is None else cyclenet)
              for missing in (False, True)]
    if jobs > 1:
        with ProcessPoolExecutor(2) as pool:
            complete, missing = pool.map(run_pass, passes)
    else:
        complete, missing = map(run_pass, passes)
    arrived = ~gone[split.origins]  # (origins, channels): a forecast is issued on an observation only
    have = arrived.copy()
    for name in MODELS:
        have &= np.isfinite(missing["preds"][name]).all(axis=1)
    results = {}
    for name in MODELS:
        full = errors(ett, split, complete["preds"][name])
        if np.isnan(full).any():
            raise RuntimeError(f"{name}: {np.isnan(full).any(axis=(1, 2)).sum()} origins without a forecast "
                               "on the complete data")
        miss = errors(ett, split, missing["preds"][name])
        results[name] = {
            "mse_complete": float(full.mean()),
            "mse_missing": float(miss.transpose(0, 2, 1)[have].mean()),
            "origins_kept": float(have.mean()),
            "mse_complete_same_cells": float(full.transpose(0, 2, 1)[have].mean()),
        }
    return {"results": results, "name": ett.name, "origins": int(split.origins.size),
            "removed": float(gone[: split.end].mean()), "longest_gap": longest_gap(gone[: split.end]),
            "complete": _meta(complete), "missing": _meta(missing)}


def _meta(run: dict[str, Any]) -> dict[str, Any]:
    return {k: run[k] for k in ("gap_filled", "resets", "max_gap", "seconds")}


def print_table(report: dict[str, Any], dev: bool, cfc: dict[str, Any]) -> None:
    m = report["missing"]
    rows = "dev split (score [2880, 3600))" if dev else "online test [3600, 14400)"
    print(f"{report['name']} H={HORIZON}, {rows}, "
          f"{report['origins']} origins x 7 channels; {100 * report['removed']:.1f} % removed (longest gap "
          f"{report['longest_gap']}), {m['gap_filled']} ticks gap-filled, {m['resets']} resets; passes "
          f"{report['complete']['seconds']:.0f} s + {m['seconds']:.0f} s; cfc {cfc}")
    print(f"    {'model':<16} {'MSE complete':>12} {'same cells':>11} {'30% missing':>12} {'growth':>8} "
          f"{'kept':>6}")
    for name, r in report["results"].items():
        growth = r["mse_missing"] / r["mse_complete_same_cells"] - 1
        print(f"    {name:<16} {r['mse_complete']:>12.4f} {r['mse_complete_same_cells']:>11.4f} "
              f"{r['mse_missing']:>12.4f} {100 * growth:>7.1f}% {r['origins_kept']:>6.3f}")


def overrides(settings: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """``settings`` with each ``KEY=VALUE`` (JSON value) of ``items`` applied."""
    out = dict(settings)
    for item in items:
        key, _, value = item.partition("=")
        out[key] = json.loads(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DATA_DIR / "ETTh2.csv"))
    parser.add_argument("--dev", action="store_true", help="score the validation rows (to choose settings on)")
    parser.add_argument("--seed", type=int, default=0, help="the removal and the models' seed")
    parser.add_argument("--cfc", action="append", default=[], metavar="KEY=VALUE",
                        help="override a cfc setting (JSON value), e.g. lookback=24")
    parser.add_argument("--cyclenet", action="append", default=[], metavar="KEY=VALUE",
                        help="override a CycleNet setting (JSON value), e.g. persistence_half_life=168")
    parser.add_argument("--jobs", type=int, default=1, help="2: the complete and the missing pass in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per pass")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parser.parse_args(argv)
    cfc, cyclenet = overrides(CFC, args.cfc), overrides(CYCLENET, args.cyclenet)
    report = evaluate(args.data, args.dev, args.seed, cfc, args.jobs, args.threads, cyclenet)
    print_table(report, args.dev, cfc)
    if args.json:
        # the cells for both figures: origins where the observation arrived and every model forecast, so
        # mse_missing / mse_complete - 1 is the growth (the table's "MSE complete" column is over every cell)
        print(json.dumps({name: {"mse_complete": r["mse_complete_same_cells"], "mse_missing": r["mse_missing"],
                                 "origins_kept": r["origins_kept"]} for name, r in report["results"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
