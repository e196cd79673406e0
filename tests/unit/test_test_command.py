"""`scripts/test --help` says how to run the suite, at once, setting nothing up (no bootstrap, no pytest)."""

from __future__ import annotations

import subprocess
import time

from tests.conftest import REPO


def test_help_prints_the_usage_without_setting_anything_up() -> None:
    started = time.monotonic()
    done = subprocess.run(
        [str(REPO / "scripts" / "test"), "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "usage: scripts/test [PYTEST_ARGS...]" in done.stdout
    assert "PGML_TEST_SERVERS" in done.stdout  # the header: which servers, and how to name them
    assert "set -euo" not in done.stdout and not done.stdout.startswith("#")
    assert done.stderr == ""  # bootstrap (pip) would have written here
    assert time.monotonic() - started < 5
