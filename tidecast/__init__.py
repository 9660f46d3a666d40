"""tidecast: streaming time-series forecasting with calibrated conformal intervals.

The distribution installs one import namespace:

* :mod:`tidecast.stream` — records, sources (Kafka, replay), sinks, the engine loop, state, settings, CLI;
* :mod:`tidecast.models` — the forecaster protocol and its implementations;
* :mod:`tidecast.monitors` — conformal calibrators, scoring, drift and uncertainty monitors, metrics.

>>> import tidecast
>>> isinstance(tidecast.__version__, str)
True
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tidecast")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
