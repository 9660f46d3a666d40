"""Several interval levels at once (``--level 80,95``): one calibrator pass, every level pending, scored, exported
as records and metrics; state saved before levels existed still restores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tidecast.stream.batch import ObservationBatch
from tidecast.stream.cli import main
from tidecast.stream.config import EngineConfig
from tidecast.stream.engine import Engine
from tidecast.stream.settings import SettingsError
from tidecast.stream.state import config_fingerprint

HOUR = 3_600_000_000_000
T0 = 1_467_331_200_000_000_000  # 2016-07-01T00:00Z


def stream(n: int = 600, series: tuple[str, ...] = ("a", "b"), seed: int = 3) -> ObservationBatch:
    rng = np.random.default_rng(seed)
    t = np.repeat(np.arange(n), len(series))
    ids = np.tile(np.array(series, dtype=object), n)
    values = 10 + 3 * np.sin(2 * np.pi * t / 24) + rng.standard_t(4, t.size)
    return ObservationBatch(ids, T0 + t * HOUR, values)


def run(batches: list[ObservationBatch], **config) -> tuple[Engine, list]:
    engine = Engine.from_config(EngineConfig(models=["seasonal-naive"], horizon=4, freq="1h",
                                             model_params={"seasonal-naive": {"period": 24}}, **config))
    return engine, [engine.process(b).forecasts for b in batches]


def chunks(batch: ObservationBatch, size: int = 250) -> list[ObservationBatch]:
    return [batch.take(np.arange(i, min(i + size, len(batch)))) for i in range(0, len(batch), size)]


def test_every_level_is_learned_in_one_pass_exactly_as_alone():
    """The calibrator's levels are independent targets: two levels in one pass give the bounds each level
    gives on its own (where they do not cross: then the wider is widened to contain the narrower, below), and
    the first level is the record's lower/upper."""
    data = chunks(stream())
    engine, both = run(data, levels=[80, 95])
    assert engine.lanes[0].calibrator.alphas_.tolist() == [0.2, 0.05]
    _, only80 = run(data, alpha=0.2)
    _, only95 = run(data, levels=[95])
    for pair, a80, a95 in zip(both, only80, only95, strict=True):
        assert pair.levels == ("80", "95") and pair.lowers.shape == (len(pair), 2)
        np.testing.assert_array_equal(pair.lower, pair.lowers[:, 0])
        np.testing.assert_array_equal(pair.lowers[:, 0], a80.lower)
        np.testing.assert_array_equal(pair.uppers[:, 0], a80.upper)
        np.testing.assert_array_equal(pair.lowers[:, 1], a95.lower)
        np.testing.assert_array_equal(pair.uppers[:, 1], a95.upper)
    frame = both[-1].to_frame()
    assert ((frame["hi-95"] - frame["lo-95"]) > (frame["hi-80"] - frame["lo-80"])).mean() > 0.95


@pytest.mark.parametrize("calibrator", ["aci", "conformal-pid", "dtaci", "quantile-tracker", "saocp", "sf-ogd"])
def test_every_calibrators_levels_nest_and_no_interval_is_upside_down(calibrator):
    """A fan chart's bands must nest and lower <= upper must hold to the last bit: levels are learned apart and
    their thresholds crossed (saocp: thousands of rows of NYC taxi; an 80 % "interval" a point outside the 95 %
    one), and an empty set issued as a point came out with lower above upper by one ulp."""
    _, out = run(chunks(stream(900, seed=5)), levels=[50, 80, 95], calibrator=calibrator)
    lowers = np.concatenate([f.lowers for f in out])
    uppers = np.concatenate([f.uppers for f in out])
    issued = np.isfinite(lowers).all(axis=1)
    assert issued.sum() > 1000
    lo, hi = lowers[issued], uppers[issued]
    assert (lo <= hi).all()
    assert (np.diff(lo, axis=1) <= 0).all() and (np.diff(hi, axis=1) >= 0).all()  # 50 inside 80 inside 95


def test_the_summary_and_the_metrics_report_each_level():
    engine, _ = run(chunks(stream()), levels=[80, 95], coverage_window=100)  # rolling gauges: ~100 steps
    scores = engine.summary()["models"]["seasonal-naive"]
    assert set(scores["levels"]) == {"80", "95"}
    assert scores["coverage"] == scores["levels"]["80"]["coverage"]
    assert 0.75 < scores["levels"]["80"]["coverage"] < 0.85 and 0.92 < scores["levels"]["95"]["coverage"] < 0.98
    assert scores["levels"]["95"]["mean_width"] > scores["levels"]["80"]["mean_width"]
    assert scores["by_horizon"]["4"]["levels"]["95"]["target"] == pytest.approx(0.95)
    registry = engine.metrics.registry
    for level, target in (("80", 0.8), ("95", 0.95)):
        assert registry.get_sample_value("tidecast_interval_target_coverage_ratio",
                                         {"model": "seasonal-naive", "level": level}) == pytest.approx(target)
        coverage = registry.get_sample_value("tidecast_interval_coverage_ratio",
                                             {"model": "seasonal-naive", "horizon": "1", "level": level})
        assert abs(coverage - target) < 0.1
        assert registry.get_sample_value("tidecast_interval_width",
                                         {"model": "seasonal-naive", "horizon": "4", "level": level}) > 0


def test_levels_at_or_below_50_percent_run_with_every_watcher():
    """A fan chart's 50 % band as the first level (alpha 0.5): the drift detector's coverage watcher takes the
    first level's alpha, and every level is still learned to its target."""
    engine, _ = run(chunks(stream(n=1200)), levels=[50, 80, 99], coverage_window=100)
    levels = engine.summary()["models"]["seasonal-naive"]["levels"]
    for level, target in (("50", 0.5), ("80", 0.8), ("99", 0.99)):
        assert abs(levels[level]["coverage"] - target) < 0.03, (level, levels[level]["coverage"])


def test_state_saved_before_levels_existed_restores_and_continues_identically():
    """Pending bounds used to have no level axis; such state, under the one-level configuration it was saved
    with, continues exactly like the uninterrupted engine, and its fingerprint is unchanged."""
    data = chunks(stream(), 300)
    whole, _ = run(data[:2], alpha=0.1)
    ids = sorted(whole.series_ids)
    meta, arrays = whole.export_series(ids)
    old = {k: (v[..., 0] if k.endswith(("pending/lower", "pending/upper")) else v) for k, v in arrays.items()}
    # a conformal-PID lane keeps no pending bounds (its calibrator answers for them, see stream/pending.py); where
    # they are kept, drop their level axis (the square layout before it is tested in tests/test_scale.py)
    assert all(old[k].ndim == 2 for k in old if k.endswith("pending/lower"))
    restored, _ = run([], alpha=0.1)
    restored.import_series(meta, old)
    for batch in data[2:]:
        a, b = whole.process(batch).forecasts, restored.process(batch).forecasts
        np.testing.assert_array_equal(a.lower, b.lower)
        np.testing.assert_array_equal(a.upper, b.upper)
    assert whole.summary()["models"] == restored.summary()["models"]
    assert "levels" not in config_fingerprint(EngineConfig().to_dict())  # old fingerprints still match
    assert config_fingerprint(EngineConfig(levels=[80, 95]).to_dict())["levels"] == [80.0, 95.0]


def test_levels_are_checked_and_alpha_is_their_one_level_shorthand():
    assert EngineConfig(levels=[95, 80]).alpha == pytest.approx(0.05)  # the first level is lower/upper's
    assert EngineConfig(alpha=0.05, levels=[95]).level_names == ["95"]
    assert EngineConfig(alpha=0.025).level_names == ["97.5"]
    for bad, message in (([80, 80], "twice"), ([0], "in \\(0, 100\\)"), ([], "at least one")):
        with pytest.raises(SettingsError, match=message):
            EngineConfig(levels=bad)


def test_replay_command_takes_levels_and_refuses_a_contradicting_alpha(tmp_path, capsys):
    path = tmp_path / "s.csv"
    rows = stream(300, ("v",))
    path.write_text("ds,v\n" + "".join(f"{t},{v}\n" for t, v in zip(rows.timestamps_ns // 10**9, rows.values,
                                                                      strict=True)))
    summary = tmp_path / "summary.json"
    assert main(["replay", str(path), "--level", "80,95", "--horizon", "2", "--model-param",
                 "seasonal-naive.period=24", "--no-progress", "--summary-json", str(summary), "--out",
                 str(tmp_path / "f.csv"), "--dead-letter", str(tmp_path / "d.jsonl")]) == 0
    scores = json.loads(summary.read_text())["models"]["seasonal-naive"]
    assert set(scores["levels"]) == {"80", "95"}
    assert "coverage 80" in capsys.readouterr().out
    header = (tmp_path / "f.csv").read_text().splitlines()[0]
    assert header.endswith("lower,upper,alpha,lo-80,hi-80,lo-95,hi-95")
    assert main(["replay", str(path), "--level", "80,95", "--alpha", "0.05", "--no-progress"]) == 2
    assert "alpha 0.05 contradicts level 80,95" in capsys.readouterr().err
    # from sources of different precedence the higher one wins, as for any setting (a deployment's file sets
    # alpha = 0.1 and an operator's --level or TIDECAST_LEVEL used to be refused)
    config = tmp_path / "t.toml"
    config.write_text("alpha = 0.1\n")
    out = tmp_path / "g.csv"
    assert main(["replay", str(path), "--config", str(config), "--level", "80,95", "--horizon", "2",
                 "--model-param", "seasonal-naive.period=24", "--no-progress", "--out", str(out)]) == 0
    assert out.read_text().splitlines()[0].endswith("alpha,lo-80,hi-80,lo-95,hi-95")
    config.write_text("levels = [80, 95]\n")
    assert main(["replay", str(path), "--config", str(config), "--alpha", "0.2", "--horizon", "2",
                 "--model-param", "seasonal-naive.period=24", "--no-progress", "--out", str(out)]) == 0
    header = out.read_text().splitlines()[0]
    assert header.endswith("alpha,lo-80,hi-80") and "lo-95" not in header  # the flag's one level
    column = header.split(",").index("alpha")
    assert {line.split(",")[column] for line in out.read_text().splitlines()[1:]} == {"0.2"}


def test_a_calibrator_that_gives_one_level_is_refused_when_several_are_asked_for():
    from tidecast.models.naive import SeasonalNaive
    from tidecast.monitors.conformal.base import Calibrator
    from tidecast.stream.engine import Lane

    class OneLevel(Calibrator):
        name = "one-level"

        def resize(self, n_rows): ...

        def update(self, rows, residuals, mask): ...

        def interval(self, rows, means):
            return means - 1, means + 1

        def export_rows(self, rows):
            return {}

        def import_rows(self, rows, state): ...

    with pytest.raises(ValueError, match="calibrator 'one-level' gives one interval level .* 2 were asked for"):
        Lane(SeasonalNaive(period=2), OneLevel(3, (0.2, 0.05)), 3, (0.2, 0.05))
    Lane(SeasonalNaive(period=2), OneLevel(3, 0.1), 3, 0.1)  # one level: fine


def test_levels_too_fine_to_learn_or_to_name_apart_are_refused():
    """Found by the conformal and API reviews (2026-12-04): alpha 1e-17 gave conformal PID an infinite prior, so
    every interval was infinite; levels 80 and 80.00001 (or 99.9 and 99.99999, named '100') shared their names, and
    one level's bounds overwrote the other's columns."""
    with pytest.raises(SettingsError, match="alpha 1e-17: must be at least 1e-06"):
        EngineConfig(alpha=1e-17)
    with pytest.raises(SettingsError, match="99.99999 is finer than a calibrator can learn"):
        EngineConfig(levels=[99.9, 99.99999])
    with pytest.raises(SettingsError, match=r"share the names \['80', '80'\]"):
        EngineConfig(levels=[80, 80.00001])
    assert EngineConfig(levels=[80, 99.9999]).levels == [80, 99.9999]


def test_spci_floors_each_level_apart_so_a_wide_one_leaves_a_narrow_one_alone():
    """Extremes review (2026-12-05): SPCI's Gaussian floor for cells with fewer residuals than 1/a applied to every
    level while the widest was short of them: adding 99.9 % held the 10 % interval at the floor for 2,000
    residuals (its coverage 0.25 instead of 0.09)."""
    from tidecast.monitors.conformal import make_calibrator

    residuals = np.random.default_rng(4).normal(size=120)
    bounds = {}
    for levels in ((0.9,), (0.9, 0.001)):  # alphas: the 10 % level alone, then beside 99.9 %
        cal = make_calibrator("spci", 1, list(levels))
        rows, got = np.array([0]), []
        for value in residuals:
            cal.update(rows, np.array([[value]]), np.ones((1, 1), bool))
            lower, upper = cal.intervals(rows, np.zeros((1, 1)))
            got.append((lower[0, 0, 0], upper[0, 0, 0]))
        bounds[levels] = np.array(got)
    np.testing.assert_array_equal(bounds[(0.9, 0.001)], bounds[(0.9,)])
