"""Every docstring example in the package runs, collected by import name (``tidecast.*``), never by file path.

Collecting by path would import ``stream/engine.py`` as ``stream.engine`` from the repository root and let a
bare import slip through; walking the installed ``tidecast`` package cannot.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import tidecast


def tidecast_modules() -> list[str]:
    names = ["tidecast"]
    for info in pkgutil.walk_packages(tidecast.__path__, prefix="tidecast."):
        names.append(info.name)
    for sub in ("tidecast.stream", "tidecast.models", "tidecast.monitors"):
        module = importlib.import_module(sub)
        names += [info.name for info in pkgutil.walk_packages(module.__path__, prefix=sub + ".")]
    return sorted(set(names))


MODULES = tidecast_modules()


def test_every_subpackage_is_walked() -> None:
    assert {"tidecast.stream.engine", "tidecast.models.naive", "tidecast.monitors.conformal.pid"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, name) if t.examples]
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"
