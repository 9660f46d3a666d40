"""tidecast: streaming time-series forecasting with calibrated conformal intervals.

The distribution installs one import namespace:

* :mod:`tidecast.stream` — records, sources (Kafka, replay), sinks, the engine loop, state, settings, CLI;
* :mod:`tidecast.models` — the forecaster protocol and its implementations;
* :mod:`tidecast.monitors` — conformal calibrators, scoring, drift and uncertainty monitors, metrics;
* :mod:`tidecast.checks` — the model contract as runnable checks, for plug-in authors (it is
  :mod:`tidecast.stream.checks`, loaded on first use so ``import tidecast`` stays light).

The public API for notebooks: :func:`tidecast.replay` (a DataFrame or a file in, a
:class:`~tidecast.stream.result.ReplayResult` out; it is :func:`tidecast.stream.api.replay`, loaded on first use).

>>> import tidecast
>>> isinstance(tidecast.__version__, str)
True
>>> from tidecast import checks
>>> checks.check_forecaster.__module__
'tidecast.stream.checks'
>>> tidecast.replay.__module__, tidecast.ReplayResult.__name__
('tidecast.stream.api', 'ReplayResult')
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType
from typing import Any

try:
    __version__ = version("tidecast")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["ReplayResult", "__version__", "checks", "replay"]

#: Public short names for modules that live deeper in the package tree (this folder holds only this file).
_ALIASES = {f"{__name__}.checks": "tidecast.stream.checks"}
#: Public functions and classes, imported on first use: name -> module that defines it.
_API = {"replay": "tidecast.stream.api", "ReplayResult": "tidecast.stream.result"}


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import tidecast.checks`` load (once) and return the module it names in ``_ALIASES``."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(fullname, self) if fullname in _ALIASES else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(_ALIASES[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        pass  # the target module ran when it was imported


if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
    sys.meta_path.append(_AliasFinder())


def __dir__() -> list[str]:
    """The public API too (module ``__getattr__`` hides it from ``dir()``, which notebooks complete from)."""
    return sorted({*globals(), *__all__})


def __getattr__(name: str) -> Any:
    """``tidecast.checks``, ``tidecast.replay`` and ``tidecast.ReplayResult`` after a plain ``import tidecast``."""
    if f"{__name__}.{name}" in _ALIASES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
