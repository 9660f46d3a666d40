"""Changelog codec: one record per series (the old layout, the baseline) against blocks of series, in-process.

A real engine (seasonal naive + conformal PID, H = 24, default settings) holds ``--series`` series after 60 hourly
ticks; its partition state is encoded as a checkpoint group both ways, then read back the way a restore does
(:class:`~tidecast.stream.state.TailReader`, :func:`~tidecast.stream.state.merge`) and imported into a new engine.
No broker: this is the CPU part of ``bench/serve_throughput.py --only f``.

    .venv/bin/python bench/state_codec.py --series 10000 --json
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from tidecast.stream.batch import ObservationBatch
from tidecast.stream.config import EngineConfig
from tidecast.stream.engine import Engine
from tidecast.stream.state import (
    MARKER_KEY,
    SeriesRows,
    TailReader,
    marker_record,
    merge,
    series_blocks,
    series_record,
)

EPOCH_NS = 1_483_228_800 * 10**9
CONFIG = EngineConfig(horizon=24, models=["seasonal-naive"], freq="1h")


def partition_state(n: int) -> SeriesRows:
    engine = Engine.from_config(CONFIG)
    ids = np.array([f"r{i:06d}" for i in range(n)], dtype=object)
    rng = np.random.default_rng(0)
    for t in range(60):
        engine.process(ObservationBatch(ids, np.full(n, EPOCH_NS + t * 3_600 * 10**9), rng.normal(size=n)))
    meta, arrays = engine.export_series(list(ids))
    return SeriesRows(meta, arrays)


def per_series(rows: SeriesRows) -> list[tuple[bytes, bytes]]:
    return [(sid.encode(), series_record(one.meta[0], one.arrays)) for sid, one in rows.rows()]


def measure(rows: SeriesRows, encode: Any) -> dict[str, float]:
    t0 = time.perf_counter()
    records = encode(rows)
    records.append((MARKER_KEY.encode(), marker_record(1, None, len(rows), len(records) + 1)))
    t1 = time.perf_counter()
    reader = TailReader(0)
    for offset, (key, value) in enumerate(records):
        reader.add(offset, key, value)
    tail = reader.finish(len(records))
    t2 = time.perf_counter()
    snapshot = merge(None, tail, "t", 0)
    t3 = time.perf_counter()
    assert snapshot is not None and len(snapshot.rows) == len(rows)
    Engine.from_config(CONFIG).import_series(snapshot.rows.meta, snapshot.rows.arrays)
    t4 = time.perf_counter()
    return {"records": len(records), "bytes_per_series": sum(len(v) for _, v in records) / len(rows),
            "encode_s": t1 - t0, "decode_s": t2 - t1, "merge_s": t3 - t2, "import_s": t4 - t3,
            "restore_s": t4 - t1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--series", type=int, default=10_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = partition_state(args.series)
    out = {"series": args.series, "per_series": measure(rows, per_series),
           "blocks": measure(rows, lambda r: list(series_blocks(r)))}
    base, new = out["per_series"], out["blocks"]
    print(f"{'':18} {'per series':>11} {'blocks':>9} {'ratio':>7}")
    for key in ("records", "bytes_per_series", "encode_s", "decode_s", "merge_s", "import_s", "restore_s"):
        print(f"{key:18} {base[key]:11.2f} {new[key]:9.2f} {new[key] / base[key]:7.3f}")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
