"""Shared fixtures: a real PostgreSQL (embedded by default, or PGML_TEST_DSN), one fresh database per test
(cloned from a migrated template), daemons run as real `pgml-tuned serve` subprocesses, tiny local models."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from tests.support.parallel import Turns, file_lock

# before anything imports huggingface_hub, which reads these once: tests never reach the network
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
STATE = REPO / ".pgml-test"

# ---- parallel runs (pytest-xdist) ----
# pyproject's addopts ask for `--numprocesses=auto`: WORKERS processes (PGML_TEST_WORKERS to change it; `-n 0` runs
# in this process, as does naming single tests with `file::test`), each with its own template database, daemons,
# keyring and HF_HOME. More workers than cores: much of an end-to-end test is waiting on its subprocesses.
# Three kinds of tests (tests/support/parallel.py), run in this order:
# - serial (marked: timing asserts, leases of seconds): one at a time, and no heavy test meanwhile
# - light (neither end-to-end nor starting a daemon: unit tests, SQL): any time, beside anything
# - heavy (the rest): side by side, never beside a serial test
# The workers start on the serial and light tests (the first chunks xdist hands out), so the light ones fill the cores
# while the serial ones run. Tests sharing the machine run their torch processes (the daemons' training children,
# the tests' own models) with one thread each, as OpenMP's spinning threads would otherwise take the cores from the
# other workers (a quarter of the suite's CPU time); a serial test's processes get every core, as in a serial run.
WORKERS = 4
_TURNS = pytest.StashKey[Turns]()
_RUN_DIR = pytest.StashKey[Path]()
_OMP_THREADS = os.environ.get("OMP_NUM_THREADS")  # the caller's: kept for every test when set


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    without_xdist = not pluginmanager.has_plugin("xdist") and (
        pluginmanager.is_blocked("xdist")  # -p no:xdist
        or importlib.util.find_spec("xdist") is None
        or bool(os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"))
    )
    if without_xdist:  # pyproject's addopts still parse (and mean nothing)
        group = parser.getgroup("xdist", "pytest-xdist is not loaded: this option is ignored")
        group.addoption("--numprocesses", dest="numprocesses", default=None)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    if os.environ.get("PGML_TEST_WORKERS"):
        return int(os.environ["PGML_TEST_WORKERS"])
    if config.args and all("::" in arg for arg in config.args):
        return 0  # single tests named: no workers to start
    return WORKERS


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """The controller: a directory of lock files every worker of this run shares (tests/support/parallel.py)."""
    config = node.config
    if _RUN_DIR not in config.stash:
        config.stash[_RUN_DIR] = Path(tempfile.mkdtemp(prefix="pgml-test-run-"))
    node.workerinput["pgml_run_dir"] = str(config.stash[_RUN_DIR])


def pytest_configure(config: pytest.Config) -> None:
    run_dir = getattr(config, "workerinput", {}).get("pgml_run_dir")
    config.stash[_TURNS] = Turns(Path(run_dir) if run_dir else None)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _RUN_DIR in config.stash:
        shutil.rmtree(config.stash[_RUN_DIR], ignore_errors=True)


SERIAL, LIGHT, HEAVY = "serial", "light", "heavy"


def kind_of(item: pytest.Item) -> str:
    if item.get_closest_marker("serial"):
        return SERIAL
    if "e2e" in item.path.parts or "daemon" in getattr(item, "fixturenames", ()):
        return HEAVY
    return LIGHT


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Serial tests first, then the light ones, then the heavy ones (stable otherwise: the long end-to-end tests lead
    the heavy ones)."""
    order = {SERIAL: 0, LIGHT: 1, HEAVY: 2}
    items.sort(key=lambda item: order[kind_of(item)])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    turns = item.config.stash[_TURNS]
    kind = kind_of(item)
    if kind == LIGHT:
        _torch_threads(1 if turns.run_dir is not None else None)
        return (yield)
    if kind == HEAVY:
        _torch_threads(1 if turns.run_dir is not None else None)
        with turns.shared():
            return (yield)
    turns.begin_alone()
    _torch_threads(None)
    try:
        return (yield)
    finally:
        if nextitem is None or kind_of(nextitem) != SERIAL:
            turns.end_alone()  # a run of serial tests keeps its turn to the last of them


def _torch_threads(n: int | None) -> None:
    """OMP_NUM_THREADS for the processes a test starts: `n`, or torch's default (every core) when None."""
    if _OMP_THREADS is not None:
        return
    if n is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = str(n)


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

    with file_lock(STATE / "embedded.lock"):  # one first start (initdb), however many workers ask at once
        return embedded.ensure(STATE)


@pytest.fixture(scope="session")
def session_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Process-wide settings every daemon and child of this test session shares."""
    home = tmp_path_factory.mktemp("pgml-home")
    os.environ["PGML_KEYRING_DIR"] = str(home / "keyring")  # the administrator's sealing key (template_db)
    os.environ["PGML_CREDENTIALS_DIR"] = str(home / "credentials")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HOME"] = str(home / "hf")
    # the tiny models tests build (tmp_path_factory) are loaded by path: the session's temporary root is the
    # workers' model directory (a daemon's own home below it, and the hub cache, stay refused: model_refs.py)
    os.environ["PGML_MODEL_DIRS"] = str(tmp_path_factory.getbasetemp())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return home


@pytest.fixture(scope="session")
def template_db(admin_dsn: str, session_env: Path) -> Iterator[str]:
    name = f"pgml_tpl_{os.getpid()}"
    # One setup at a time on the server (workers of this run, other runs): the migrations create cluster-wide roles
    # (pgml_user, ...) and grant them, as this fixture does for the test logins; concurrently, two sessions would
    # both try to create the same role. The lock is the server's (an advisory lock in the admin database).
    with psycopg.connect(admin_dsn, autocommit=True) as setup_lock:  # held until this session closes
        setup_lock.execute("SELECT pg_advisory_lock(hashtext('pgml-tuned tests: template setup'))")
        loopback = _create_template(admin_dsn, name)
    yield name
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if loopback:  # the loopback login of the template (and of its copies); roles outlive databases
            with contextlib.suppress(psycopg.Error):
                conn.execute(f'DROP ROLE IF EXISTS "{loopback}"')


def _create_template(admin_dsn: str, name: str) -> str | None:
    """Database `name`, migrated, with the session's sealing key and the test logins; its loopback login."""
    import anyio

    from pgml_tuned import db, secrets

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
    return str(loopback[0]) if loopback else None


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


@pytest.fixture
def reviews(conn: psycopg.Connection[dict[str, Any]]) -> str:
    """public.reviews, 10 rows of two classes, as the user: what the tune-validation tests submit (OK_ARGS there)."""
    conn.execute("CREATE TABLE public.reviews (id int, text text, class text, score int, body varchar(20))")
    conn.execute(
        "INSERT INTO public.reviews SELECT i, 'text ' || i, CASE WHEN i % 2 = 0 THEN 'a' ELSE 'b' END, i, 'x'"
        " FROM generate_series(1, 10) i"
    )
    return "public.reviews"


def wait_serving(su: Any, seconds: float = 60) -> None:
    """Until a daemon's serving process LISTENs in this database (its application_name says so)."""
    wait_for(
        lambda: su.execute(
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'pgml-tuned listen %/serving-%'"
        ).fetchone(),
        seconds,
        what="the serving process to listen",
    )


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


# How pgml.wait and pgml.tune(..., wait => true) print a training row (pgml._log_line): "step 3/5  loss 0.3333",
# "eval  step 5/5  eval_loss 0.41", "train  step 5/5  train_loss 0.2"; and the job's end, "job 7 succeeded: ...".
TRAIN_LINE = re.compile(r"^(?:step \d+|eval  |train  )")
END_LINE = re.compile(r"^job \d+ (?:succeeded|cancelled)\b")


def printed_step(line: str) -> int | None:
    """The step of a training step's line ("step 3/5  loss 0.3333" -> 3), else None."""
    m = re.match(r"^step (\d+)(?:/\d+)?  ", line)
    return int(m.group(1)) if m else None
