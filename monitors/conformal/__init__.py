"""Sequential conformal calibrators: a registry of vectorised (row x horizon) interval makers.

All share :class:`~tidecast.monitors.conformal.base.Calibrator`: ``update(rows, residuals, mask)`` with the residuals
that matured now, ``interval(rows, means)``, ``export_rows``/``import_rows`` (per-row arrays) and
``get_params`` (JSON). bench/conformal.py measures them side by side; docs/conformal.md has the tables. Installed
packages add calibrators through the entry point group ``tidecast.calibrators`` (:mod:`tidecast.models.plugins`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tidecast.models.plugins import CALIBRATOR_GROUP, Registry
from tidecast.monitors.conformal.aci import ACI
from tidecast.monitors.conformal.base import Calibrator, ScoreCalibrator
from tidecast.monitors.conformal.dtaci import DtACI
from tidecast.monitors.conformal.pid import ConformalPID
from tidecast.monitors.conformal.saocp import SAOCP
from tidecast.monitors.conformal.sfogd import SFOGD
from tidecast.monitors.conformal.spci import SPCI
from tidecast.monitors.conformal.tracker import QuantileTracker

#: Built-in calibrators, then those of installed plug-ins (entry point group ``tidecast.calibrators``).
CALIBRATORS: Registry[type[Calibrator]] = Registry(CALIBRATOR_GROUP, {
    cls.name: cls for cls in (ConformalPID, QuantileTracker, ACI, DtACI, SFOGD, SAOCP, SPCI)
}, kind="calibrator")

#: The engine's default; chosen by bench/conformal.py (docs/conformal.md): conformal PID with the AR
#: scorecaster has the lowest interval score on every case at target coverage, never an infinite interval.
DEFAULT_CALIBRATOR = ConformalPID.name


def make_calibrator(name: str, horizon: int, alpha: float | Sequence[float], **params: Any) -> Calibrator:
    """Build a registered calibrator by name; ``alpha`` may be a sequence (every level learned in one pass)."""
    try:
        cls = CALIBRATORS[name]
    except KeyError:
        raise ValueError(f"unknown calibrator {name!r}; known: {', '.join(sorted(CALIBRATORS))}") from None
    calibrator = cls(horizon=horizon, alpha=alpha, **params)
    if not isinstance(calibrator, Calibrator):
        raise ValueError(f"calibrator {name!r} built a {type(calibrator).__name__}, not a Calibrator")
    return calibrator


__all__ = [
    "ACI",
    "CALIBRATORS",
    "DEFAULT_CALIBRATOR",
    "SAOCP",
    "SFOGD",
    "SPCI",
    "Calibrator",
    "ConformalPID",
    "DtACI",
    "QuantileTracker",
    "ScoreCalibrator",
    "make_calibrator",
]
