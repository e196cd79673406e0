"""Shared helpers of the benchmarks: a server, a fresh migrated database, a daemon subprocess whose JSON log
lines are read as they come, and percentiles. Not a test helper: benchmarks never run inside the test suite."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

REPO = Path(__file__).resolve().parents[1]
BENCH_HOME = REPO / ".pgml-bench"  # the embedded PostgreSQL of the benchmarks (as tests use .pgml-test)


def admin_dsn(dsn: str | None) -> str:
    """--dsn, else the embedded PostgreSQL under .pgml-bench/ (started if needed; it keeps running)."""
    if dsn:
        return dsn
    from pgml_tuned import embedded

    return embedded.ensure(BENCH_HOME)


def with_db(dsn: str, dbname: str, user: str | None = None) -> str:
    params = conninfo_to_dict(dsn)
    params["dbname"] = dbname
    if user:
        params["user"] = user
    return make_conninfo(**params)


@contextlib.contextmanager
def fresh_database(admin: str, prefix: str) -> Iterator[str]:
    """A new database with every migration applied (pgml_tuned.db.migrate); dropped afterwards."""
    import anyio

    from pgml_tuned import db

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = with_db(admin, name)
    try:
        anyio.run(db.migrate, dsn)
        yield dsn
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def bench_env(home: Path, model_dirs: list[Path] | None = None) -> dict[str, str]:
    """The environment of every process a benchmark starts (offline, no tokenizer threads); `model_dirs`: the
    directories whose models a job may name by path (PGML_MODEL_DIRS; never inside the daemon's home)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(home / "hf"),
        "TOKENIZERS_PARALLELISM": "false",
        "PGML_ALLOW_SUPERUSER": "1",  # the benchmarks serve as the server's superuser (refused otherwise)
    }
    if model_dirs:
        env["PGML_MODEL_DIRS"] = os.pathsep.join(str(d) for d in model_dirs)
    return env


def iso_epoch(stamp: str) -> float:
    """structlog's ISO UTC timestamp → seconds since the epoch."""
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


class DaemonProc:
    """`python -m pgml_tuned.cli serve ...` as a subprocess; its log lines (JSON) are parsed as they arrive.

    Each parsed line gets `_recv` (this process's time.time() when the line was read). Every line is also
    written to `log_path`.
    """

    def __init__(
        self, dsn: str, home: Path, *args: str, env: dict[str, str] | None = None, argv0: list[str] | None = None
    ) -> None:
        self.log_path = home / f"daemon-{uuid.uuid4().hex[:6]}.log"
        cmd = [
            *(argv0 or [sys.executable, "-m", "pgml_tuned.cli"]),
            "serve",
            "--dsn",
            dsn,
            "--home",
            str(home),
            "--log-format",
            "json",
            *args,
        ]
        self.started_at = time.time()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env or bench_env(home))
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log_path, "wb") as out:
            for raw in self.proc.stdout:
                now = time.time()
                out.write(raw)
                try:
                    event = json.loads(raw)
                except ValueError:
                    event = {"event": "raw", "line": raw.decode(errors="replace").rstrip()}
                if not isinstance(event, dict):
                    event = {"event": "raw", "line": raw.decode(errors="replace").rstrip()}
                event["_recv"] = now
                with self._cond:
                    self.events.append(event)
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_event(self, match: Callable[[dict[str, Any]], bool], timeout: float, start: int = 0) -> dict[str, Any]:
        """The first logged event (from index `start`) that `match`es; fails after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        i = start
        with self._cond:
            while True:
                while i < len(self.events):
                    if match(self.events[i]):
                        return self.events[i]
                    i += 1
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise RuntimeError(f"daemon exited ({self.proc.returncode}); log: {self.log_path}\n" + self.tail())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching daemon event in {timeout} s; log: {self.log_path}\n" + self.tail())
                self._cond.wait(min(left, 0.5))

    def tail(self, n: int = 20) -> str:
        with self._cond:
            return "\n".join(json.dumps(e, default=str) for e in self.events[-n:])

    def wait_exit(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    xs = sorted(values)
    k = max(0, min(len(xs) - 1, int(-(-p * len(xs) // 100)) - 1))
    return xs[k]


def summary_ms(values: list[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean of seconds, in milliseconds."""
    return {
        "p50": percentile(values, 50) * 1e3,
        "p90": percentile(values, 90) * 1e3,
        "p99": percentile(values, 99) * 1e3,
        "max": max(values) * 1e3,
        "mean": sum(values) / len(values) * 1e3,
        "n": len(values),
    }


# ---- a shared, noisy machine: how busy it was while something ran ----

_TICK = os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU-seconds all CPUs have spent busy since boot (/proc/stat: everything but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / _TICK


def children_cpu_seconds() -> float:
    """CPU-seconds (user + system) of this process's waited-for descendants (whole process trees)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def wait_quiet(max_wait: float, threshold: float = 0.3, window: float = 2.0) -> float:
    """Wait (at most max_wait s) until the machine's busy CPUs over `window` s are below `threshold` cores.

    Returns the last busy level seen (cores). Other people's test runs on a shared machine are the noise this
    avoids starting into; what ran during a measurement is reported separately.
    """
    deadline = time.monotonic() + max_wait
    while True:
        b0 = machine_busy_seconds()
        time.sleep(window)
        busy = (machine_busy_seconds() - b0) / window
        if busy < threshold or time.monotonic() >= deadline:
            return busy


def main_with_json(parser: Any, run: Any) -> None:
    """Parse the command line (adding --json), run the benchmark, write its result as JSON when asked."""
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
