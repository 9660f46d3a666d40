"""Engine throughput: observations per second per process, against the decode-only ceiling.

Many series each sending one observation at a time is the live-service shape (a Kafka poll returns a few
hundred records spread over many keys). The baseline, measured in the same run, is what the process must spend
anyway on every message: ``json.loads`` + validation (``stream.records.decode``) of the same messages. The
target for the whole service is >= 10k observations/s per consumer process.

    .venv/bin/python bench/throughput.py [--series 1000] [--ticks 200] [--batch 500] [--models ...] [--missing 0.01]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from tidecast.stream.batch import ObservationBatch
from tidecast.stream.config import EngineConfig
from tidecast.stream.engine import Engine
from tidecast.stream.records import decode, encode, from_ns

HOUR = 3_600_000_000_000


def make_stream(n_series: int, n_ticks: int, seed: int = 0, missing: float = 0.0) -> ObservationBatch:
    """Every series at every hour, tick-major; ``missing``: the share of observations left out at random (gaps the
    engine fills), the same ones in every run."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_ticks)
    level = rng.uniform(10, 100, size=n_series)
    values = level[None, :] * (1 + 0.3 * np.sin(2 * np.pi * t[:, None] / 24)) + rng.normal(size=(n_ticks, n_series))
    ids = np.array([f"s{k:05d}" for k in range(n_series)], dtype=object)
    stream = ObservationBatch(np.tile(ids, n_ticks), np.repeat(t * HOUR, n_series), values.reshape(-1))
    if missing:
        stream = stream.take(np.flatnonzero(np.random.default_rng([seed, 1]).random(len(stream)) >= missing))
    return stream


def time_decode(stream: ObservationBatch, limit: int = 50_000) -> float:
    from tidecast.stream.records import Observation

    n = min(limit, len(stream))
    messages = [encode(Observation(stream.series_ids[i], from_ns(int(stream.timestamps_ns[i])),
                                   float(stream.values[i]))) for i in range(n)]
    started = time.perf_counter()
    for message in messages:
        decode(message)
    return n / (time.perf_counter() - started)


def time_engine(stream: ObservationBatch, models: list[str], horizon: int, batch: int) -> float:
    params = {m: {"period": 24} for m in models}
    for m in models:
        if m != "seasonal-naive":
            params[m]["warmup"] = 48
    engine = Engine.from_config(EngineConfig(horizon=horizon, models=models, model_params=params, freq="1h"))
    started = time.perf_counter()
    for start in range(0, len(stream), batch):
        engine.process(stream.take(np.arange(start, min(start + batch, len(stream)))))
    return len(stream) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=1000)
    parser.add_argument("--ticks", type=int, default=200)
    parser.add_argument("--batch", type=int, default=500, help="observations per engine call (a Kafka poll)")
    parser.add_argument("--horizon", type=int, default=24)
    parser.add_argument("--models", default="seasonal-naive;seasonal-naive,holt-winters",
                        help="';'-separated model sets to time")
    parser.add_argument("--missing", type=float, default=0.0, help="share of observations left out at random")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    stream = make_stream(args.series, args.ticks, missing=args.missing)
    rows = [("decode only (json.loads + validate): baseline", time_decode(stream))]
    for models in args.models.split(";"):
        rows.append((f"engine: {models} (H={args.horizon})",
                     time_engine(stream, models.split(","), args.horizon, args.batch)))
    baseline = rows[0][1]
    if args.json:
        print(json.dumps({name: {"obs_per_second": rate, "ratio": rate / baseline} for name, rate in rows}))
        return
    table = Table(title=f"throughput — {args.series} series x {args.ticks} ticks, {args.batch} obs per batch")
    for col in ("path", "obs/s", "x baseline"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for name, rate in rows:
        table.add_row(name, f"{rate:,.0f}", f"{rate / baseline:.2f}")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
