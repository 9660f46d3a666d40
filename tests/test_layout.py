"""The package layout: one ``tidecast`` namespace, no bare ``stream``/``models``/``monitors`` anywhere.

``python -m pytest`` puts the repository root on ``sys.path``, where the source folders ``stream/``, ``models/``
and ``monitors/`` would import under their bare names; these tests make sure nothing relies on that.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BARE = {"stream", "models", "monitors"}
CHECKED = ("stream", "models", "monitors", "tests", "bench", "tidecast")


def bare_imports(path: Path) -> list[str]:
    """``file:line module`` for every import of a bare top-level ``stream``, ``models`` or ``monitors``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names if n.split(".")[0] in BARE]
    return found


def test_no_bare_imports_anywhere() -> None:
    offenders = [hit for folder in CHECKED for path in sorted((REPO / folder).rglob("*.py"))
                 for hit in bare_imports(path)]
    assert offenders == []


def test_the_ast_check_catches_a_bare_import(tmp_path: Path) -> None:
    sample = REPO / "tests" / "_bare_import_sample.py"
    sample.write_text("import os\nfrom models.base import BatchForecaster\nimport monitors.metrics as m\n")
    try:
        assert [h.split(" ")[1] for h in bare_imports(sample)] == ["models.base", "monitors.metrics"]
    finally:
        sample.unlink()


def test_tidecast_folder_holds_only_the_public_api() -> None:
    assert sorted(p.name for p in (REPO / "tidecast").iterdir() if p.name != "__pycache__") == ["__init__.py"]


def test_installed_namespace_imports_and_bare_names_do_not(tmp_path: Path) -> None:
    """From a directory outside the checkout only the ``tidecast`` names resolve."""
    code = ("import importlib.util, tidecast, tidecast.models, tidecast.monitors, tidecast.stream\n"
            "print(tidecast.__version__)\n"
            "print([n for n in ('stream', 'models', 'monitors') if importlib.util.find_spec(n) is not None])\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    version, bare = out.stdout.split("\n")[:2]
    assert version and version != "0+unknown"
    assert bare == "[]"


@pytest.mark.slow
def test_wheel_contains_only_the_tidecast_namespace(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("tidecast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"tidecast", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    for expected in ("tidecast/__init__.py", "tidecast/stream/engine.py", "tidecast/models/base.py",
                     "tidecast/monitors/conformal/pid.py", "tidecast/stream/data/nyc_taxi.csv"):
        assert expected in names
