"""A lane's step clock: the newest grid time step it has seen, and the steps each round completes.

The engine cuts rounds into buckets of the finest grid step (:meth:`tidecast.stream.engine.Engine._step_time`).
A batch may cut one step's rows into several rounds, a lagging partition may bring older steps after newer ones,
and a gap filled late brings its filled ticks' older steps: none of these is a new step. The clock moves only
forward, so the retrain policy and its shadow count each grid time once, and the online learners take one
learning round per step, whatever the batches and partitions.

One mistyped time (a row stamped 2124 for 2024) must not carry the clock a century ahead: a step further ahead
than the longest gap the engine fills waits for a later step as far ahead before the clock moves to it (a lane
resuming after a long silence moves on one round later), and it is dropped once the clock moves on without it.
What it cannot tell from a real jump: a mistyped first row (nothing to compare it with), and two rows mistyped
alike at increasing times before the clock moves on.

>>> clock = StepClock()
>>> hour = 3_600 * 10**9
>>> [clock.advance(t * hour, limit_ns=6 * hour) for t in (0, 1, 1, 0, 2)]  # a cut step, then a late one
[[], [0], [], [], [3600000000000]]
>>> clock.advance(100 * 365 * 24 * hour, limit_ns=6 * hour), clock.last_ns // hour  # a typo: held, not taken
([], 2)
>>> clock.advance(3 * hour, limit_ns=6 * hour), clock.ahead_ns  # the clock moves on: the typo is dropped
([7200000000000], None)
"""

from __future__ import annotations

from typing import Any


class StepClock:
    """The newest step time seen (epoch ns, ``last_ns``) and a far-ahead one held for confirmation
    (``ahead_ns``)."""

    def __init__(self) -> None:
        self.last_ns: int | None = None
        self.ahead_ns: int | None = None

    def advance(self, at_ns: int, limit_ns: int) -> list[int]:
        """A round of step ``at_ns``: the steps it completes, oldest first (none, one, or two when it confirms a
        held one). ``limit_ns``: how far ahead a step may be and still be taken at once."""
        if self.last_ns is None:
            self.last_ns = at_ns
            return []
        if at_ns <= self.last_ns:  # the same step (a batch cut it), or an older one (a lagging partition, a fill)
            return []
        done = []
        if at_ns - self.last_ns > limit_ns:
            if self.ahead_ns is None or at_ns <= self.ahead_ns:
                self.ahead_ns = at_ns  # the earliest such step waits for a later one
                return []
            done.append(self.last_ns)  # confirmed: the lane moved on
            self.last_ns = self.ahead_ns
        self.ahead_ns = None  # confirmed, or stale once the clock moved on without it
        done.append(self.last_ns)
        self.last_ns = at_ns
        return done

    def export(self) -> dict[str, Any]:
        return {"last_ns": self.last_ns, "ahead_ns": self.ahead_ns}

    def load(self, state: dict[str, Any] | None) -> None:
        state = state if isinstance(state, dict) else {}
        last, ahead = state.get("last_ns"), state.get("ahead_ns")
        self.last_ns = None if last is None else int(last)
        self.ahead_ns = None if ahead is None else int(ahead)
