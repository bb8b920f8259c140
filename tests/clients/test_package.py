"""famserve.clients stands alone: importing it (and the CLI) loads nothing of famserve.engine or famserve.server,
nor torch, so the client installs and starts fast anywhere."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["famserve.clients", "famserve.clients.cli"])
def test_imports_nothing_of_the_server_or_engine(module: str) -> None:
    code = (f"import sys, {module}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' "
            "or m.startswith(('famserve.engine', 'famserve.server'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
