"""CycleNet through the streaming engine on ETTh1/ETTh2: static vs learning online, on the paper's test windows.

Every ETT channel is a series. The engine (:class:`tidecast.stream.engine.Engine`, the object ``replay`` and ``serve``
run) receives rows [0, 14400) hour by hour, with three lanes side by side:

* ``cyclenet-static`` — warm-started exactly as the batch protocol: when the first 11,520 rows have arrived,
  the model is fitted on rows [0, 8640) with early stopping on [8640 - L, 11520) (the paper's splits, scaler
  and recipe, validation scored as bench/cyclenet_paper.py does: ``--val official`` by default) and then
  frozen;
* ``cyclenet-online`` — the same fit, then learning online: every completed (input, target) window joins a
  replay buffer (seeded with the warm-start history, so the validation rows are learned right away) and
  replay steps are taken as the test rows arrive;
* ``seasonal-naive`` — the value 24 hours earlier.

Scored exactly like the paper: the H=96 forecasts issued after rows 11519 ... 14303 (2,785 origins for L=96),
all steps and channels, on the train-standardised scale. The batch number for the same seed (the model trained
directly, as bench/cyclenet_paper.py does) is printed beside the static one.

``--dev`` runs the same protocol one validation block earlier (fit on [0, 8640) with its last quarter as
validation, score [8640 - L, 11520)) - the split used to choose the online-learning settings, never the test.

    python bench/cyclenet_stream.py --data ../shared/data/ETTh1.csv --horizon 96 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cyclenet_etth import DATA_DIR, ETT, PAPER, TEST_END, TRAIN_END, VAL_END  # noqa: E402

from tidecast.models.cyclenet import CycleNetForecaster  # noqa: E402
from tidecast.models.cyclenet_net import DEFAULT_LR, BatchFit, Windows, evaluate  # noqa: E402
from tidecast.models.cyclenet_net import build as build_net  # noqa: E402
from tidecast.models.naive import SeasonalNaive  # noqa: E402
from tidecast.monitors.conformal import DEFAULT_CALIBRATOR, make_calibrator  # noqa: E402
from tidecast.stream.batch import ObservationBatch  # noqa: E402
from tidecast.stream.config import EngineConfig  # noqa: E402
from tidecast.stream.engine import Engine, Lane  # noqa: E402

#: Online-learning settings, chosen on the --dev splits of ETTh1 and ETTh2 (never on the test windows): replay
#: over the whole history (16,384 windows per series > the rows streamed), a slow backbone and a faster cycle
#: table, two steps per hour. Recent-only buffers and faster backbones hurt on both dev splits.
ONLINE = dict(online_lr=3e-5, online_cycle_lr=3e-3, replay_window=16384, replay_every=1, replay_steps=2,
              replay_batch=256, step_budget=1.0)


class Protocol:
    """Row ranges of one run: warm start on [0, warm), scored origins (rows after which forecasts count)."""

    def __init__(self, dev: bool, lookback: int, horizon: int) -> None:
        self.warm = TRAIN_END if dev else VAL_END
        self.end = VAL_END if dev else TEST_END
        self.train_end = int(round(self.warm * 0.75))  # 6480 in dev, 8640 on the test protocol
        # the forecast issued after row o has input rows (o - L, o] and target rows (o, o + H]
        self.origins = np.arange(self.warm - 1, self.end - horizon)
        self.lookback, self.horizon = lookback, horizon


def make_lanes(ett: ETT, proto: Protocol, backbone: str, seed: int, cycle: int | None,
               online: dict[str, Any], shuffled_val: bool) -> list[Lane]:
    common = dict(horizon=proto.horizon, lookback=proto.lookback, cycle=cycle, backbone=backbone,
                  warm_start=proto.warm, val_fraction=0.25, seed=seed, defer=False, shuffled_val=shuffled_val)
    static = CycleNetForecaster(online=False, **common)
    static.name = "cyclenet-static"
    learner = CycleNetForecaster(online=True, **common, **online)
    learner.name = "cyclenet-online"
    models = [static, learner, SeasonalNaive(period=24)]
    return [Lane(m, make_calibrator(DEFAULT_CALIBRATOR, proto.horizon, 0.1), proto.horizon, 0.1) for m in models]


def stream(ett: ETT, proto: Protocol, lanes: list[Lane], ticks_per_batch: int = 24) -> dict[str, np.ndarray]:
    """Feed rows [0, end) through an engine; return each lane's scored forecasts (origins, H, channels)."""
    aliases = [lane.name if lane.name == "seasonal-naive" else f"{lane.name}=cyclenet" for lane in lanes]
    engine = Engine(EngineConfig(horizon=proto.horizon, models=aliases, freq="1h"), lanes)
    ids = np.array([f"{ett.name}/{c}" for c in ett.columns], dtype=object)
    channel = {sid: i for i, sid in enumerate(ids)}
    stamps = ett.timestamps.astype("datetime64[ns]").astype(np.int64)
    step = int(stamps[1] - stamps[0])
    first_origin = proto.origins[0]
    preds = {lane.name: np.full((proto.origins.size, proto.horizon, len(ids)), np.nan) for lane in lanes}
    n_ch = len(ids)
    for lo in range(0, proto.end, ticks_per_batch):
        hi = min(lo + ticks_per_batch, proto.end)
        batch = ObservationBatch(
            series_ids=np.tile(ids, hi - lo), timestamps_ns=np.repeat(stamps[lo:hi], n_ch),
            values=ett.values[lo:hi].ravel(), offsets=np.arange(lo * n_ch, hi * n_ch),
        )
        out = engine.process(batch).forecasts
        engine.maintenance()
        if not len(out) or hi <= first_origin:
            continue
        origin = (out.issued_at_ns - stamps[0]) // step - first_origin
        keep = (origin >= 0) & (origin < proto.origins.size)
        if not keep.any():
            continue
        chan = np.array([channel[s] for s in out.series_id[keep]])
        for name in preds:
            m = keep & (out.model == name)
            preds[name][origin[m], out.h[m] - 1, chan[m[keep]]] = out.mean[m]
    return preds


def score(ett: ETT, proto: Protocol, pred: np.ndarray) -> tuple[float, float]:
    """MSE / MAE on the scale of a StandardScaler fitted on the protocol's training rows."""
    train = ett.values[: proto.train_end]
    mean, std = train.mean(axis=0), train.std(axis=0)
    rows = proto.origins[:, None] + 1 + np.arange(proto.horizon)
    true = (ett.values[rows] - mean) / std
    err = (pred - mean) / std - true
    if np.isnan(err).any():
        raise RuntimeError(f"{np.isnan(err).any(axis=(1, 2)).sum()} scored origins have no forecast")
    return float((err**2).mean()), float(np.abs(err).mean())


def batch_reference(ett: ETT, proto: Protocol, backbone: str, seed: int, cycle: int, shuffled_val: bool) -> float:
    """The same fit done directly on the network (bench/cyclenet_paper.py's path), scored on the same windows."""
    train = ett.values[: proto.train_end]
    std = (ett.values - train.mean(axis=0)) / train.std(axis=0)
    lb, h = proto.lookback, proto.horizon

    def windows(lo: int, hi: int) -> Windows:
        return Windows.contiguous(std[lo:hi], ett.ticks[lo:hi], cycle, lb, h)

    net = build_net(lb, h, cycle, std.shape[1], backbone, seed=seed)
    BatchFit(net, windows(0, proto.train_end), windows(proto.train_end - lb, proto.warm),
             lr=DEFAULT_LR[backbone], seed=seed, shuffled_val=shuffled_val).run()
    return evaluate(net, windows(proto.warm - lb, proto.end))[0]


def forecast_cost(model: CycleNetForecaster, n_series: int, repeats: int = 50) -> float:
    """Seconds for one batched forecast of ``n_series`` series (median), on a copy of a fitted model."""
    shared, meta = model.export_shared()
    rows = np.flatnonzero(model.ready_)  # the engine sizes tables in steps: some rows may be empty
    state = model.export_rows(rows)
    clone = CycleNetForecaster(**model.get_params())
    clone.import_shared(shared, meta)
    tiled = np.arange(n_series) % rows.size
    clone.import_rows(np.arange(n_series), {k: v[tiled] for k, v in state.items()})
    all_rows = np.arange(n_series)
    assert np.isfinite(clone.forecast_many(all_rows, model.horizon)).all()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        clone.forecast_many(all_rows, model.horizon)
        times.append(time.perf_counter() - began)
    return float(np.median(times))


def run(path: str, horizon: int, backbone: str, seed: int, lookback: int, dev: bool, cycle: int | None,
        online: dict[str, Any], n_series: int, shuffled_val: bool) -> dict[str, Any]:
    ett = ETT(path)
    proto = Protocol(dev, lookback, horizon)
    lanes = make_lanes(ett, proto, backbone, seed, cycle, online, shuffled_val)
    began = time.perf_counter()
    preds = stream(ett, proto, lanes)
    elapsed = time.perf_counter() - began
    scores = {name: score(ett, proto, p) for name, p in preds.items()}
    learner = lanes[1].model
    w = learner.cycle_
    paper = PAPER.get((ett.name, backbone, horizon), (float("nan"),))[0]
    return {
        "data": ett.name, "horizon": horizon, "backbone": backbone, "seed": seed, "dev": dev, "cycle": w,
        "static_mse": scores["cyclenet-static"][0], "online_mse": scores["cyclenet-online"][0],
        "paper_mse": float("nan") if dev else paper,
        "seasonal_naive_mse": scores["seasonal-naive"][0],
        "static_mae": scores["cyclenet-static"][1], "online_mae": scores["cyclenet-online"][1],
        "seasonal_naive_mae": scores["seasonal-naive"][1],
        "batch_mse": batch_reference(ett, proto, backbone, seed, w, shuffled_val), "shuffled_val": shuffled_val,
        "origins": int(proto.origins.size), "stream_seconds": elapsed,
        "forecast_us_per_series": 1e6 * forecast_cost(learner, n_series) / n_series,
        "forecast_series": n_series, "online_params": online,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", action="append", help="ETT csv (repeatable); default ETTh1 and ETTh2")
    parser.add_argument("--horizon", type=int, default=96)
    parser.add_argument("--backbone", choices=("linear", "mlp"), default="linear")
    parser.add_argument("--lookback", type=int, default=96)
    parser.add_argument("--cycle", type=int, default=0, help="0: detected at the warm start")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 2024, 2025, ... (results averaged)")
    parser.add_argument("--seed0", type=int, default=2024)
    parser.add_argument("--dev", action="store_true", help="score the validation block instead of the test")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="override an online-learning setting, e.g. online_lr=0.0005")
    parser.add_argument("--val", choices=("official", "full"), default="official",
                        help="early-stopping validation as bench/cyclenet_paper.py --val")
    parser.add_argument("--series", type=int, default=1000, help="series in the forecast-cost measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    online = dict(ONLINE)
    for item in args.param:
        key, _, value = item.partition("=")
        online[key] = json.loads(value)

    results = []
    for path in args.data or [str(DATA_DIR / "ETTh1.csv"), str(DATA_DIR / "ETTh2.csv")]:
        runs = [run(path, args.horizon, args.backbone, args.seed0 + i, args.lookback, args.dev,
                    args.cycle or None, online, args.series, args.val == "official") for i in range(args.seeds)]
        merged = dict(runs[0])
        for key in ("static_mse", "online_mse", "seasonal_naive_mse", "static_mae", "online_mae",
                    "seasonal_naive_mae", "batch_mse", "stream_seconds", "forecast_us_per_series"):
            merged[key] = float(np.mean([r[key] for r in runs]))
        merged["seeds"] = [r["seed"] for r in runs]
        merged["online_mse_seeds"] = [r["online_mse"] for r in runs]
        merged["static_mse_seeds"] = [r["static_mse"] for r in runs]
        results.append(merged)
        if not args.json or len(args.data or [1, 2]) > 1:
            r = merged
            print(f"{r['data']} H={r['horizon']} {r['backbone']} W={r['cycle']} seeds={r['seeds']}"
                  f"{' (dev split)' if r['dev'] else ''}: {r['origins']} origins\n"
                  f"  MSE  static {r['static_mse']:.4f} (batch {r['batch_mse']:.4f})  online {r['online_mse']:.4f}"
                  f"  paper {r['paper_mse']:.4f}  seasonal naive {r['seasonal_naive_mse']:.4f}\n"
                  f"  MAE  static {r['static_mae']:.4f}  online {r['online_mae']:.4f}"
                  f"  seasonal naive {r['seasonal_naive_mae']:.4f}\n"
                  f"  stream {r['stream_seconds']:.1f} s; forecast {r['forecast_us_per_series']:.2f} µs/series "
                  f"({r['forecast_series']} series in one call)", flush=True)
    if args.json:
        keys = ("static_mse", "online_mse", "paper_mse", "seasonal_naive_mse")
        if len(results) == 1:
            print(json.dumps(results[0]))
        else:
            print(json.dumps({**{k: [r[k] for r in results] for k in keys}, "runs": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
