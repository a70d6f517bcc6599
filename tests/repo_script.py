"""A script of the checkout that is no package module (bench/*.py, scripts/*.py), loaded as a module so that a test
can call its functions."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(relative: str) -> ModuleType:
    """`relative` to the checkout, e.g. "bench/startup.py": executed once per call, not registered in sys.modules."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(f"{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
