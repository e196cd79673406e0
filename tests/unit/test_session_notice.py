"""The embedded-server notice is said once per terminal session: how a session is named, also where its leader
is outside this PID namespace (a container or CI runner: os.getsid answers 0)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pgml_tuned.cli import dsn


def test_the_session_is_its_leader_and_the_leaders_start_time() -> None:
    sid = os.getsid(0)
    if dsn.started(sid) is None:
        pytest.skip("this test runs where its session leader is outside the PID namespace")
    assert dsn.session_key() == f"{sid}-{dsn.started(sid)}"


def test_a_leader_outside_the_pid_namespace_falls_back_to_the_parent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "getsid", lambda _pid: 0)
    key = dsn.session_key()
    assert key == f"p{os.getppid()}-{dsn.started(os.getppid())}"
    assert dsn.first_in_session(tmp_path, "embedded") and not dsn.first_in_session(tmp_path, "embedded")
    stale = tmp_path / "notices" / "embedded-p999999999-1"  # a parent that is gone: its marker is removed
    stale.touch()
    monkeypatch.setattr(os, "getppid", lambda: 0)  # no parent to name: no key, said every time
    assert dsn.session_key() is None and dsn.first_in_session(tmp_path, "embedded")
    monkeypatch.undo()
    monkeypatch.setattr(os, "getsid", lambda _pid: 0)
    assert not dsn.first_in_session(tmp_path, "embedded")
    (tmp_path / "notices" / f"embedded-{key}").unlink()
    assert dsn.first_in_session(tmp_path, "embedded") and not stale.exists()


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="a new PID namespace needs root and unshare"
)
def test_in_a_new_pid_namespace_commands_of_one_parent_share_a_session(tmp_path: Path) -> None:
    probe = (
        "import sys; from pathlib import Path; from pgml_tuned.cli import dsn; "
        "print(dsn.first_in_session(Path(sys.argv[1]), 'embedded'))"
    )
    script = f'{sys.executable} -c "{probe}" {tmp_path}; {sys.executable} -c "{probe}" {tmp_path}'
    r = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "/bin/sh", "-c", script],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    if r.returncode != 0 and "unshare" in r.stderr:
        pytest.skip(f"unshare refused here: {r.stderr.strip()}")
    assert r.stdout.split() == ["True", "False"], r.stderr
