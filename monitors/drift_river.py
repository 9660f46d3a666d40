"""river's drift detectors behind :class:`tidecast.monitors.drift.DriftDetector`: the slow references.

One river object per row (ADWIN, PageHinkley or KSWIN at river's defaults unless ``params`` say otherwise), fed
one value per matured residual in a Python loop - what a user of river would write. bench/drift.py runs them on
the same residual streams as the vectorised detectors.

What they are fed: ``|r|`` (``value="abs"``, the default), the absolute residual divided by ``scale`` when one is
passed - a loss, like D3A's, so a mean detector sees a level shift, a variance change and a frozen input (its
loss collapses) alike; ``value="signed"`` feeds ``r`` itself (then a variance change is invisible to ADWIN and
PageHinkley). river's PageHinkley threshold (50) is in the units of its input, so pass a ``scale``.

State is river objects, so :meth:`RiverDetector.export_rows` refuses: tidecast never pickles, and these are
references for measurement, not for serving.

>>> import numpy as np
>>> det = RiverDetector("adwin")
>>> rng = np.random.default_rng(0)
>>> hits = [t for t in range(1500) if len(det.update(np.array([0]), rng.normal(size=1) * (1.0 if t < 1000 else 4.0)))]
>>> 1000 <= hits[-1] < 1100
True
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tidecast.models.base import check_between
from tidecast.monitors.conformal.base import ArrayDict
from tidecast.monitors.drift import Alarms, DriftDetector

#: river class name per detector, and the kind of change it reports.
_RIVER = {"adwin": ("ADWIN", "mean"), "pagehinkley": ("PageHinkley", "mean"), "kswin": ("KSWIN", "distribution")}


class RiverDetector(DriftDetector):
    """One ``river.drift`` detector object per row."""

    def __init__(self, method: str, value: str = "abs", **params: Any) -> None:
        if method not in _RIVER:
            raise ValueError(f"unknown river detector {method!r}; known: {', '.join(_RIVER)}")
        if value not in ("abs", "signed"):
            raise ValueError(f"value must be 'abs' or 'signed', got {value!r}")
        self.method, self.value, self.params = method, value, params
        self.name = f"river-{method}"
        self._fields = {}
        super().__init__()
        self.detectors_: list[Any] = []
        self._check_params()

    def _check_params(self) -> None:
        """river takes any value: ADWIN with delta = 0 never alarms, PageHinkley with threshold < 0 every few steps.
        Ranges of the parameters that would silently break the reference; an unknown keyword is river's error."""
        inf = float("inf")
        ranges = {"adwin": {"delta": (0, 1, True, True)},
                  "pagehinkley": {"delta": (0, inf, False, True), "threshold": (0, inf, True, True),
                                  "alpha": (0, 1, True, False)},
                  "kswin": {"alpha": (0, 1, True, True)}}[self.method]
        for key, (low, high, open_low, open_high) in ranges.items():
            if key in self.params:
                check_between(key, self.params[key], low, high, open_low=open_low, open_high=open_high)
        try:
            self._new()
        except (TypeError, ValueError) as err:  # an unknown keyword, or a value river itself refuses
            raise ValueError(f"{self.name}: {err}") from None

    def _new(self) -> Any:
        from river import drift

        cls = getattr(drift, _RIVER[self.method][0])
        if self.method == "kswin" and "seed" not in self.params:
            return cls(seed=len(self.detectors_), **self.params)  # reproducible, different per row
        return cls(**self.params)

    def resize(self, n_rows: int) -> None:
        while len(self.detectors_) < n_rows:
            self.detectors_.append(self._new())
        self.n_rows_ = max(self.n_rows_, n_rows)

    def reset_rows(self, rows: np.ndarray) -> None:
        for r in np.asarray(rows, dtype=np.intp).tolist():
            self.resize(r + 1)
            self.detectors_[r] = self._new()

    def update(self, rows: np.ndarray, residuals: np.ndarray, covered: np.ndarray | None = None,
               scale: np.ndarray | float | None = None, values: np.ndarray | None = None) -> Alarms:
        rows = np.asarray(rows, dtype=np.intp).reshape(-1)
        x = np.asarray(residuals, dtype=float).reshape(-1)
        if scale is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                x = x / np.asarray(scale, dtype=float)
        if self.value == "abs":
            x = np.abs(x)
        if rows.size:
            self.resize(int(rows.max()) + 1)
        fired = []
        detectors = self.detectors_
        for r, v in zip(rows.tolist(), x.tolist(), strict=True):
            if v != v or v in (float("inf"), float("-inf")):
                continue
            d = detectors[r]
            d.update(v)
            if d.drift_detected:  # river resets its own state after a detection
                fired.append(r)
        out = np.array(fired, dtype=np.int64)
        return Alarms(out, np.full(out.size, _RIVER[self.method][1]), np.full(out.size, np.nan))

    def _step(self, s: np.ndarray, x: np.ndarray, covered: np.ndarray | None,
              values: np.ndarray | None) -> tuple[np.ndarray, ...]:
        raise NotImplementedError  # update() is overridden: the state is river objects

    def export_rows(self, rows: np.ndarray) -> ArrayDict:
        raise NotImplementedError(f"{self.name} keeps river objects per row; its state is not exported (no pickle)")

    def import_rows(self, rows: np.ndarray, state: ArrayDict) -> None:
        raise NotImplementedError(f"{self.name} keeps river objects per row; its state is not imported (no pickle)")

    def get_params(self) -> dict[str, Any]:
        return {"method": self.method, "value": self.value, **self.params}
