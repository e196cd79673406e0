"""Children run as another system user (settings.child_user) when the daemon runs as root: a child cannot read the
worker's key. Run for real: the test creates a system user (useradd) and runs `pgml-tuned serve --child-user`."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgml_tuned.worker.process import ChildUser
from tests.conftest import wait_job
from tests.support.parallel import file_lock

SANDBOX_USER = "pgml_test_sandbox"
USER_FLAG = ("--child-user", SANDBOX_USER)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starting children as another user needs root")


@pytest.fixture(scope="module")
def sandbox_user() -> pwd.struct_passwd:
    """A system user of its own (created once; system users are cheap and the test may run again)."""
    if shutil.which("useradd") is None:
        pytest.skip("useradd is not installed: no system user to run children as")
    try:
        return pwd.getpwnam(SANDBOX_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SANDBOX_USER], check=True
        )
        return pwd.getpwnam(SANDBOX_USER)


@pytest.fixture(scope="module")
def reachable_python(sandbox_user: pwd.struct_passwd) -> Iterator[None]:
    """The child user must be able to run this Python (a deployment installs it where it can: the daemon refuses
    to start otherwise). Here it may sit under root's home (pyenv): the folders above it get o+x (enter, not
    list) while any test that needs it runs, and their modes back after the last. Tests of this module run in
    several xdist workers (and other test sessions) at once: a count in a shared file, under a file lock, says
    which is the last, and the first one's record of the modes is what is put back."""
    state = Path(tempfile.gettempdir()) / "pgml-test-reachable-python.json"
    with file_lock(state.with_suffix(".lock")):
        held = json.loads(state.read_text()) if state.exists() else {"users": 0, "modes": []}
        if held["users"] == 0:
            held["modes"] = []
            for folder in reversed(Path(os.path.realpath(sys.executable)).parents):
                mode = folder.stat().st_mode
                if not mode & 0o001:
                    held["modes"].append([str(folder), mode & 0o7777])
                    folder.chmod(mode | 0o001)
        held["users"] += 1
        state.write_text(json.dumps(held))
    try:
        yield
    finally:
        with file_lock(state.with_suffix(".lock")):
            held = json.loads(state.read_text())
            held["users"] -= 1
            if held["users"] == 0:
                for folder, mode in reversed(held["modes"]):
                    Path(folder).chmod(mode)
            state.write_text(json.dumps(held))


@pytest.fixture
def open_dirs(session_env: Path) -> Iterator[tuple[Path, Path]]:
    """A work directory the child user can reach, and the worker key in a directory it can enter too: only the
    key file's own mode (0600, root's) keeps it out."""
    base = Path(tempfile.mkdtemp(prefix="pgml-child-user-", dir="/tmp"))
    base.chmod(0o711)
    (base / "keyring").mkdir(mode=0o711)
    key = base / "keyring" / "worker.pem"  # the session's sealing key, in a keyring of the worker's
    shutil.copy(next(Path(os.environ["PGML_KEYRING_DIR"]).glob("*.pem")), key)
    key.chmod(0o600)
    (base / "work").mkdir(mode=0o711)
    yield base / "work", key
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def reachable_child_dsn(child_dsn: str) -> Iterator[str]:
    """The children's DSN as the child user can use it. The embedded test server's socket sits in its data directory,
    which only the server's own user may enter (a deployment's server listens where its clients can reach it): a
    socket in a world-enterable folder relays to it for the test's duration."""
    info = conninfo_to_dict(child_dsn)
    host = str(info.get("host") or "")
    if not host.startswith("/"):
        yield child_dsn  # TCP: reachable as it is
        return
    port = str(info.get("port") or "5432")
    relay_dir = Path(tempfile.mkdtemp(prefix="pgml-relay-", dir="/tmp"))
    relay_dir.chmod(0o755)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(relay_dir / f".s.PGSQL.{port}"))
    (relay_dir / f".s.PGSQL.{port}").chmod(0o777)
    listener.listen(8)

    def pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                server.connect(f"{host}/.s.PGSQL.{port}")
                threading.Thread(target=pump, args=(client, server), daemon=True).start()
                threading.Thread(target=pump, args=(server, client), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield make_conninfo(child_dsn, host=str(relay_dir))
    listener.close()
    shutil.rmtree(relay_dir, ignore_errors=True)


def probe_job(ops: psycopg.Connection[dict[str, Any]], key: Path) -> dict[str, Any]:
    """A noop job whose child reports who it runs as and whether it could read the key file."""
    row = ops.execute(
        "SELECT job_id FROM pgml.tune('sandbox', task => 'noop', model_name => 'none', hyperparams => %s::jsonb)",
        (f'{{"probe": ["{key}"]}}',),
    ).fetchone()
    assert row is not None
    return row


def probed(ops: psycopg.Connection[dict[str, Any]], job_id: int) -> dict[str, Any]:
    job = wait_job(ops, job_id, 60)
    assert job["status"] == "succeeded", job["error"]
    (entry,) = ops.execute("SELECT logs FROM pgml.logs WHERE job_id = %s AND logs ? 'uid'", (job_id,)).fetchall()
    return dict(entry["logs"])


def test_a_child_user_cannot_read_the_worker_key(
    ops: psycopg.Connection[dict[str, Any]],
    daemon: Any,
    sandbox_user: pwd.struct_passwd,
    reachable_python: None,
    reachable_child_dsn: str,
    open_dirs: tuple[Path, Path],
) -> None:
    work, key = open_dirs
    env = {"PGML_WORK_DIR": str(work), "PGML_KEYRING_DIR": str(key.parent)}
    # as the daemon's own user (root) the probe reads the key: what the sandbox takes away
    job = probe_job(ops, key)["job_id"]
    daemon("--drain", env=env).wait(60)
    assert probed(ops, job)["readable"] == {str(key): True}

    job = probe_job(ops, key)["job_id"]
    d = daemon("--drain", *USER_FLAG, "--child-dsn", reachable_child_dsn, env=env)
    assert d.wait(60) == 0, d.output()[-3000:]
    report = probed(ops, job)
    assert (report["uid"], report["gid"]) == (sandbox_user.pw_uid, sandbox_user.pw_gid)
    assert report["groups"] in ([], [sandbox_user.pw_gid])  # no supplementary group of the daemon's
    assert report["readable"] == {str(key): "PermissionError"}
    assert list(work.iterdir()) == []  # its work directory is gone with it


def test_a_child_user_that_could_read_the_key_stops_the_daemon(
    daemon: Any, sandbox_user: pwd.struct_passwd, reachable_python: None, open_dirs: tuple[Path, Path]
) -> None:
    work, key = open_dirs
    key.chmod(0o644)  # (the worker's key check refuses it too, later: the child user's check comes first)
    d = daemon("--child-user", SANDBOX_USER, env={"PGML_WORK_DIR": str(work), "PGML_KEYRING_DIR": str(key.parent)})
    assert d.wait(30) != 0
    assert f"child_user '{SANDBOX_USER}' can read {key}" in d.output()


def test_child_user_needs_a_root_daemon_and_an_existing_user(
    sandbox_user: pwd.struct_passwd, reachable_python: None, worker_dsn: str, open_dirs: tuple[Path, Path]
) -> None:
    with pytest.raises(ValueError, match="no such system user; create it"):
        ChildUser.lookup("pgml_test_no_such_user")
    with pytest.raises(ValueError, match="is root"):
        ChildUser.lookup("root")
    work, _ = open_dirs
    not_root = subprocess.run(
        [sys.executable, "-m", "pgml_tuned.cli", "serve", "--dsn", worker_dsn, "--home", str(work.parent), *USER_FLAG],
        capture_output=True,
        text=True,
        user=sandbox_user.pw_uid,
        group=sandbox_user.pw_gid,
        extra_groups=[],
        cwd="/",
        env={**os.environ, "PGML_KEYRING_DIR": str(work / "no-keyring")},
        timeout=60,
    )
    assert not_root.returncode == 2
    assert "only a daemon running as root can start children as another user" in not_root.stderr
