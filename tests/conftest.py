"""Shared fixtures: a real PostgreSQL (embedded by default, or PGML_TEST_DSN), one fresh database per test
(cloned from a migrated template), daemons run as real `pgml-tuned serve` subprocesses, tiny local models."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

# before anything imports huggingface_hub, which reads these once: tests never reach the network
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
STATE = REPO / ".pgml-test"


def with_db(dsn: str, dbname: str, user: str | None = None) -> str:
    params = conninfo_to_dict(dsn)
    params["dbname"] = dbname
    if user:
        params["user"] = user
    return make_conninfo(**params)


# The logins tests act as (created once per server; roles are cluster-wide). Tests that pass only as a
# superuser prove nothing: users submit as USER, daemons serve as WORKER, setup that no user may do runs as
# the superuser (the `su` fixture), and diagnostic tasks (noop) as ADMIN. The daemons' children connect as CHILD
# (a member of pgml_child only: its ticketed functions).
USER, OTHER_USER, WORKER, ADMIN = "pgml_test_user", "pgml_test_user2", "pgml_test_worker", "pgml_test_admin"
CHILD = "pgml_test_child"
LOGINS = {USER: "pgml_user", OTHER_USER: "pgml_user", WORKER: "pgml_worker", ADMIN: "pgml_admin", CHILD: "pgml_child"}


@pytest.fixture(scope="session")
def admin_dsn() -> str:
    """A server the tests may create databases on: PGML_TEST_DSN, else the embedded one under .pgml-test/."""
    if os.environ.get("PGML_TEST_DSN"):
        return os.environ["PGML_TEST_DSN"]
    from pgml_tuned import embedded

    return embedded.ensure(STATE)


@pytest.fixture(scope="session")
def session_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Process-wide settings every daemon and child of this test session shares."""
    home = tmp_path_factory.mktemp("pgml-home")
    os.environ["PGML_KEYRING_DIR"] = str(home / "keyring")  # the administrator's sealing key (template_db)
    os.environ["PGML_CREDENTIALS_DIR"] = str(home / "credentials")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HOME"] = str(home / "hf")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return home


@pytest.fixture(scope="session")
def template_db(admin_dsn: str, session_env: Path) -> str:
    import anyio

    from pgml_tuned import db, secrets

    name = f"pgml_tpl_{os.getpid()}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = with_db(admin_dsn, name)

    # as an administrator would: migrate, then a sealing key in every worker's keyring, registered
    keyring = Path(os.environ["PGML_KEYRING_DIR"])
    keyring.mkdir(mode=0o700, exist_ok=True)
    key = secrets.generate_private_key(2048)
    secrets.write_private_key(key, keyring / f"{secrets.key_id_of(key)}.pem")

    async def setup() -> None:
        await db.migrate(dsn)
        async with await db.connect(dsn) as conn:
            await secrets.register_key(conn, key)

    anyio.run(setup)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for login, role in LOGINS.items():
            with contextlib.suppress(psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
                conn.execute(f'CREATE ROLE "{login}" LOGIN')
            conn.execute(f'GRANT "{role}" TO "{login}"')
        # users keep their own tables in public (as they would in a schema of their own)
        conn.execute(f'GRANT CREATE ON SCHEMA public TO "{USER}", "{OTHER_USER}", "{ADMIN}"')
    with psycopg.connect(dsn, autocommit=True) as conn:
        loopback = conn.execute("SELECT login FROM pgml.loopback_login").fetchone()
    yield name
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if loopback:  # the loopback login of the template (and of its copies); roles outlive databases
            with contextlib.suppress(psycopg.Error):
                conn.execute(f'DROP ROLE IF EXISTS "{loopback[0]}"')


@contextlib.contextmanager
def scratch_database(admin_dsn: str, template: str | None = None) -> Iterator[str]:
    """A new database (a copy of `template` if given) for the duration of the block; its DSN."""
    name = f"pgml_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    try:
        yield with_db(admin_dsn, name)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def su_dsn(admin_dsn: str, template_db: str) -> Iterator[str]:
    """A fresh database with every migration applied and the session's sealing key registered (superuser)."""
    with scratch_database(admin_dsn, template_db) as dsn:
        yield dsn


@pytest.fixture
def conn_dsn(su_dsn: str) -> str:
    """The fresh database, as an ordinary user (a member of pgml_user)."""
    return as_login(su_dsn, USER)


@pytest.fixture
def worker_dsn(su_dsn: str) -> str:
    return as_login(su_dsn, WORKER)


def as_login(dsn: str, login: str) -> str:
    return with_db(dsn, conninfo_to_dict(dsn)["dbname"], login)


def connect(dsn: str) -> psycopg.Connection[dict[str, Any]]:
    return psycopg.connect(dsn, autocommit=True, row_factory=dict_row)


@pytest.fixture
def conn(conn_dsn: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """The user's session."""
    with connect(conn_dsn) as c:
        yield c


@pytest.fixture
def su(su_dsn: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """A superuser session on the same database: setup no user could do, and looking at everything."""
    with connect(su_dsn) as c:
        yield c


@pytest.fixture
def ops(su_dsn: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """An administrator's session (pgml_admin, not a superuser): diagnostic tasks, every job."""
    with connect(as_login(su_dsn, ADMIN)) as c:
        yield c


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")


class DaemonProc:
    """A real `pgml-tuned serve` subprocess."""

    def __init__(self, dsn: str, home: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log_path = home / f"daemon-{uuid.uuid4().hex[:6]}.log"
        cmd = [
            sys.executable,
            "-m",
            "pgml_tuned.cli",
            "serve",
            "--dsn",
            dsn,
            "--home",
            str(home),
            "--log-format",
            "json",
            "--poll-seconds",
            "0.5",
            "--heartbeat-seconds",
            "0.5",
            "--lease-seconds",
            "3",
            "--grace-seconds",
            "20",
            *args,
        ]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"daemon did not exit in {timeout} s; log:\n{self.output()[-3000:]}") from e

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def child_dsn(su_dsn: str) -> str:
    return as_login(su_dsn, CHILD)


@pytest.fixture
def daemon(worker_dsn: str, child_dsn: str, tmp_path: Path, session_env: Path) -> Iterator[Callable[..., DaemonProc]]:
    """`pgml-tuned serve` as the workers' login, its children as theirs."""
    started: list[DaemonProc] = []

    def start(*args: str, env: dict[str, str] | None = None) -> DaemonProc:
        d = DaemonProc(worker_dsn, tmp_path, "--child-dsn", child_dsn, *args, env=env)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def job_children(daemon_pid: int, *, recursive: bool = False) -> list[Any]:
    """The daemon's job children (psutil.Process): `python -m pgml_tuned.child` processes in an attempt's scratch
    directory (job<id>-a<n>-…), not the spare child waiting for the next job in the scratch root."""
    import psutil

    try:
        kids = psutil.Process(daemon_pid).children(recursive=recursive)
    except psutil.NoSuchProcess:
        return []
    found = []
    for p in kids:
        with contextlib.suppress(psutil.Error):
            if "pgml_tuned.child" in " ".join(p.cmdline()) and Path(p.cwd()).name.startswith("job"):
                found.append(p)
    return found


def job_row(conn: psycopg.Connection[dict[str, Any]], job_id: int) -> dict[str, Any]:
    row = conn.execute("SELECT * FROM pgml.jobs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None
    return row


def wait_job(
    conn: psycopg.Connection[dict[str, Any]],
    job_id: int,
    timeout: float = 120,
    statuses: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
) -> dict[str, Any]:
    return wait_for(
        lambda: (r := job_row(conn, job_id))["status"] in statuses and r,
        timeout,
        what=f"job {job_id} to reach {statuses}",
    )
