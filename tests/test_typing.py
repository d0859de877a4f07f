"""The package type-checks with mypy (settings in setup.cfg), so hints stay honest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_is_clean():
    pytest.importorskip("mypy", reason="mypy is in the [test] extra")
    pytest.importorskip("mypy_zope", reason="mypy-zope is in the [test] extra")
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "setup.cfg"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
