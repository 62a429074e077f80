"""promtool (from Debian's prometheus package), which checks /metrics and the dashboard's PromQL.

`make test` takes it out of the package into .cache/ and names it in $PROMTOOL: then a test
that needs it fails when it is missing, so CI never skips these checks unnoticed. A plain
`pytest` uses $PROMTOOL, else .cache/'s, else the PATH's, and skips without one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CACHED = Path(__file__).resolve().parent.parent / ".cache" / "prometheus" / "usr" / "bin" / "promtool"


def find_promtool() -> str:
    named = os.environ.get("PROMTOOL")
    if named:
        if not os.access(named, os.X_OK):
            pytest.fail(f"PROMTOOL={named} is not an executable file (`make promtool` fetches it)")
        return named
    found = str(CACHED) if os.access(CACHED, os.X_OK) else shutil.which("promtool")
    if found is None:
        pytest.skip("promtool not found: `make promtool` takes it from Debian's prometheus package into .cache/")
    return found


def run_promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([find_promtool(), *args], input=stdin, capture_output=True, text=True, timeout=60)
