"""The child's one door to PostgreSQL: its own connection, retried through server restarts, and every read
and fenced write a job makes — the training rows, log rows, checkpoints, stored models, the final commit.

Every statement is a ticketed pgml._child_* function (migration 0010): the child's login may read its own job's
rows and the models its submitter may start from, and write its own job's logs, checkpoints and results — nothing
else. Reads are sent from here; the writes are the fenced transactions of writes.py, run here with retries (a
refused ticket is LeaseLost: another attempt owns the job now, or it ended).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from .. import files
from ..db import RETRYABLE, Row, backoff_delays, q, sync_connect
from ..errors import JobError
from . import writes
from .events import Events

T = TypeVar("T")

# How long the child keeps retrying the database (server restarts, lost connections) before giving up.
DB_RETRY_SECONDS = float(os.environ.get("PGML_DB_RETRY_SECONDS", "300"))


def number(v: Any) -> Any:
    """Trainer log values may arrive as strings; store numbers as numbers."""
    if isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            return v
        return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f
    return v


class JobStore:
    def __init__(
        self,
        dsn: str,
        ticket: str,
        job_id: int,
        attempt: int,
        model_id: int,
        events: Events,
        workdir: Path,
        *,
        writer: bool = True,
    ) -> None:
        self.dsn = dsn
        # rank 0 writes the job's log rows; another rank's notes go to its worker's log only (its ticket may only
        # read, on a gang's other hosts, and its lines would repeat rank 0's)
        self.writer = writer
        self.ticket = ticket
        self.job_id = job_id
        self.attempt = attempt
        self.model_id = model_id
        self.events = events
        self.workdir = workdir
        self._conn: psycopg.Connection[Any] | None = None
        self._pending: list[writes.LogRow] = []
        self._seq = 0
        self._finished = False  # the job's final transaction committed: no more log rows (the ticket is spent)
        self._rate_origin: tuple[float, float] | None = None  # (step, time) of this attempt's first log
        self._progress: dict[str, Any] = {}

    def sibling(self) -> JobStore:
        """A store of the same attempt over a connection of its own (for another thread: the checkpoint uploader)."""
        return JobStore(self.dsn, self.ticket, self.job_id, self.attempt, self.model_id, self.events, self.workdir)

    # ---- the connection ----
    def conn(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = sync_connect(self.dsn, app=f"pgml-tuned job {self.job_id}")
            self._conn.autocommit = True
        return self._conn

    def with_retry(self, what: str, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run fn(conn), reconnecting through server restarts and killed backends for DB_RETRY_SECONDS."""
        deadline = time.monotonic() + DB_RETRY_SECONDS
        for delay in backoff_delays(first=0.1, cap=5.0):
            try:
                with writes.fenced(self.job_id):
                    return fn(self.conn())
            except RETRYABLE as e:
                self._conn = None
                if time.monotonic() + delay > deadline:
                    raise JobError(
                        f"lost the database while {what} and could not reconnect for {DB_RETRY_SECONDS:.0f} s: {e}"
                    ) from e
                self.note(f"database connection lost while {what}; retrying in {delay:.1f} s", "warning", flush=False)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def fetch_row(self, what: str, name: str, params: dict[str, Any]) -> Row | None:
        """One row of the named query (or None); the job's id and ticket are passed along."""
        return self.with_retry(what, lambda c: c.execute(q(name), {**params, **self._ticket}).fetchone())

    @property
    def _ticket(self) -> dict[str, Any]:
        return {"id": self.job_id, "ticket": self.ticket}

    # ---- the training rows ----
    def read_rows(self, snapshot_columns: list[str], columns: list[str]) -> list[tuple[str | None, ...]]:
        """The named columns of the rows pgml.tune() copied at submit time (with the submitter's rights, in
        the submitter's transaction: one consistent snapshot for every attempt of the job)."""
        missing = [c for c in columns if c not in snapshot_columns]
        if missing:
            raise JobError(
                f"column(s) {missing} were not copied when the job was submitted (it copied "
                f"{snapshot_columns}); resubmit the job"
            )
        at = [snapshot_columns.index(c) for c in columns]

        def read(conn: psycopg.Connection[Any]) -> list[tuple[str | None, ...]]:
            select = sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(sql.SQL(q("child_rows")))
            with conn.cursor() as cur, cur.copy(select, self._ticket) as cp:
                cp.set_types(["text[]"])
                return [tuple(row[0][i] for i in at) for row in cp.rows()]

        rows = self.with_retry("reading the training data", read)
        self.note(f"read {len(rows)} rows", rows=len(rows))
        return rows

    # ---- stored models ----
    def find_model(self, model_id: int | None, project: str, owner: str) -> Row | None:
        """`owner` is the job's submitter: the database checks it again from the job row, whatever is passed."""
        return self.fetch_row("resolving the model", "child_find_model", {"model_id": model_id, "project": project})

    def hub_refusal(self, model_name: str, owner: str) -> str | None:
        row = self.fetch_row("checking the hub allow-list", "hub_refusal", {"model_name": model_name, "owner": owner})
        return row["error"] if row else None

    def download_model(self, model_id: int, dest: Path) -> Path:
        return self.with_retry(
            "downloading a stored model",
            lambda c: files.download_model(c, model_id, dest, "child_model_files", self._ticket),
        )

    # ---- checkpoints ----
    def latest_checkpoint(self, dest_root: Path, *, record: bool = True) -> Path | None:
        """The latest stored checkpoint of this job (any earlier attempt), downloaded under dest_root; `record`: say
        so in the job's logs (the writer's part; a gang's other hosts only read)."""
        row = self.fetch_row("looking for a checkpoint", "child_latest_checkpoint", {})
        if row is None:
            return None
        dest = dest_root / f"checkpoint-{row['step']}"
        self.with_retry(
            "downloading the checkpoint",
            lambda c: files.copy_dir_out(
                c, q("child_checkpoint_files"), {**self._ticket, "checkpoint_id": row["id"]}, dest
            ),
        )
        if record:
            self.resume(
                row["step"], f"resuming from the checkpoint at step {row['step']} (stored by attempt {row['attempt']})"
            )
        return dest

    def resume(self, step: int, message: str) -> None:
        """Record that this attempt trains on from `step` (0: from the start): the log rows of earlier attempts past
        it move to pgml.superseded_logs in the transaction that stores `message` (pgml.logs then has each step once)."""
        self.flush_logs()
        seq = self._next_seq()
        entry = {"message": message, "from_step": step}
        moved = self.with_retry(
            "recording the resume", lambda c: writes.resume(c, self.job_id, self.ticket, step, seq, entry)
        )
        self.events.info(message, from_step=step, superseded=moved)

    def store_checkpoint(self, step: int, src: Path, keep: int) -> None:
        """Store checkpoint directory `src` in one fenced transaction; keep the newest `keep`."""
        t0 = time.monotonic()
        n_files, n_bytes = self.with_retry(
            "storing a checkpoint", lambda c: writes.store_checkpoint(c, self.job_id, self.ticket, step, src, keep)
        )
        seconds = time.monotonic() - t0
        self.note(
            f"checkpoint at step {step} stored in PostgreSQL: {n_files} files, {n_bytes / 1e6:.1f} MB "
            f"in {seconds:.2f} s",
            checkpoint_step=step,  # (no "step": a line about the job is no training row, whatever a query filters on)
            bytes=n_bytes,
            seconds=round(seconds, 3),
        )

    # ---- log rows ----
    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def note(self, message: str, level: str = "info", *, flush: bool = True, **fields: Any) -> None:
        """A line about the job: to the worker (its log) and into pgml.logs as a row of kind info or warning,
        {"message": message, **fields} (buffered like the training rows; `flush`: try to write it now)."""
        self.events.info(message, level, **fields)
        if self._finished or not self.writer:
            return
        kind = "info" if level in ("info", "debug") else "warning"
        self._pending.append((self._next_seq(), kind, {"message": message, **fields}))
        if flush:
            self.flush_logs(wait=False)

    def log(self, entry: dict[str, Any]) -> None:
        """Store one log event in pgml.logs now (buffered and retried if the database is away)."""
        entry = {k: number(v) for k, v in entry.items()}
        entry.setdefault("timestamp", str(dt.datetime.now()))
        step = entry.get("step")
        if isinstance(step, int | float):
            now = time.monotonic()
            if self._rate_origin is None:
                self._rate_origin = (step, now)
            elif step > self._rate_origin[0] and now > self._rate_origin[1]:
                rate = (step - self._rate_origin[0]) / (now - self._rate_origin[1])
                self._progress["steps_per_second"] = round(rate, 4)
        self.events.emit({"event": "log", "logs": entry})
        self._pending.append((self._next_seq(), "train", entry))
        self.flush_logs(wait=False)

    def flush_logs(self, wait: bool = True) -> None:
        if not self._pending:
            return
        batch = list(self._pending)
        progress = progress_of([e for _, kind, e in batch if kind == "train"], self._progress)

        def write(conn: psycopg.Connection[Any]) -> None:
            writes.append_logs(conn, self.job_id, self.ticket, batch, progress)

        if wait:
            self.with_retry("writing logs", write)
        else:
            try:
                write(self.conn())
            except RETRYABLE:
                self._conn = None  # keep them; the next log or the final flush retries
                return
        del self._pending[: len(batch)]

    # ---- a loaded dataset (task load_dataset) ----
    def begin_dataset(self, names: list[str], types: list[str]) -> str:
        """The staging table this attempt loads its rows into: schema.name (pgml_staging since 0034), or a name in
        schema pgml."""
        with refusals_as_job_errors():
            return self.with_retry(
                "creating the staging table", lambda c: writes.begin_dataset(c, self.job_id, self.ticket, names, types)
            )

    def copy_csv(self, table: str, names: list[str], chunks: Callable[[], Iterable[tuple[bytes, int]]]) -> int:
        """COPY chunks() — (CSV bytes, rows) — into pgml.<table> as one statement over a connection of its own
        (log rows keep flowing on this one meanwhile); a retry after a lost connection starts over, from a table
        the failed statement left empty. Returns the rows copied."""
        schema, _, name = table.rpartition(".")
        stmt = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(
            sql.Identifier(schema or "pgml", name), sql.SQL(", ").join(map(sql.Identifier, names))
        )

        def copy(_: psycopg.Connection[Any]) -> int:
            rows = 0
            with sync_connect(self.dsn, app=f"pgml-tuned job {self.job_id} copy") as data:
                data.autocommit = True
                with data.cursor() as cur, cur.copy(stmt) as cp:
                    for chunk, n in chunks():
                        cp.write(chunk)
                        rows += n
            return rows

        return self.with_retry("loading the rows", copy)

    # ---- predictions (task predict_batch) ----
    def begin_predictions(self, restart: bool) -> str:
        """The job's output table, emptied when `restart` (an attempt's rows replace an earlier attempt's)."""
        with refusals_as_job_errors():
            return self.with_retry(
                "creating the output table",
                lambda c: writes.write_predictions(c, self.job_id, self.ticket, [], restart),
            )

    def write_predictions(
        self, rows: Sequence[tuple[Any, ...]], columns: tuple[str, ...] = ("key", "label", "score")
    ) -> None:
        with refusals_as_job_errors():
            self.with_retry(
                "writing predictions",
                lambda c: writes.write_predictions(c, self.job_id, self.ticket, rows, False, columns),
            )

    def finish_dataset(self, rows: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Swap the staging table in as pgml."<source>" and succeed, in one fenced transaction."""
        self.flush_logs()
        seq = self._next_seq()

        def report(result: dict[str, Any]) -> writes.LogRow:
            seconds = f" in {metrics['seconds']:.2f} s" if isinstance(metrics.get("seconds"), int | float) else ""
            return seq, "info", {"message": f"loaded {rows} rows into {result['table_name']}{seconds}", **result}

        with refusals_as_job_errors():
            result = self.with_retry(
                "storing the dataset",
                lambda c: writes.finish_dataset(c, self.job_id, self.ticket, rows, metrics, report),
            )
        self._finished = True
        self.events.info(report(result)[2]["message"], table_name=result.get("table_name"), rows=rows)
        return result

    # ---- the final commit ----
    def succeed(self, model_dir: Path, metrics: dict[str, Any], base_model: str | None) -> None:
        """Commit the job: every file under model_dir into pgml.files, metrics, status — atomically."""
        self.flush_logs()
        metrics = {k: number(v) for k, v in metrics.items()}
        seq = self._next_seq()

        def report(n_files: int, n_bytes: int) -> writes.LogRow:
            message = f"stored {n_files} files ({n_bytes / 1e6:.1f} MB) in pgml.files for model {self.model_id}"
            return seq, "info", {"message": message, "files": n_files, "bytes": n_bytes}

        n_files, n_bytes = self.with_retry(
            "storing the model",
            lambda c: writes.succeed(c, self.job_id, self.ticket, model_dir, metrics, base_model, report),
        )
        self._finished = True
        _, _, entry = report(n_files, n_bytes)
        self.events.info(entry["message"], files=n_files, bytes=n_bytes)


@contextlib.contextmanager
def refusals_as_job_errors() -> Iterator[None]:
    """An error the API raised on purpose (it has a hint: pgml._fail) fails the job with its message and hint,
    as the user would read it from the SQL call, without the PL/pgSQL context."""
    try:
        yield
    except psycopg.Error as e:
        if e.diag.message_hint:
            raise JobError(f"{e.diag.message_primary} (HINT: {e.diag.message_hint})") from e
        raise


def progress_of(entries: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    """The job's progress after these training log entries (none: a batch of lines about the job): the last
    step/epoch/losses, and `extra` (steps/s)."""
    last = entries[-1] if entries else {}
    progress = {k: v for k, v in last.items() if k in ("step", "max_steps", "epoch", "loss", "eval_loss")}
    for e in entries:
        if "loss" in e:
            progress["loss"] = e["loss"]
    progress.update(extra)
    return progress
