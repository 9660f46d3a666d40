"""The ensemble wrapper on a small model whose members differ by their seed: mean forecasts, spreads, calibration
hand-offs, state under member prefixes."""

from __future__ import annotations

import numpy as np
import pytest

from tidecast.models.base import Calibration
from tidecast.models.ensemble import Ensemble
from tidecast.models.naive import SeasonalNaive
from tidecast.models.persistence import PersistenceBlend


class Offset(SeasonalNaive):
    """Seasonal naive plus ``seed`` (so members differ), with a residual bootstrap spread of ``seed`` and a
    calibration queue the test fills."""

    def __init__(self, period: int = 2, seed: int = 0, bootstrap: int = 1) -> None:
        super().__init__(period=period)
        self.seed, self.bootstrap = seed, bootstrap
        self.handed: list[Calibration] = []

    def forecast_many(self, rows, horizon):
        return super().forecast_many(rows, horizon) + self.seed

    def spread_many(self, rows, horizon):
        return np.full((len(rows), horizon), float(self.seed))

    def pop_calibration(self, horizon):
        return self.handed.pop(0) if self.handed else None


def fed(size: int = 3) -> Ensemble:
    model = Ensemble(Offset, {"period": 2}, size=size, seed=1)
    model.resize(2)
    for tick in range(4):
        model.learn_many(np.arange(2), np.full(2, tick), np.array([tick % 2, 5.0]))
    return model


def test_mean_forecast_and_spread_of_members_seeded_apart():
    model = fed()
    rows = np.arange(2)
    got = model.forecast_many(rows, 2)
    np.testing.assert_allclose(got, [[0 + 2, 1 + 2], [5 + 2, 5 + 2]])  # seeds 1, 2, 3: mean offset 2
    spread = model.spread_many(rows, 2)  # sqrt(mean(spread^2) + var(member means)) = sqrt(14/3 + 2/3)
    np.testing.assert_allclose(spread, np.sqrt(16 / 3))
    assert model.bootstrap == 1 and model.get_params() == {"period": 2, "seed": 1, "bootstrap": 1, "members": 3}


def test_calibration_waits_for_every_member_and_hands_over_the_mean_residual():
    model = fed(2)
    rows = np.array([0, 1])
    first = Calibration(rows, np.ones((2, 3, 2)))
    model.members_[0].handed.append(first)
    assert model.pop_calibration(2) is None  # member 1 has not handed over yet
    model.members_[1].handed.append(Calibration(rows, np.full((2, 3, 2), 3.0)))
    got = model.pop_calibration(2)
    np.testing.assert_array_equal(got.rows, rows)
    np.testing.assert_allclose(got.residuals, 2.0)  # y - mean(yhat) = mean(y - yhat)
    assert model.pop_calibration(2) is None
    model.members_[0].handed.append(Calibration(rows[:1], np.ones((1, 3, 2))))
    model.members_[1].handed.append(Calibration(rows, np.ones((2, 3, 2))))
    assert model.pop_calibration(2).rows.tolist() == [0]  # rows differ: the first member's hand-off


def test_state_round_trip_under_member_prefixes_and_clone():
    model = fed()
    rows = np.arange(2)
    state = model.export_rows(rows)
    assert {k.split(".")[0] for k in state} == {"m0", "m1", "m2"}
    other = model.clone()
    other.resize(4)
    other.import_rows(rows + 2, state)
    np.testing.assert_array_equal(other.forecast_many(rows + 2, 2), model.forecast_many(rows, 2))
    assert model.export_shared() == ({}, {})  # per-series members: nothing shared
    assert [m.seed for m in model.clone(members=2, seed=5).members_] == [5, 6]
    with pytest.raises(ValueError, match="at least one member"):
        Ensemble(Offset, {}, size=0)


def blended(size: int = 3, n_rows: int = 4) -> Ensemble:
    model = Ensemble(Offset, {"period": 2}, size=size, seed=1, persistence_half_life=50, horizon=2)
    model.resize(n_rows)  # as the engine does before a row's first value
    return model


def test_the_blend_with_the_last_value_goes_around_the_members_mean():
    """The ensemble serves the blend of its mean, scored on the mean's own matured errors (a reference blend fed
    the same mean forecasts agrees); the members stay unblended; the spread shrinks with the model's weight."""
    model, reference = blended(), PersistenceBlend(horizon=2, half_life=50)
    rows = np.arange(2)
    served = []
    for tick in range(30):
        values = np.array([float(tick % 2), 5.0])
        model.learn_many(rows, np.full(2, tick), values)
        reference.learn(rows, np.full(2, tick), values)
        if tick < 1:
            continue
        mean = np.mean([m.forecast_many(rows, 2) for m in model.members_], axis=0)
        got = model.forecast_many(rows, 2)
        np.testing.assert_allclose(got, reference.combine(rows, np.full(2, tick), values, mean))
        served.append((got, mean))
    first, first_mean = served[0]
    np.testing.assert_array_equal(first, first_mean)  # nothing matured yet: the mean as it is
    last, last_mean = served[-1]
    np.testing.assert_allclose(last_mean[1], 7.0)  # the constant series: members 2 too high on average ...
    np.testing.assert_allclose(last[1], 5.0)  # ... the blend serves the last value
    weights = model._persistence.weights(rows)
    assert 0.0 < weights[0, 0] < 1.0 and np.all(weights[1] == 0.0)
    np.testing.assert_allclose(model.spread_many(rows, 2), np.sqrt(16 / 3) * weights)
    assert model.get_params()["persistence_half_life"] == 50
    assert model.clone(members=2).persistence_half_life == 50
    with pytest.raises(ValueError, match="horizon"):
        Ensemble(Offset, {"period": 2}, size=2, persistence_half_life=50)


def test_a_filled_value_is_neither_scored_nor_the_last_value():
    model = blended()
    rows = np.array([0])
    for tick in range(6):
        model.learn_many(rows, np.array([tick]), np.array([5.0]))
    before = model.export_rows(rows)["persistence.sums"].copy()
    model.learn_many(rows, np.array([6]), np.array([9.0]), filled=np.array([True]))
    np.testing.assert_array_equal(model.export_rows(rows)["persistence.sums"], before)
    assert model.last_["value"][0] == 5.0 and model.last_["tick"][0] == 5


def test_the_blend_state_round_trips_and_a_state_without_it_starts_blank():
    model = blended()
    rows = np.arange(2)
    for tick in range(12):
        model.learn_many(rows, np.full(2, tick), np.array([float(tick % 2), 5.0]))
        model.forecast_many(rows, 2)
    state = model.export_rows(rows)
    assert {k.split(".")[0] for k in state} == {"m0", "m1", "m2", "persistence", "ensemble"}
    other = model.clone()
    other.resize(4)
    other.import_rows(rows + 2, state)
    np.testing.assert_array_equal(other.forecast_many(rows + 2, 2), model.forecast_many(rows, 2))
    unblended = {k: v for k, v in state.items() if k.startswith("m")}  # saved with the blend off
    other.import_rows(rows, unblended)
    mean = np.mean([m.forecast_many(rows, 2) for m in other.members_], axis=0)
    np.testing.assert_array_equal(other.forecast_many(rows, 2), mean)  # weight 1 until targets mature


def test_a_dropped_rows_waiting_hand_off_is_not_handed_to_the_rows_next_series():
    """Found by the models review (2026-12-04): a member's calibration hand-off waits in the ensemble until every
    member has handed one; drop_rows did not touch the queue, so the dropped series' residuals seeded whatever
    series took the row next. And an ensemble whose members share nothing refused its own empty export."""

    class Handing(SeasonalNaive):
        def __init__(self, period: int = 6, seed: int = 0) -> None:
            super().__init__(period=period)
            self.to_hand: list = []

        def pop_calibration(self, horizon: int):
            return self.to_hand.pop(0) if self.to_hand else None

    ensemble = Ensemble(lambda seed, **p: Handing(seed=seed, **p), {"period": 6}, size=2)
    ensemble.resize(2)
    first, second = ensemble.members_
    first.to_hand.append(Calibration(np.array([0, 1]), np.full((2, 3, 1), 5.0)))
    assert ensemble.pop_calibration(1) is None  # waits for the second member
    ensemble.drop_rows(np.array([0]))
    second.to_hand.append(Calibration(np.array([0, 1]), np.full((2, 3, 1), 1.0)))
    handed = ensemble.pop_calibration(1)
    assert handed.rows.tolist() == [1]
    ensemble.import_shared(*ensemble.export_shared())  # ({}, {}): nothing to import, no error


def test_a_hand_off_emptied_by_drop_rows_leaves_the_members_paired():
    """Found by the review of the change above: the emptied waiting hand-off stayed in the ensemble's queue while
    the other member's own queue discarded its copy, and every later round paired hand-offs of different fits."""
    from tidecast.models.base import CalibrationQueue

    class Member(SeasonalNaive):  # hands off through a CalibrationQueue, discarding on drop_rows, as CycleNet does
        def __init__(self, period: int = 2, seed: int = 0) -> None:
            super().__init__(period=period)
            self.queue = CalibrationQueue()

        def drop_rows(self, rows: np.ndarray) -> None:
            super().drop_rows(rows)
            self.queue.discard(rows)

        def pop_calibration(self, horizon: int):
            return self.queue.pop()

    ensemble = Ensemble(lambda seed, **p: Member(seed=seed, **p), {"period": 2}, size=2)
    ensemble.resize(3)
    first, second = ensemble.members_
    first.queue.put(Calibration(np.array([0]), np.full((1, 2, 1), 9.0)))
    assert ensemble.pop_calibration(1) is None  # waits for the second member
    second.queue.put(Calibration(np.array([0]), np.full((1, 2, 1), 9.0)))
    ensemble.drop_rows(np.array([0]))
    first.queue.put(Calibration(np.array([1, 2]), np.full((2, 2, 1), 1.0)))
    second.queue.put(Calibration(np.array([1, 2]), np.full((2, 2, 1), 3.0)))
    handed = ensemble.pop_calibration(1)
    assert handed.rows.tolist() == [1, 2] and np.all(handed.residuals == 2.0)  # the two members' mean
    assert ensemble.pop_calibration(1) is None and not any(ensemble._handed)
