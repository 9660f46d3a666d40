"""The Python API (``tidecast.replay`` -> ``ReplayResult``): frames in and out, outcomes joined, scores, plots."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import tidecast
from tidecast.monitors.accuracy import smape
from tidecast.stream.result import events_frame
from tidecast.stream.settings import SettingsError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ETTH1 = DATA / "ETTh1.csv"
HOUR = pd.Timedelta("1h")


def noisy_cycles(n: int = 400, series: tuple[str, ...] = ("a", "b"), seed: int = 0) -> pd.DataFrame:
    """Long frame: a 12-hour cycle plus noise per series, each on its own scale."""
    rng = np.random.default_rng(seed)
    parts = []
    for i, sid in enumerate(series):
        t = np.arange(n)
        y = (i + 1) * (10 + 3 * np.sin(2 * np.pi * t / 12) + rng.normal(0, 0.5, n))
        parts.append(pd.DataFrame({"unique_id": sid, "ds": pd.date_range("2024-01-01", periods=n, freq="h"),
                                   "y": y}))
    return pd.concat(parts, ignore_index=True)


SN12 = {"seasonal-naive": {"period": 12}}


@pytest.fixture(scope="module")
def result() -> tidecast.ReplayResult:
    return tidecast.replay(noisy_cycles(), models=["seasonal-naive"], horizon=6, levels=(80, 95),
                           model_params=SN12)


def test_forecasts_are_one_row_per_series_model_origin_and_step_with_the_outcome_joined(result):
    f, frame = result.forecasts, noisy_cycles()
    assert list(f.columns) == ["unique_id", "cutoff", "ds", "model", "h", "mean", "y", "lo-80", "hi-80", "lo-95",
                               "hi-95"]
    assert not f.duplicated(["unique_id", "model", "cutoff", "h"]).any()
    assert ((f["ds"] - f["cutoff"]) == f["h"].astype(int) * HOUR).all()
    truth = frame.assign(ds=pd.to_datetime(frame["ds"], utc=True)).set_index(["unique_id", "ds"])["y"]
    expected = truth.reindex(pd.MultiIndex.from_arrays([f["unique_id"].astype(str), f["ds"]])).to_numpy()
    np.testing.assert_array_equal(f["y"].to_numpy(), expected)  # NaN exactly where the target is past the data
    last = frame.groupby("unique_id")["ds"].max().dt.tz_localize("UTC")
    matured = f["ds"].to_numpy() <= last.reindex(f["unique_id"].astype(str)).to_numpy()
    assert f["y"].notna().to_numpy().tolist() == matured.tolist()


def test_the_95_band_is_wider_than_the_80_band(result):
    f = result.forecasts.dropna(subset=["lo-80", "lo-95"])
    assert len(f) > 0.9 * len(result.forecasts)
    width80, width95 = f["hi-80"] - f["lo-80"], f["hi-95"] - f["lo-95"]
    assert (width95 >= width80 - 1e-9).mean() > 0.99 and width95.mean() > 1.3 * width80.mean()


def test_summary_agrees_with_the_engines_own_prequential_scores(result):
    """The frame-side scores (for notebooks) and the engine's running sums (for the CLI and metrics) are two
    independent computations of the same definitions."""
    summary = result.summary().set_index("model").loc["seasonal-naive"]
    engine = result.run["models"]["seasonal-naive"]
    assert summary["n_forecasts"] == engine["n_forecasts"] and summary["n_scored"] == engine["n_scored"]
    assert summary["n_no_interval"] == engine["n_no_interval"] > 0
    assert summary["mae"] == pytest.approx(engine["mae"]) and summary["rmse"] == pytest.approx(engine["rmse"])
    for level in ("80", "95"):
        mine, theirs = engine["levels"][level], summary
        assert theirs[f"coverage-{level}"] == pytest.approx(mine["coverage"])
        assert theirs[f"width-{level}"] == pytest.approx(mine["mean_width"])
        assert theirs[f"interval_score-{level}"] == pytest.approx(mine["interval_score"])
        assert theirs[f"target-{level}"] == pytest.approx(mine["target"])
    by_h = result.summary("horizon").set_index("h")
    for h in (1, 6):
        assert by_h.loc[h, "coverage-95"] == pytest.approx(engine["by_horizon"][str(h)]["levels"]["95"]["coverage"])


def test_mase_and_smape_against_a_direct_computation(result):
    """MASE: |error| over the mean |y_t - y_{t-12}| of the series up to the origin (12: the detected cycle)."""
    f = result.forecasts[result.forecasts["y"].notna()]
    expected_mase, expected_smape = {}, {}
    for h in (1, 6):
        scaled, percent = [], []
        for sid, rows in f[f["h"] == h].groupby("unique_id", observed=True):
            history = result.actuals[result.actuals["unique_id"] == sid].set_index("ds")["y"]
            for cutoff, mean, y in zip(rows["cutoff"], rows["mean"], rows["y"], strict=True):
                seen = history[history.index <= cutoff].to_numpy()
                if len(seen) > 12:
                    scaled.append(abs(y - mean) / np.mean(np.abs(seen[12:] - seen[:-12])))
                denominator = abs(y) + abs(mean)
                percent.append(0.0 if denominator == 0 else 200 * abs(y - mean) / denominator)
        expected_mase[h], expected_smape[h] = np.mean(scaled), np.mean(percent)
    by_h = result.summary("horizon").set_index("h")
    for h in (1, 6):
        assert by_h.loc[h, "mase"] == pytest.approx(expected_mase[h])
        assert by_h.loc[h, "smape"] == pytest.approx(expected_smape[h])
    assert 0.5 < by_h.loc[1, "mase"] < 2  # seasonal naive against its own in-sample error: about 1


def test_smape_counts_zero_over_zero_as_zero():
    assert smape(np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, -1.0])).tolist() == [0.0, 200.0, 200.0]


def test_per_series_summary_and_nixtla_layout(result):
    per_series = result.summary("series")
    assert sorted(per_series["unique_id"].astype(str)) == ["a", "b"]
    assert per_series.set_index("unique_id").loc["b", "mae"] > per_series.set_index("unique_id").loc["a", "mae"]
    nixtla = result.to_nixtla()
    assert list(nixtla.columns) == ["unique_id", "ds", "cutoff", "y", "seasonal-naive", "seasonal-naive-lo-80",
                                    "seasonal-naive-hi-80", "seasonal-naive-lo-95", "seasonal-naive-hi-95"]
    assert len(nixtla) == len(result.forecasts)
    row = result.forecasts.iloc[100]
    match = nixtla[(nixtla["unique_id"] == row["unique_id"]) & (nixtla["ds"] == row["ds"])
                   & (nixtla["cutoff"] == row["cutoff"])]
    assert match["seasonal-naive"].item() == row["mean"] and match["seasonal-naive-hi-95"].item() == row["hi-95"]


def test_a_model_alias_named_as_a_nixtla_key_column_is_refused_not_written_over_it():
    """An alias ``y`` wrote its forecasts into the outcome column."""
    result = tidecast.replay(noisy_cycles(200), models=["y=seasonal-naive"], horizon=2,
                             model_params={"y": {"period": 12}})
    with pytest.raises(ValueError, match="'y' has the name of a column of Nixtla's layout"):
        result.to_nixtla()


def test_a_period_index_or_column_holds_the_times():
    """``frame.to_period()`` kept its times in a PeriodIndex, which was dropped as row labels: the first value
    column was read as epoch seconds and most of the data lost."""
    wide = noisy_cycles(300).pivot(index="ds", columns="unique_id", values="y")
    wide.columns.name = None
    expected = tidecast.replay(wide, horizon=2, model_params=SN12).forecasts
    assert len(expected) > 0
    for frame in (wide.to_period(), wide.to_period().reset_index()):
        assert tidecast.replay(frame, horizon=2, model_params=SN12).forecasts.equals(expected)


def test_an_index_of_arrow_timestamps_or_dates_holds_the_times():
    """Review (2026-12-05): an index of times other than numpy's DatetimeIndex (``read_parquet(dtype_backend=
    "pyarrow").set_index("ts")``, ``groupby(ts.dt.date)``) was dropped as row labels, the first value column read as
    epoch seconds (1970) and that series lost."""
    wide = noisy_cycles(300).pivot(index="ds", columns="unique_id", values="y")
    wide.columns.name = None
    expected = tidecast.replay(wide, horizon=2, model_params=SN12).forecasts
    arrow = wide.set_axis(pd.Index(wide.index, dtype="timestamp[ns][pyarrow]", name="ts"))
    assert tidecast.replay(arrow, horizon=2, model_params=SN12).forecasts.equals(expected)
    daily = wide.iloc[::24]  # noon-free midnights: as dates they are the same instants
    daily = daily[daily.index.hour == 0]
    expected = tidecast.replay(daily, horizon=2, model_params=SN12).actuals
    dates = daily.set_axis(pd.Index([t.date() for t in daily.index], name=None))
    got = tidecast.replay(dates, horizon=2, model_params=SN12).actuals
    assert sorted(got["unique_id"].unique()) == sorted(wide.columns) and got.equals(expected)


def test_an_index_named_as_a_time_column_in_another_case_holds_the_times_and_a_date_label_is_no_channel():
    """Review (2026-12-05): ``read_csv(index_col="Date")`` left a text index named "Date" (time columns are found in
    any case) that was dropped, the first series read as epoch seconds; an index of dates labelling hourly rows
    beside their own time column became a channel of ``wrong_type`` dead letters."""
    wide = noisy_cycles(300).pivot(index="ds", columns="unique_id", values="y")
    wide.columns.name = None
    expected = tidecast.replay(wide, horizon=2, model_params=SN12)
    text = wide.set_axis(pd.Index(wide.index.strftime("%Y-%m-%d %H:%M:%S"), name="Date"))
    got = tidecast.replay(text, horizon=2, model_params=SN12)
    assert got.forecasts.equals(expected.forecasts)
    labelled = wide.reset_index().set_axis(pd.Index(wide.index.date, name="day"))
    got = tidecast.replay(labelled, horizon=2, model_params=SN12)
    assert len(got.dead_letters) == 0 and got.forecasts.equals(expected.forecasts)


def test_dir_of_the_package_lists_the_public_api():
    assert {"replay", "ReplayResult", "checks"} <= set(dir(tidecast))


def test_nixtla_layout_aligns_models_that_start_at_different_origins():
    result = tidecast.replay(noisy_cycles(120), models=["sn12=seasonal-naive", "sn24=seasonal-naive"], horizon=2,
                             levels=(90,), model_params={"sn12": {"period": 12}, "sn24": {"period": 24}})
    nixtla = result.to_nixtla()
    f = result.forecasts
    assert len(nixtla) == len(f[f["model"] == "sn12"])  # sn12 starts first: its steps are every row
    early = nixtla["cutoff"] < f.loc[f["model"] == "sn24", "cutoff"].min()
    assert early.any() and nixtla.loc[early, "sn24"].isna().all() and nixtla.loc[~early, "sn24"].notna().all()
    sn24 = f[f["model"] == "sn24"].set_index(["unique_id", "ds", "cutoff"])["hi-90"]
    joined = nixtla[~early].set_index(["unique_id", "ds", "cutoff"])["sn24-hi-90"]
    pd.testing.assert_series_equal(joined.sort_index(), sn24.sort_index(), check_names=False)


def test_wide_frame_long_frame_and_file_give_the_same_forecasts(tmp_path):
    long = noisy_cycles(200)
    wide = long.pivot(index="ds", columns="unique_id", values="y")  # DatetimeIndex, one column per series
    path = tmp_path / "wide.csv"
    wide.rename_axis("ds").reset_index().to_csv(path, index=False)
    kwargs = {"models": ["seasonal-naive"], "horizon": 3, "levels": (90,), "model_params": SN12}
    from_long = tidecast.replay(long, **kwargs).forecasts
    from_wide = tidecast.replay(wide, **kwargs).forecasts
    from_file = tidecast.replay(path, name="w", **kwargs).forecasts  # a file's series are <name>/<column>
    from_file["unique_id"] = from_file["unique_id"].astype(str).str.removeprefix("w/")
    for other in (from_wide, from_file):
        pd.testing.assert_frame_equal(other.assign(unique_id=other["unique_id"].astype(str)),
                                      from_long.assign(unique_id=from_long["unique_id"].astype(str)))


def test_a_parquet_file_written_from_a_frame_keeps_the_time_in_its_index(tmp_path):
    """``df.to_parquet()`` stores a DatetimeIndex in the file and pandas reads it back as the index: the file must
    replay like the frame (it once read the first value column as epoch seconds, one series in 1970)."""
    wide = noisy_cycles(200).pivot(index="ds", columns="unique_id", values="y")
    wide.to_parquet(tmp_path / "wide.parquet")
    kwargs = {"models": ["seasonal-naive"], "horizon": 3, "levels": (90,), "model_params": SN12}
    from_frame = tidecast.replay(wide, **kwargs)
    from_file = tidecast.replay(tmp_path / "wide.parquet", name="w", **kwargs)
    assert list(from_file.actuals["unique_id"].cat.categories) == ["w/a", "w/b"]
    assert from_file.actuals["ds"].min() == from_frame.actuals["ds"].min() == pd.Timestamp("2024-01-01", tz="UTC")
    assert len(from_file.forecasts) == len(from_frame.forecasts) > 0


def test_the_time_column_is_found_by_name_in_any_case_or_by_type_and_a_guess_warns():
    """'Date' after the value columns was missed and the first value column read as epoch seconds (one series
    in 1970, no word said)."""
    wide = noisy_cycles(100, series=("a",)).rename(columns={"ds": "Date", "y": "OT"})[["OT", "Date"]]
    kwargs = {"horizon": 2, "model_params": SN12}
    assert tidecast.replay(wide, **kwargs).actuals["ds"].min() == pd.Timestamp("2024-01-01", tz="UTC")
    typed = wide.rename(columns={"Date": "when"})  # no known name: the datetime column
    assert tidecast.replay(typed, **kwargs).actuals["ds"].min() == pd.Timestamp("2024-01-01", tz="UTC")
    numbers = typed.assign(when=np.arange(100) * 3600)[["when", "OT"]]
    with pytest.warns(UserWarning, match="reading the first column, 'when', as the time"):
        assert tidecast.replay(numbers, **kwargs).run["n_observations"] == 100


def test_an_index_that_repeats_a_column_and_repeated_columns():
    long = noisy_cycles(50, series=("a",))
    same = tidecast.replay(long.set_index("ds", drop=False), horizon=2, model_params=SN12)
    assert same.run["n_observations"] == 50
    shifted = long.set_index("ds", drop=False)
    shifted.index = shifted.index + HOUR
    with pytest.raises(ValueError, match="index 'ds' and its column 'ds' differ"):
        tidecast.replay(shifted, horizon=2)
    with pytest.raises(ValueError, match=r"the columns \['y'\] appear more than once"):
        tidecast.replay(pd.concat([long, long[["y"]]], axis=1), horizon=2)
    holed = long.copy()
    holed.loc[3, "ds"] = pd.NaT  # equal to its column, NaT included: the index goes, the row is a dead letter
    assert len(tidecast.replay(holed.set_index("ds", drop=False), horizon=2, model_params=SN12).dead_letters) == 1
    by_series = tidecast.replay(long.set_index("unique_id"), horizon=2, model_params=SN12)  # a named index: data
    assert list(by_series.actuals["unique_id"].cat.categories) == ["a"]
    wide = long.pivot(index="ds", columns="unique_id", values="y").reset_index().rename_axis("row")
    labelled = tidecast.replay(wide, horizon=2, model_params=SN12)  # a label of rows is no series
    assert list(labelled.actuals["unique_id"].cat.categories) == ["a"]


def test_bad_cells_become_dead_letters_and_the_rest_is_replayed():
    frame = noisy_cycles(100, series=("a",)).astype({"y": object, "ds": str})
    frame.loc[10, "y"], frame.loc[20, "ds"] = "n/a", "not a time"
    result = tidecast.replay(frame, models=["seasonal-naive"], horizon=2, model_params=SN12)
    assert sorted(result.dead_letters["reason"]) == ["bad_timestamp", "non_numeric_value"]
    assert sorted(result.dead_letters["offset"]) == [10, 20]
    assert len(result.actuals) == 98 and result.run["n_observations"] == 98


def test_a_missing_cell_in_a_column_of_epoch_second_strings_costs_its_row_only():
    frame = pd.DataFrame({"unique_id": "a", "ds": [str(1_700_000_000 + 3600 * k) for k in range(50)],
                          "y": np.arange(50.0)}).astype({"ds": object})
    frame.loc[7, "ds"] = None
    letters = tidecast.replay(frame, horizon=2, model_params=SN12).dead_letters
    assert list(letters["reason"]) == ["missing_field"]  # not 50 bad_timestamps (a shadowed helper once did that)


def test_missing_cells_of_nullable_columns_are_missing_fields():
    frame = noisy_cycles(30, series=("a",)).astype({"y": "Float64"})
    frame.loc[5, "y"] = pd.NA
    letters = tidecast.replay(frame, models=["seasonal-naive"], horizon=2, model_params=SN12).dead_letters
    assert list(letters["reason"]) == ["missing_field"]  # was wrong_type, "got NAType"


def test_a_history_shorter_than_a_models_warm_up_says_why_nothing_came_out():
    """300 hourly values: the detecting seasonal naive waits for 402, so it never forecasts and the replay warns
    with the numbers (a configured period starts it after one cycle, and then nothing is said)."""
    frame = noisy_cycles(300)
    with pytest.warns(UserWarning, match=r"seasonal-naive: 2 of 2 series never forecast; a series needs 402 "
                                         r"observations first \(detect_after=402.*longest series here has 300"):
        silent = tidecast.replay(frame, models=["seasonal-naive"], horizon=6)
    assert len(silent.forecasts) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(tidecast.replay(frame, models=["seasonal-naive"], horizon=6, model_params=SN12).forecasts)


def test_the_note_names_a_held_series_a_repeated_time_and_a_diverged_model():
    """The note blamed the warm-up for every silent series: one seen at a single timestamp (held: no grid step),
    rows that all repeat a timestamp (the wrong time column), a model whose forecasts were never finite."""
    frame = noisy_cycles(500)
    lone = pd.concat([frame, pd.DataFrame({"unique_id": ["c"], "ds": frame["ds"][:1], "y": [0.0]})])
    with pytest.warns(UserWarning, match=r"1 of 3 series never forecast \(1 of them seen at one timestamp only"):
        tidecast.replay(lone, horizon=2, model_params=SN12)
    with pytest.warns(UserWarning, match=r"or freq=, sets one\).*the longest series here has 1$"):  # not 0
        tidecast.replay(lone[lone["unique_id"] == "c"], horizon=2, model_params=SN12)
    same_time = frame.assign(ds=frame["ds"].iloc[0])
    with pytest.warns(UserWarning, match=r"998 rows repeated their series' last timestamp \(is the time column"):
        tidecast.replay(same_time, horizon=2)
    with pytest.warns(UserWarning, match="long enough for that minimum, yet no forecast was ever finite: the model"):
        tidecast.replay(frame[frame["unique_id"] == "a"], models="snarimax", horizon=2,
                        model_params={"snarimax": {"lr": 1e30, "period": 12}})


def test_mistakes_in_the_arguments_raise_before_any_work():
    frame = noisy_cycles(50)
    with pytest.raises(TypeError, match="unexpected option 'colour'"):
        tidecast.replay(frame, colour="red")
    with pytest.raises(TypeError, match=r"unexpected option 'level' \(did you mean 'levels'\?\)"):
        tidecast.replay(frame, level=[80, 95])  # Nixtla's spelling
    # found by the API review (2026-12-04): a wrong format read a long frame as wide (its ids as values)
    with pytest.raises(ValueError, match=r"format='Long': one of auto, wide, long, jsonl"):
        tidecast.replay(frame, format="Long")
    with pytest.raises(TypeError, match="allowed_series must be a list of names"):
        tidecast.replay(frame, allowed_series=5)
    for models in ([1], None):  # an AttributeError from the registry, a TypeError from iterating None
        with pytest.raises(TypeError, match="models must be model names"):
            tidecast.replay(frame, models=models)
    with pytest.raises(SettingsError, match=r"max_series '2': must be a number, got str"):
        tidecast.replay(frame, max_series="2")  # "must be real number, not str", naming no setting
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        tidecast.replay(frame, models=["nope"])
    with pytest.raises(ValueError, match="each must be in"):
        tidecast.replay(frame, levels=(80, 120))
    with pytest.raises(ValueError, match=r"0.5 looks like a fraction: levels are in percent, e.g. 50"):
        tidecast.replay(frame, levels=(0.5, 0.8, 0.95))  # once a silent 0.95 % interval
    with pytest.raises(ValueError, match=r"give levels or alpha, not both \(alpha=0.05 is levels=\(95,\)\)"):
        tidecast.replay(frame, levels=(80,), alpha=0.05)
    with pytest.raises(TypeError, match="horizon must be a whole number of steps, got 2.5"):
        tidecast.replay(frame, horizon=2.5)
    with pytest.raises(TypeError, match="batch_size must be a whole number of observations, got 1.5"):
        tidecast.replay(frame, batch_size=1.5)  # once silently 1
    with pytest.raises(ValueError, match="lr = -1.0: a finite learning rate > 0"):
        tidecast.replay(frame, models="cyclenet", model_params={"cyclenet": {"lr": -1.0}})
    with pytest.raises(ValueError, match="has no columns"):
        tidecast.replay(pd.DataFrame())
    with pytest.raises(ValueError, match="not a comma-separated list of float"):
        tidecast.replay(frame, levels="80;95")
    with pytest.raises(TypeError, match="DataFrame or a path"):
        tidecast.replay([1, 2, 3])
    one = tidecast.replay(frame, levels=None, alpha=0.2, models=["seasonal-naive"], model_params=SN12, horizon=2)
    assert one.levels == ["80"] and "lo-80" in one.forecasts.columns
    alone = tidecast.replay(frame, alpha=0.2, model_params=SN12, horizon=np.int64(2))  # alpha replaces the default
    assert alone.levels == ["80"]
    as_cli = tidecast.replay(frame, models="seasonal-naive,naive=seasonal-naive", levels="50, 80", horizon=2,
                             model_params={"seasonal-naive": {"period": 12}, "naive": {"period": 12}})
    assert as_cli.models == ["seasonal-naive", "naive"] and as_cli.levels == ["50", "80"]
    # KEY=VALUE settings as strings read as the CLI's (the string was iterated: "retrain parameter c")
    spelled = tidecast.replay(frame, model_params="seasonal-naive.period=12", horizon=2, retrain="on",
                              retrain_params="schedule=20 cooldown=5")
    assert spelled.run["config"]["retrain_params"] == {"schedule": 20, "cooldown": 5}
    assert spelled.run["config"]["model_params"] == {"seasonal-naive": {"period": 12}}
    with pytest.raises(ValueError, match="retrain_params='cooldown': "):
        tidecast.replay(frame, retrain="on", retrain_params="cooldown")


def test_event_times_in_whole_and_fractional_seconds_make_one_events_frame():
    """isoformat() leaves out a zero fraction: "...T01:00:00Z" beside "...T01:00:00.250000Z" failed the frame
    after the whole run (pandas took the first time's format for the rest), and replay --report exited 2."""
    events = events_frame([{"series_id": s, "model": "m", "detector": "cusum", "kind": "mean", "detected_at": at}
                           for s, at in (("a", "2024-01-26T01:00:00Z"), ("b", "2024-01-26T01:00:00.250000Z"))])
    assert events["at"].tolist() == [pd.Timestamp("2024-01-26T01:00:00Z"), pd.Timestamp("2024-01-26T01:00:00.25Z")]


def test_plot_draws_actual_forecast_bands_misses_and_events(result):
    events = events_frame([{"series_id": "a", "model": "seasonal-naive", "detector": "cusum", "kind": "mean",
                            "detected_at": "2024-01-05T00:00:00Z", "statistic": 9.0},
                           {"series_id": "a", "model": "seasonal-naive", "detector": "retrain", "kind": "promotion",
                            "at": "2024-01-10T00:00:00Z"},
                           {"series_id": "b", "model": "seasonal-naive", "detector": "cusum", "kind": "mean",
                            "detected_at": "2024-01-06T00:00:00Z"}])
    assert list(events.columns[:5]) == ["unique_id", "model", "detector", "kind", "at"]
    result.events = events
    try:
        fig = result.plot("a", h=6)
    finally:
        result.events = events_frame([])
    (ax,) = fig.axes
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert {"actual", "seasonal-naive h=6", "seasonal-naive 80 %", "seasonal-naive 95 %"} <= set(labels)
    assert "cusum mean" in labels and "retrain promotion" in labels  # series b's event is not drawn on a
    vertical = [line for line in ax.get_lines() if len(set(line.get_xdata())) == 1]
    assert len(vertical) == 2
    with pytest.raises(ValueError, match="no series 'zz'"):
        result.plot("zz")
    with pytest.raises(TypeError, match="h=2.5"):  # drew the actual values alone
        result.plot("a", h=2.5)
    with pytest.raises(ValueError, match="h=7"):
        result.plot("a", h=7)


def test_series_are_found_by_their_input_id_and_a_held_one_is_explained():
    frame = noisy_cycles(100, series=("1", "2")).astype({"unique_id": int})
    frame = pd.concat([frame, pd.DataFrame({"unique_id": [3], "ds": frame["ds"][:1], "y": [0.0]})])
    with pytest.warns(UserWarning, match="1 of 3 series never forecast"):  # the held one
        result = tidecast.replay(frame, horizon=2, model_params=SN12)
    assert result.plot(1).axes[0].get_title().startswith("1 ")  # ids are strings in the result: 1 is "1"
    assert result.summary("series")["unique_id"].astype(str).tolist() == ["1", "2"]
    with pytest.raises(ValueError, match=r"no series 3 in this replay; series: 1, 2 \(1 series seen at one timestamp"):
        result.plot(3)
    subset = dataclasses.replace(result, forecasts=result.forecasts[result.forecasts["h"] == 1])
    assert len(subset.summary()) == 1  # scales follow the frame they score (a cached copy once broke this)


def test_a_filtered_frame_keeps_each_series_scale_whatever_its_categories():
    result = tidecast.replay(noisy_cycles(300, series=("a", "b", "c")), horizon=2, model_params=SN12)
    by_series = result.summary("series").set_index("unique_id")["mase"]
    only_c = result.forecasts[result.forecasts["unique_id"] == "c"]
    for ids in (only_c["unique_id"].cat.remove_unused_categories(), only_c["unique_id"].astype(str)):
        mine = dataclasses.replace(result, forecasts=only_c.assign(unique_id=ids))  # c's code is 0, or no codes
        assert mine.summary()["mase"].item() == pytest.approx(by_series["c"])  # once a's scale: wrong by 20 %
        assert len(mine.to_nixtla()) == len(only_c)  # one row per (target, origin) with one model


def test_the_clis_spellings_and_none_are_read_as_the_cli_reads_them(tmp_path):
    frame = noisy_cycles(300, series=("a", "b", "c")).pivot(index="ds", columns="unique_id", values="y")
    result = tidecast.replay(frame, columns="a,b", freq="h", alpha="0.2", model_params=SN12, horizon=2)
    assert result.summary("series")["unique_id"].astype(str).tolist() == ["a", "b"]  # once 'a', ',', 'b'
    assert result.levels == ["80"]
    assert tidecast.replay(frame, levels=(50,), alpha=None, model_params=None, horizon=2).levels == ["50"]
    with pytest.raises(ValueError, match="alpha='x': not a number"):
        tidecast.replay(frame, alpha="x")
    for calendar in ("MS", "1MS", "2MS"):  # pandas' Timedelta reads "1MS" as one millisecond: 299 gap resets
        with pytest.raises(ValueError, match="MS is a calendar frequency, not a fixed time step"):
            tidecast.replay(frame, freq=calendar)
    assert result.report(tmp_path / "one.html", series="b").stat().st_size > 0  # once series 'b' split to chars
    with pytest.raises(ValueError, match="no series 'zz'"):
        result.report(tmp_path / "two.html", series="a,zz")


def test_a_lanes_promotion_is_drawn_on_its_series_and_dollar_ids_render(tmp_path):
    """Retrain events belong to a lane (empty series id): the plot of every series of that model draws them. A
    series id with two '$' was parsed as matplotlib mathtext and failed the whole report."""
    frame = noisy_cycles(200, series=("cost_$_2024_$", "b"))
    result = tidecast.replay(frame, models=["seasonal-naive"], horizon=2, model_params=SN12)
    result.events = events_frame([{"series_id": "", "model": "seasonal-naive", "detector": "retrain",
                                   "kind": "promoted", "at": "2024-01-05T00:00:00Z"},
                                  {"series_id": "", "model": "other-lane", "detector": "retrain",
                                   "kind": "promoted", "at": "2024-01-06T00:00:00Z"},
                                  {"series_id": "", "model": "seasonal-naive", "detector": "retrain",
                                   "kind": "rejected", "at": "2024-01-07T00:00:00Z"}])  # changes nothing
    fig = result.plot("cost_$_2024_$")
    fig.savefig(tmp_path / "plot.png")  # renders the title and labels
    (ax,) = fig.axes
    assert ax.get_title().startswith(r"cost_\$_2024_\$")  # drawn literally, not as mathtext
    assert "retrain promoted" in [text.get_text() for text in ax.get_legend().get_texts()]
    assert len([line for line in ax.get_lines() if len(set(line.get_xdata())) == 1]) == 1  # not the other lane's,
    # nor a rejected candidate's
    report = result.report(tmp_path / "report.html")
    assert "cost_$_2024_$" in Path(report).read_text()


@pytest.mark.slow
def test_notebook_etth1_two_models_two_levels_cover_their_targets():
    """Issue 16's notebook check on ETTh1: per model, coverage over all horizons within 0.02 of each target and
    per horizon within 0.03; ``y`` filled for every matured row. All 7 channels of the first year (8,760 hours;
    the whole file costs twice the time and is measured in the README), CycleNet with its defaults."""
    wide = pd.read_csv(ETTH1, nrows=8760)
    df_long = wide.melt(id_vars="date", var_name="unique_id", value_name="y").rename(columns={"date": "ds"})
    result = tidecast.replay(df_long, models=["seasonal-naive", "cyclenet"], horizon=24, levels=(80, 95))
    f = result.forecasts
    last = pd.to_datetime(wide["date"]).max().tz_localize("UTC")
    matured = f["ds"] <= last
    assert f.loc[matured, "y"].notna().all() and f.loc[~matured, "y"].isna().all()
    summary = result.summary().set_index("model")
    by_h = result.summary("horizon")
    assert set(summary.index) == {"seasonal-naive", "cyclenet"}
    for level, target in (("80", 0.80), ("95", 0.95)):
        assert (summary[f"coverage-{level}"] - target).abs().max() <= 0.02, summary[f"coverage-{level}"]
        assert (by_h[f"coverage-{level}"] - target).abs().max() <= 0.03, by_h[f"coverage-{level}"].describe()


def test_the_engines_drift_alarms_arrive_as_events_and_are_drawn():
    """A level jump at hour 400: the lane's drift monitor (the engine's default detector) raises an alarm soon
    after, and it reaches ``result.events`` (the frame the plot and the report read) as the summary counts it."""
    frame = noisy_cycles(600, series=("a",))
    jump = frame["ds"].iloc[400].tz_localize("UTC")
    frame.loc[400:, "y"] += 8.0
    result = tidecast.replay(frame, models=["seasonal-naive"], horizon=6, levels=(80, 95), model_params=SN12)
    events = result.events
    assert len(events) == sum(n for per_model in result.run["drift_events"].values() for n in per_model.values()) > 0
    assert set(events["unique_id"]) == {"a"} and set(events["model"]) == {"seasonal-naive"}
    first = events["at"].min()
    assert jump <= first < jump + 24 * HOUR
    (ax,) = result.plot("a").axes
    assert any(text.get_text().startswith(events["detector"].iloc[0]) for text in ax.get_legend().get_texts())


def test_mase_scale_is_taken_on_the_grid_when_values_are_missing():
    """Missing values must not squeeze the history: the scale is the mean |y_t - y_{t-m}| over ticks m apart on
    the series' grid, with m detected on the grid (it read 23 with 5 % of a daily cycle's hours missing)."""
    rng = np.random.default_rng(0)
    n = 3000
    t = pd.date_range("2024-01-01", periods=n, freq="h")
    y = 10 * np.sin(2 * np.pi * np.arange(n) / 24) + rng.normal(0, 1, n)
    mase = {}
    for missing in (0.0, 0.3):
        keep = rng.random(n) > missing
        keep[:8] = True
        frame = pd.DataFrame({"unique_id": "s", "ds": t[keep], "y": y[keep]})
        result = tidecast.replay(frame, horizon=1, max_gap=48, model_params={"seasonal-naive": {"period": 24}})
        mase[missing] = float(result.summary()["mase"].iloc[0])
    assert 0.9 < mase[0.0] < 1.1 and 0.9 < mase[0.3] < 1.1, mase  # 0.107 with 30 % missing before


def test_a_stray_timestamp_decades_off_does_not_blow_up_the_scale():
    """One clock-glitch row in 1970 among one-second steps: the scale was computed on a dense grid over the whole
    span (12.7 GiB)."""
    t = list(pd.date_range("2024-01-01", periods=600, freq="s")) + [pd.Timestamp("1970-01-01")]
    frame = pd.DataFrame({"unique_id": "s", "ds": t, "y": [*np.sin(np.arange(600) / 10), 0.0]})
    assert np.isfinite(tidecast.replay(frame, horizon=1).summary()["mase"]).all()


def test_a_series_id_with_a_lone_surrogate_is_a_dead_letter_not_an_exception():
    frame = noisy_cycles(50, series=("a",)).astype({"unique_id": object})
    frame.at[5, "unique_id"] = "\ud800"
    result = tidecast.replay(frame, model_params=SN12)
    assert result.dead_letters["reason"].tolist() == ["bad_series_id"] and len(result.actuals) == 49


def test_levels_given_as_strings_are_numbers_and_anything_else_is_a_clear_error():
    frame = noisy_cycles(60, series=("a",))
    assert tidecast.replay(frame, levels=("80",), model_params=SN12).levels == ["80"]
    for bad, error in ((("x",), ValueError), ((True,), TypeError), ([None], TypeError)):
        with pytest.raises(error, match="levels are percentages"):
            tidecast.replay(frame, levels=bad, model_params=SN12)


def test_a_model_that_issued_nothing_keeps_its_row_in_the_summary():
    result = tidecast.replay(noisy_cycles(300, series=("a",)), models=["seasonal-naive", "cyclenet"], horizon=2,
                             model_params=SN12)
    summary = result.summary().set_index("model")
    assert list(summary.index) == ["seasonal-naive", "cyclenet"]  # cyclenet's first fit needs 2,000 values
    assert summary.loc["cyclenet", "n_forecasts"] == 0 and summary.loc["seasonal-naive", "n_forecasts"] > 0
    assert summary.loc["cyclenet", "n_forecasts"] == result.run["models"]["cyclenet"]["n_forecasts"]


def test_allowed_series_as_one_comma_separated_string_is_split_as_the_cli_does():
    """Found by the API review (2026-12-04): "a,b" became the set of its letters, so both named series were
    dead-lettered as unknown and a series called "a" alone would have been kept."""
    frame = noisy_cycles(60, series=("sensor-1", "sensor-2", "s"))
    result = tidecast.replay(frame, allowed_series="sensor-1,sensor-2", horizon=2, model_params=SN12)
    assert sorted(result.forecasts["unique_id"].unique()) == ["sensor-1", "sensor-2"]  # ["s"] before


def test_a_series_id_with_a_trailing_nul_stays_its_own_series_in_every_output(tmp_path):
    """Found by the output review (2026-12-04): numpy's astype(str) drops trailing NULs, so "a" and "a\\0" became one
    series in --out files and in the API's outcomes: "a\\0" got no y, and "a" was scored against both."""
    frame = noisy_cycles(60, series=("a", "a\0"))
    frame.loc[frame["unique_id"] == "a\0", "y"] += 1000.0
    result = tidecast.replay(frame, horizon=2, model_params=SN12)
    f = result.forecasts
    assert sorted(f["unique_id"].unique()) == ["a", "a\0"]
    for sid in ("a", "a\0"):
        rows = f[f["unique_id"] == sid]
        assert rows["y"].notna().sum() >= len(rows) - 3  # all but the last two origins' 3 steps matured
        assert (rows["y"] - rows["mean"]).abs().median() < 10  # its own outcomes, not the other series'
    out = tmp_path / "out.parquet"
    from tidecast.stream.cli import main

    frame.to_parquet(tmp_path / "in.parquet")
    assert main(["replay", str(tmp_path / "in.parquet"), "--horizon", "2", "--model-param",
                 "seasonal-naive.period=12", "--out", str(out), "--no-progress", "--dead-letter",
                 str(tmp_path / "dead.jsonl")]) == 0
    assert sorted(pd.read_parquet(out)["series_id"].unique()) == ["a", "a\0"]


@pytest.mark.parametrize("freq", ["1h", None])
def test_mase_scales_are_taken_on_the_engines_grid(freq):
    """Found by the API review (2026-12-04): scales() re-inferred each series' step from all its gaps, not from the
    engine's grid (freq=, or its first 8 observations): hourly at first then every other hour, the scale was taken
    on a 2 h grid, off by up to 195 %, and summary() read MASE 0.92 where the definition gives 1.03."""
    from tidecast.monitors.accuracy import PERIOD_HEAD, running_scale_at, scale_period

    rng = np.random.default_rng(12)
    hours = np.r_[np.arange(30), 30 + 2 * np.arange(300)]
    y = np.sin(2 * np.pi * hours / 24) * 5 + rng.normal(0, 0.5, hours.size)
    start = pd.Timestamp("2024-01-01")
    frame = pd.DataFrame({"unique_id": "a", "ds": start + pd.to_timedelta(hours, unit="h"), "y": y})
    result = tidecast.replay(frame, horizon=2, freq=freq, model_params={"seasonal-naive": {"period": 24}})
    head = np.full(PERIOD_HEAD, np.nan)
    head[hours[hours < PERIOD_HEAD]] = y[hours < PERIOD_HEAD]
    at = ((result.forecasts["cutoff"] - start.tz_localize("UTC")) / pd.Timedelta("1h")).round().astype(int)
    expected = running_scale_at(hours, y, scale_period(head), at.to_numpy())
    assert np.allclose(result.scales(), expected, equal_nan=True)


def test_a_frame_with_two_level_columns_is_told_how_to_flatten_them():
    """Found by the API review (2026-12-04): the columns became "('ds', '')" and the error said the time column
    ('ds', '') was not in [('ds', ''), ...]. The suggested flattening works."""
    frame = pd.DataFrame(np.arange(40.0).reshape(20, 2), columns=pd.MultiIndex.from_tuples([("a", "x"), ("a", "y")]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas warns about a short key on two-level columns
        frame.insert(0, "ds", pd.date_range("2024-01-01", periods=20, freq="h"))
    with pytest.raises(ValueError, match="2 levels") as info:
        tidecast.replay(frame, horizon=2)
    frame.columns = ["/".join(map(str, c)).strip("/") for c in frame.columns]
    assert "frame.columns = ['/'.join(map(str, c)).strip('/') for c in frame.columns]" in str(info.value)
    assert sorted(tidecast.replay(frame, horizon=2).actuals["unique_id"].unique()) == ["a/x", "a/y"]


def test_nixtla_layout_of_a_forecasts_frame_with_plain_text_models(result):
    """A forecasts frame read back from CSV (or concatenated) holds plain str in "model": to_nixtla raised
    AttributeError on .cat while summary() worked."""
    import dataclasses

    plain = dataclasses.replace(result, forecasts=result.forecasts.astype({"model": str, "unique_id": str}))
    pd.testing.assert_frame_equal(plain.to_nixtla().drop(columns="unique_id"),
                                  result.to_nixtla().drop(columns="unique_id"))
