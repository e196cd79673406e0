"""scripts/bootstrap (run by scripts/demo and scripts/test) says what it does: a line per phase, `bootstrap [i/4]`,
and pip's own progress on the long installs (torch, the package and its dependencies), quiet only under
--quiet (scripts/test). Running it for real takes minutes and a fresh .venv: the README's measured demo run is
that check; this one reads the scripts."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import REPO


def test_bootstrap_says_each_phase_and_lets_pip_show_its_progress() -> None:
    script = (REPO / "scripts" / "bootstrap").read_text()
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "bootstrap")], check=False).returncode == 0
    phases = re.findall(r'step (\d) "', script)
    assert sorted(set(phases)) == ["1", "2", "3", "4"], phases
    long_installs = [
        line for line in script.splitlines() if re.search(r"^\s*python -m pip install .*(torch|-e )", line)
    ]
    assert len(long_installs) == 2, long_installs
    for line in long_installs:
        assert " -q " not in line and "--progress-bar on" in line and '"${PIP_QUIET[@]}"' in line, line
    # the test command keeps pip quiet, the demo does not
    assert "scripts/bootstrap --quiet" in (REPO / "scripts" / "test").read_text()
    demo = (REPO / "scripts" / "demo").read_text()
    assert re.search(r"^scripts/bootstrap$", demo, re.M)
