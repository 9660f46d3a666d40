"""Retraining river lanes: the engine's history ring and the rebuild hook, on the streams of ``bench/retrain.py`` (a).

river's forecasters keep only their running state, so with ``--retrain on`` the engine gives each of their series
a ring of its last values (:func:`tidecast.stream.retrain.give_history`) and a job rebuilds each series'
forecaster on them (:meth:`tidecast.models.adapters.PerSeries.refit`), through the same shadow gate as CycleNet.
This bench runs the injected-change streams of ``bench/retrain.py`` part (a) (same groups, change kinds, points
and ``--dev`` split) through one river lane twice: as it always runs (learning online, never rebuilt) and with
the drift-triggered policy at the README's defaults (``DRIFT_TRIGGERED`` of ``bench/retrain.py``, chosen for
CycleNet; not tuned here). Scored as there, from step 2,000: ``mse`` over every forecast (each stream on its
own pre-change scale), ``post_change_mae_ratio`` over cycles 3-10 after each change against the lane without
retraining, promotions and rejections, the jobs' seconds and the ring's bytes per series.

    .venv/bin/python bench/retrain_river.py --json            # scored streams, holt-winters and snarimax
    .venv/bin/python bench/retrain_river.py --dev --models snarimax
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from drift import etth2, synthetic  # noqa: E402
from retrain import DRIFT_TRIGGERED, WARM_START, H, feed_streams, score_a, streams  # noqa: E402

from tidecast.stream.config import EngineConfig  # noqa: E402
from tidecast.stream.engine import Engine  # noqa: E402


def run_lane(model: str, values: np.ndarray, cycle: int, retrain: dict[str, Any] | None) -> dict[str, Any]:
    """Feed the streams through one ``model`` lane (retrain settings ``retrain``, ``None``: off); forecasts
    (rows, T + H + 1, H), retrain events, costs."""
    cfg = EngineConfig(horizon=H, models=[model], freq="1h", model_params={model: {"period": cycle}},
                       retrain="on" if retrain else "off", retrain_params=retrain or {})
    engine = Engine.from_config(cfg)
    run = feed_streams(engine, values)
    ring = getattr(engine.lanes[0].model, "history_", None)
    return {**run, "train_seconds": engine.metrics.registry.get_sample_value("tidecast_retrain_seconds_sum") or 0.0,
            "ring_bytes_per_series": ring.bytes_per_row if ring is not None else 0}


def score(values: np.ndarray, ats: np.ndarray, cycle: int, plain: dict, retrained: dict) -> dict[str, Any]:
    """``bench/retrain.py``'s scores, the lane without retraining in static's place, from step 2,000 as there (a
    river lane forecasts from the end of its warm-up on, CycleNet from its warm start at 2,000)."""
    for run in (plain, retrained):
        run["mean"][:, :WARM_START] = np.nan
    scored = score_a(values, ats, cycle, {"static": plain, "drift-triggered": retrained})
    kinds = [e.kind for e in retrained["events"]]
    return {"n": len(values), "mse_without": scored["static"]["mse"],
            "mse_drift_triggered": scored["drift-triggered"]["mse"],
            "post_change_mae_ratio": scored["drift-triggered"]["post_change_mae_ratio"],
            "promoted": kinds.count("promoted"), "rejected": kinds.count("rejected"), "failed": kinds.count("failed"),
            "rolled_back": kinds.count("rolled_back"),
            "job_seconds": scored["drift-triggered"]["train_seconds"], "wall_seconds": round(retrained["wall"], 1),
            "ring_bytes_per_series": retrained["ring_bytes_per_series"]}


def evaluate(model: str, dev: bool, policy: dict[str, Any]) -> dict[str, Any]:
    groups = [synthetic(1 if dev else 0), etth2(dev=dev)]
    parts = {}
    for group in groups:
        values, ats, _ = streams(group, seed=1 if dev else 0)
        plain = run_lane(model, values, group.cycle, None)
        retrained = run_lane(model, values, group.cycle, policy)
        parts[group.name] = score(values, ats, group.cycle, plain, retrained)
        print(f"  {model} {group.name}: {parts[group.name]}", file=sys.stderr)
    total = sum(p["n"] for p in parts.values())
    merged = {k: sum(p["n"] * p[k] for p in parts.values()) / total
              for k in ("mse_without", "mse_drift_triggered", "post_change_mae_ratio")}
    merged.update({k: sum(p[k] for p in parts.values()) for k in ("promoted", "rejected", "failed", "rolled_back")})
    merged["job_seconds"] = round(sum(p["job_seconds"] for p in parts.values()), 2)
    merged["ring_bytes_per_series"] = max(p["ring_bytes_per_series"] for p in parts.values())
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev", action="store_true", help="the dev streams")
    parser.add_argument("--models", default="holt-winters,snarimax", help="river lanes, comma-separated")
    parser.add_argument("--policy", default="{}", help="JSON overriding the drift-triggered settings (dev)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    policy = {**DRIFT_TRIGGERED, **json.loads(args.policy)}
    results = {model: evaluate(model, args.dev, policy) for model in args.models.split(",")}
    print(f"{'model':14} {'MSE without':>11} {'MSE drift-trig.':>15} {'post/without':>12} "
          f"{'promoted':>8} {'rejected':>8} {'job s':>6} {'ring B/series':>13}")
    for model, r in results.items():
        print(f"{model:14} {r['mse_without']:11.3f} {r['mse_drift_triggered']:15.3f} "
              f"{r['post_change_mae_ratio']:12.3f} {r['promoted']:8d} {r['rejected']:8d} {r['job_seconds']:6.1f} "
              f"{r['ring_bytes_per_series']:13d}")
    if args.json:
        print(json.dumps({"dev": args.dev, "models": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
