"""Fixtures of the reading tests: ``scripts/compat_table.py`` (the attention-family count and its rule) as a module.

The small model of every family comes from the package (:mod:`oversmooth_cli.reading.small_models`); only the tests of
the family count need the script itself, loaded on first use, not at import time.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import pytest

from .._helpers import REPO


@pytest.fixture(scope="session")
def compat_script() -> ModuleType:
    """``scripts/compat_table.py`` loaded as the module ``compat_table``."""
    spec = importlib.util.spec_from_file_location("compat_table", REPO / "scripts" / "compat_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["compat_table"] = module
    spec.loader.exec_module(module)
    return module
