"""The training child: one process per job attempt, started by the daemon's runner.

    python -m pgml_tuned.child      (the job spec arrives as JSON on stdin, the DSN in PGML_DSN)

It opens its own connection (children never inherit one), runs the task's recipe, streams each log event
into pgml.logs as it happens, and commits the results in one fenced transaction. It talks to the daemon
through its stdout (JSON lines: {"event": "log" | "info" | "error", ...}); anything libraries print goes to
stderr, which the daemon forwards to its own log. Exit codes are in jobs.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import importlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from . import files, jobs
from .db import RETRYABLE, backoff_delays, sync_connect
from .db import fetch_one as db_one
from .recipes import RECIPES
from .sql import q


class JobError(Exception):
    """A problem with the job itself (bad input, bad hyperparams): fails the job with this message."""


class Interrupted(Exception):
    """SIGTERM arrived: the job goes back to the queue (after a checkpoint when one could be saved)."""


SNAPSHOT_FILE = "pgml_rows.json"  # the job's data, stored with each checkpoint

# How long the child keeps retrying the database (server restarts, lost connections) before giving up.
DB_RETRY_SECONDS = float(os.environ.get("PGML_DB_RETRY_SECONDS", "300"))


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the daemon dies, so an orphan never trains on (its writes are fenced anyway)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() == 1:
        os._exit(jobs.EXIT_LEASE_LOST)


def _number(v: Any) -> Any:
    """Trainer log values may arrive as strings; store numbers as numbers."""
    if isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            return v
        return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f
    return v


class JobContext:
    """Everything a recipe needs from the outside world: the job spec, the data, logging and results."""

    def __init__(self, spec: dict[str, Any], secrets: dict[str, Any], dsn: str, events: IO[str]) -> None:
        self.spec = spec
        self.secrets = secrets
        self.dsn = dsn
        self.events = events
        self.job_id: int = spec["id"]
        self.attempt: int = spec["attempt"]
        self.model_id: int = spec["model_id"]
        self.hyperparams: dict[str, Any] = spec.get("hyperparams") or {}
        self.stop_requested = False
        self._conn: psycopg.Connection[Any] | None = None
        self._pending: list[tuple[int, dict[str, Any]]] = []
        self._seq = 0
        self._rate_origin: tuple[float, float] | None = None  # (step, time) of this attempt's first log
        self._progress: dict[str, Any] = {}
        self.workdir = Path(tempfile.mkdtemp(prefix=f"job{self.job_id}-a{self.attempt}-",
                                             dir=os.environ.get("PGML_WORK_DIR") or None))
        self._resume: Path | bool | None = False  # False: not looked up yet
        self._rows_file = self.workdir / "rows.json"

    # ---- plumbing ----
    def conn(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = sync_connect(self.dsn, app=f"pgml-tuned job {self.job_id}")
            self._conn.autocommit = True
        return self._conn

    def with_retry(self, what: str, fn: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        """Run fn(conn), reconnecting through server restarts and killed backends for DB_RETRY_SECONDS."""
        deadline = time.monotonic() + DB_RETRY_SECONDS
        for delay in backoff_delays(first=0.1, cap=5.0):
            try:
                return fn(self.conn())
            except RETRYABLE as e:
                self._conn = None
                if time.monotonic() + delay > deadline:
                    raise JobError(f"lost the database while {what} and could not reconnect for "
                                   f"{DB_RETRY_SECONDS:.0f} s: {e}") from e
                self.info(f"database connection lost while {what}; retrying in {delay:.1f} s", level="warning")
                time.sleep(delay)
        raise AssertionError("unreachable")

    def emit(self, event: dict[str, Any]) -> None:
        self.events.write(json.dumps(event, default=str) + "\n")
        self.events.flush()

    def info(self, message: str, level: str = "info", **fields: Any) -> None:
        self.emit({"event": "info", "level": level, "message": message, **fields})

    # ---- inputs ----
    @property
    def training_args(self) -> dict[str, Any]:
        return dict(self.hyperparams.get("training_args") or {})

    @property
    def dataset_args(self) -> dict[str, Any]:
        return dict(self.hyperparams.get("dataset_args") or {})

    def secret(self, *names: str) -> str | None:
        for n in names:
            if self.secrets.get(n):
                return str(self.secrets[n])
        return None

    def read_relation(self, columns: list[str]) -> list[tuple[str | None, ...]]:
        """Read the named columns of the job's relation once, with COPY (one consistent snapshot).

        A job resumed from a checkpoint gets the rows the first attempt read (stored in the checkpoint), so
        a view that reshuffles on every read (ORDER BY random()) cannot change the data under it.
        """
        schema, table = self.spec["relation_schema"], self.spec["relation_table"]
        resume = self.resume_checkpoint()
        if resume is not None and (resume / SNAPSHOT_FILE).exists():
            rows = [tuple(r) for r in json.loads((resume / SNAPSHOT_FILE).read_text())]
            self._rows_file.write_text(json.dumps(rows))
            self.info(f"resuming with the {len(rows)} rows read by the first attempt", rows=len(rows))
            return rows
        copy = sql.SQL("COPY (SELECT {cols} FROM {schema}.{table}) TO STDOUT").format(
            cols=sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in columns),
            schema=sql.Identifier(schema), table=sql.Identifier(table))

        def read(conn: psycopg.Connection[Any]) -> list[tuple[str | None, ...]]:
            try:
                with conn.cursor() as cur, cur.copy(copy) as cp:
                    return [tuple(row) for row in cp.rows()]
            except psycopg.errors.UndefinedTable as e:
                raise JobError(f"relation {schema}.{table} no longer exists: {e.diag.message_primary}") from e
            except psycopg.errors.UndefinedColumn as e:
                raise JobError(f"{schema}.{table} changed since the job was queued: {e.diag.message_primary}") from e
            except psycopg.errors.InsufficientPrivilege as e:
                raise JobError(f"the worker's database role may not read {schema}.{table}: "
                               f"{e.diag.message_primary}; GRANT SELECT ON {schema}.{table} to it") from e

        rows = self.with_retry("reading the training data", read)
        self._rows_file.write_text(json.dumps(rows))
        self.info(f"read {len(rows)} rows from {schema}.{table}", rows=len(rows))
        return rows

    # ---- checkpoints in PostgreSQL ----
    def resume_checkpoint(self) -> Path | None:
        """The latest stored checkpoint of this job (any earlier attempt), downloaded; None if there is none."""
        if self._resume is False:
            self._resume = None
            row = self.with_retry("looking for a checkpoint",
                                  lambda c: c.execute(q("latest_checkpoint"), {"id": self.job_id}).fetchone())
            if row is not None:
                dest = self.workdir / "resume" / f"checkpoint-{row['step']}"
                self.with_retry("downloading the checkpoint", lambda c: files.copy_dir_out(
                    c, q("checkpoint_files"), {"checkpoint_id": row["id"]}, dest))
                self._resume = dest
                self.info(f"resuming from the checkpoint at step {row['step']} (attempt {row['attempt']})",
                          step=row["step"], bytes=row["bytes"])
        return self._resume if isinstance(self._resume, Path) else None

    def store_checkpoint(self, step: int, src: Path, keep: int) -> None:
        """Store checkpoint directory `src` (and the data snapshot) in one fenced transaction; keep `keep`."""
        if self._rows_file.exists() and not (src / SNAPSHOT_FILE).exists():
            shutil.copyfile(self._rows_file, src / SNAPSHOT_FILE)
        self.flush_logs()
        t0 = time.monotonic()

        def store(conn: psycopg.Connection[Any]) -> tuple[int, int]:
            params = {"id": self.job_id, "attempt": self.attempt, "step": step, "keep": max(1, keep)}
            with conn.transaction():
                if conn.execute(q("lock_owned_job"), params).fetchone() is None:
                    raise jobs.LeaseLost(f"job {self.job_id} attempt {self.attempt} lost its lease")
                conn.execute(q("delete_checkpoint_step"), params)
                checkpoint_id = db_one(conn, q("insert_checkpoint"), params)["id"]
                stored = files.copy_dir_in(conn, q("copy_checkpoint_files"), checkpoint_id, src)
                conn.execute(q("finish_checkpoint"), {"checkpoint_id": checkpoint_id})
                conn.execute(q("prune_checkpoints"), params)
            return stored

        n_files, n_bytes = self.with_retry("storing a checkpoint", store)
        seconds = time.monotonic() - t0
        self.info(f"checkpoint at step {step} stored in PostgreSQL: {n_files} files, {n_bytes / 1e6:.1f} MB "
                  f"in {seconds:.2f} s", step=step, bytes=n_bytes, seconds=round(seconds, 3))

    def resolve_model(self, model_name: str) -> tuple[str, dict[str, Any] | None]:
        """A loadable model path or hub id for `model_name`, and the stored model row if it came from pgml.

        `pgml:<project>` is that project's latest successful model; `pgml:model:<id>` is model <id>.
        Anything else is a Hugging Face hub id or a directory on this worker.
        """
        if not model_name.startswith("pgml:"):
            if model_name.startswith(("/", "./", "~")) and not Path(model_name).expanduser().is_dir():
                raise JobError(f"model_name {model_name!r} is not a directory on worker {os.uname().nodename}; "
                               "pass a directory that exists on every worker, a hub id, or pgml:<project>")
            return str(Path(model_name).expanduser()) if model_name.startswith("~") else model_name, None
        ref = model_name.removeprefix("pgml:")
        model_id = int(ref.removeprefix("model:")) if ref.startswith("model:") else None
        if ref.startswith("model:") and not ref.removeprefix("model:").isdigit():
            raise JobError(f"model_name {model_name!r}: write pgml:model:<id> with a numeric id")
        row = self.with_retry("resolving the model", lambda c: c.execute(
            q("resolve_model_ref"), {"model_id": model_id, "project": ref}).fetchone())
        if row is None:
            what = f"model {model_id}" if model_id else f"a successful model in project {ref!r}"
            raise JobError(f"model_name {model_name!r}: there is no {what}")
        if row["status"] != "successful":
            raise JobError(f"model_name {model_name!r}: model {row['id']} is {row['status']}, not successful")
        dest = self.workdir / f"start-model-{row['id']}"
        self.with_retry("downloading the starting model",
                        lambda c: files.download_model(c, row["id"], dest))
        self.info(f"starting from stored model {row['id']} (project {row['project_name']})", model_id=row["id"])
        return str(dest), dict(row)

    # ---- outputs ----
    def log(self, entry: dict[str, Any]) -> None:
        """Store one log event in pgml.logs now (buffered and retried if the database is away)."""
        entry = {k: _number(v) for k, v in entry.items()}
        entry.setdefault("timestamp", str(dt.datetime.now()))
        step = entry.get("step")
        if isinstance(step, int | float):
            now = time.monotonic()
            if self._rate_origin is None:
                self._rate_origin = (step, now)
            elif step > self._rate_origin[0] and now > self._rate_origin[1]:
                rate = (step - self._rate_origin[0]) / (now - self._rate_origin[1])
                self._progress["steps_per_second"] = round(rate, 4)
        self.emit({"event": "log", "logs": entry})
        self._seq += 1
        self._pending.append((self._seq, entry))
        self.flush_logs(wait=False)

    def flush_logs(self, wait: bool = True) -> None:
        if not self._pending:
            return
        batch = list(self._pending)

        def write(conn: psycopg.Connection[Any]) -> None:
            jobs.append_logs(conn, self.job_id, self.attempt, batch, self._progress)

        if wait:
            self.with_retry("writing logs", write)
        else:
            try:
                write(self.conn())
            except RETRYABLE:
                self._conn = None  # keep them; the next log or the final flush retries
                return
        del self._pending[: len(batch)]

    def save_results(self, model_dir: Path, metrics: dict[str, Any], base_model: str | None = None) -> None:
        """Commit the job: every file under model_dir into pgml.files, metrics, status — atomically."""
        self.flush_logs()
        metrics = {k: _number(v) for k, v in metrics.items()}

        def commit(conn: psycopg.Connection[Any]) -> tuple[int, int]:
            with conn.transaction():
                if conn.execute(q("lock_owned_job"), {"id": self.job_id, "attempt": self.attempt}).fetchone() is None:
                    raise jobs.LeaseLost(f"job {self.job_id} attempt {self.attempt} lost its lease")
                conn.execute(q("delete_model_files"), {"model_id": self.model_id})
                stored = files.copy_dir_in(conn, q("copy_files"), self.model_id, model_dir)
                conn.execute(q("succeed_job"), {"id": self.job_id, "attempt": self.attempt,
                                                "metrics": Jsonb(metrics), "base_model": base_model})
            return stored

        n_files, n_bytes = self.with_retry("storing the model", commit)
        self.info(f"stored {n_files} files ({n_bytes / 1e6:.1f} MB) in pgml.files for model {self.model_id}",
                  files=n_files, bytes=n_bytes)

    def check_stop(self) -> None:
        if self.stop_requested:
            raise Interrupted("stopped by SIGTERM before training started")


def main() -> int:
    _die_with_parent()
    # our stdout is the event channel; everything else that prints goes to stderr
    events = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    payload = json.loads(sys.stdin.read())
    spec, secrets = payload["spec"], payload.get("secrets") or {}
    ctx = JobContext(spec, secrets, os.environ["PGML_DSN"], events)

    def on_sigterm(signum: int, frame: Any) -> None:
        ctx.stop_requested = True

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        module = importlib.import_module(f"pgml_tuned.recipes.{RECIPES[spec['task']]}")
        module.run(ctx)
        return jobs.EXIT_OK
    except Interrupted as e:
        ctx.flush_logs(wait=False)
        ctx.info(str(e))
        return jobs.EXIT_REQUEUE
    except jobs.LeaseLost as e:
        ctx.emit({"event": "lease_lost", "message": str(e)})
        return jobs.EXIT_LEASE_LOST
    except JobError as e:
        ctx.emit({"event": "error", "error": str(e)})
        return jobs.EXIT_ERROR
    except Exception as e:
        tb = traceback.format_exc()
        sys.stderr.write(tb)
        ctx.emit({"event": "error", "error": f"{type(e).__name__}: {e}", "traceback": tb[-4000:]})
        return jobs.EXIT_ERROR
    finally:
        with contextlib.suppress(Exception):  # best effort; the daemon records the outcome
            ctx.flush_logs(wait=False)
        shutil.rmtree(ctx.workdir, ignore_errors=True)


if __name__ == "__main__":
    # run main() from the importable module, so recipes and this code share one set of exception classes
    from pgml_tuned.child import main as _main

    sys.exit(_main())
