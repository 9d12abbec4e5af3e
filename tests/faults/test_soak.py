"""One minute of churn with forced reconnects: relay and agent RSS, fds and tasks stay flat."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_one_minute_soak_stays_flat() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--minutes", "1", "--assert-flat"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "no error" in result.stdout and "soak: flat" in result.stdout
    assert " 0 reconnects" not in result.stdout
