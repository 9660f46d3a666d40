"""kill -9 in ``serve`` keeps the liquid model's hidden states: the state after three crashes equals a clean run's.

The liquid CfC (``--model cfc``) shares one network among its series and keeps a hidden state per series, so its
state is more than rows: weights, their Adam moments, the replay RNG and round counters live in the shared state.
This test kills ``serve`` three times mid-stream, lets a fourth instance finish, and compares the checkpoint - every
series' arrays (hidden state, history ring, scaler, calibrator, pending forecasts, ...) and the shared arrays and
counters - with one uninterrupted engine over the same records.

Exact equality needs a run that does not depend on timing: one partition (one order of records), engine batches
of one record (``--max-poll-records 1 --batch-size 1``, so a round never depends on where a poll ended), the
model's work inline (``defer=false``: the warm-start fit and one replay step a round, never on the trainer thread)
and a time budget no step reaches.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tidecast.stream.batch import ObservationBatch
from tidecast.stream.config import EngineConfig
from tidecast.stream.engine import Engine
from tidecast.stream.kafka import forecast_messages
from tidecast.stream.records import decode
from tidecast.stream.state import LocalStateStore

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(600)]

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HORIZON, WARM_START, ROWS, CHANNELS = 6, 40, 90, ("HUFL", "OT")
CFC = {"lookback": 8, "units": 8, "backbone_units": 16, "periods": [24], "warm_start": WARM_START, "epochs": 2,
       "batch_size": 32, "replay_window": 32, "replay_batch": 16, "defer": False, "step_budget": 600.0}
ENGINE = EngineConfig(horizon=HORIZON, models=["cfc"], model_params={"cfc": CFC})
ENGINE_ARGS = ("--horizon", str(HORIZON), "--model", "cfc",
               *(arg for key, value in CFC.items() for arg in ("--model-param", f"cfc.{key}={json.dumps(value)}")))


def etth1_messages(as_messages) -> list[tuple[bytes, bytes]]:
    frame = pd.read_csv(DATA / "ETTh1.csv", nrows=ROWS)
    stamps = (frame.pop("date").str.replace(" ", "T") + "Z").tolist()
    return as_messages([(f"ETTh1/{c}", t, frame[c].iloc[i]) for i, t in enumerate(stamps) for c in CHANNELS])


def reference(records: list) -> tuple[Engine, dict[str, bytes]]:
    """One engine over the records in offset order, one record a batch (as ``serve --max-poll-records 1``); also the
    last forecast message of each series."""
    engine = Engine.from_config(ENGINE)
    last: dict[str, bytes] = {}
    for r in sorted(records, key=lambda r: r.offset):
        obs = decode(r.value)
        batch = ObservationBatch(np.array([obs.series_id], dtype=object), np.array([obs.timestamp_ns], np.int64),
                                 np.array([obs.value]), np.array([r.partition], np.int32),
                                 np.array([r.offset], np.int64))
        for sid, value in forecast_messages(engine.process(batch).forecasts):
            last[sid] = value
    return engine, last


def test_kill_9_mid_stream_keeps_the_cfc_hidden_states_and_weights(kafka, unique, serve, tmp_path, as_messages):
    topic, group, state = unique("cfc-crash"), unique("g"), tmp_path / "state"
    kafka.create_topic(topic, 1)
    sent = kafka.send(topic, etth1_messages(as_messages))
    end = 1 + max(m.offset for m in sent)
    args = (*ENGINE_ARGS, "--batch-size", "1", "--max-poll-records", "1", "--checkpoint-records", "15",
            "--checkpoint-interval", "5", "--session-timeout-ms", "3000", "--heartbeat-interval-ms", "500")
    for run in range(3):  # each run restarts from the last checkpoint; the fit (record 78) falls in the third
        proc = serve(topic, group, state, *args, name=f"run-{run}")
        proc.wait_value("tidecast_observations_total", lambda v: v >= 40, 120)
        assert (proc.value("tidecast_consumer_lag") or 0) + (proc.value("tidecast_consumer_queued_records") or 0) > 0
        proc.kill()
    final = serve(topic, group, state, *args, name="run-final")
    final.wait_caught_up(1, timeout=180)
    assert final.value("tidecast_state_restored_series_total") == len(CHANNELS)
    assert final.terminate()[0] == 0

    engine, last = reference(kafka.read_all(topic, min_count=len(sent)))
    model = engine.lanes[0].model
    assert model.fitted_ and model.ready_[: len(CHANNELS)].all()
    assert model.fit_report_["rows"] == 1  # the first series reached the warm start alone; the other joined
    snap = LocalStateStore(state, group, topic).load(0)
    assert snap is not None and snap.position == end
    _, expected = engine.export_series(snap.rows.series_ids)
    assert any(key.endswith("/hidden") for key in expected)
    for key, want in expected.items():
        np.testing.assert_array_equal(snap.rows.arrays[key], want, err_msg=key)
    arrays, meta = engine.export_shared()["cfc"]
    got_arrays, got_meta = snap.shared["cfc"]
    assert set(got_arrays) == set(arrays) and any(k.startswith("adam_m.") for k in arrays)
    for key, want in arrays.items():
        np.testing.assert_array_equal(got_arrays[key], want, err_msg=f"shared {key}")
    assert meta["rounds"] > 0
    for key in ("fitted", "cycle", "n_rows", "rounds", "due", "rng"):  # not fit_report: it holds the fit's seconds
        assert got_meta[key] == json.loads(json.dumps(meta[key])), key

    origins = (ROWS - WARM_START + 1) * len(CHANNELS)  # every series forecasts from its 40th hour on
    messages = kafka.read_all(f"{topic}-forecasts", min_count=origins)
    by_key: dict[tuple[str, str], bytes] = {}
    for m in messages:
        key = (json.loads(m.value)["series_id"], json.loads(m.value)["issued_at"])
        assert by_key.setdefault(key, m.value) == m.value, f"re-sent forecast differs for {key}"
    assert len(by_key) == origins
    if len(messages) == origins:  # every check above held, but no kill fell between two checkpoints this time
        pytest.skip("no kill landed between checkpoints after the fit: nothing was re-processed")
    for sid, value in last.items():
        assert by_key[(sid, json.loads(value)["issued_at"])] == value, sid
