"""The child's writes: each one short transaction over the child's own connection, fenced on its ticket.

Every statement is a pgml._child_* function taking (job id, ticket) (sql/queries.sql; migration 0010): the
child's login may run nothing else, and each refuses with SQLSTATE TICKET_REFUSED unless the ticket is the job's
running attempt's (LeaseLost here: the attempt no longer owns the job). Synchronous: a job's child is a plain
blocking process. JobStore (store.py) runs them with its retries; tests and benches call them on a connection.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from .. import files
from ..db import fetch_one, q
from ..errors import JobError, LeaseLost

Conn = psycopg.Connection[Any]
TICKET_REFUSED = "PGT01"


@contextlib.contextmanager
def fenced(job_id: int) -> Iterator[None]:
    """A refused ticket is a lost lease: the attempt no longer owns the job (requeued, ended, taken over)."""
    try:
        yield
    except psycopg.Error as e:
        if e.sqlstate == TICKET_REFUSED:
            raise LeaseLost(f"job {job_id}: this attempt no longer owns the job ({e.diag.message_primary})") from e
        raise


LogRow = tuple[int, str, dict[str, Any]]  # (seq, kind, entry): kind "train" (a Trainer event), "info" or "warning"


def _log_params(job_id: int, ticket: str, rows: list[LogRow], progress: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": job_id,
        "ticket": ticket,
        "progress": Jsonb(progress),
        "logs": json.dumps([{"seq": seq, "kind": kind, "entry": e} for seq, kind, e in rows], default=str),
    }


def append_logs(conn: Conn, job_id: int, ticket: str, rows: list[LogRow], progress: dict[str, Any]) -> None:
    """Store (seq, kind, entry) log rows of this attempt and its progress; LeaseLost if it no longer owns the job."""
    with fenced(job_id):
        conn.execute(q("child_log"), _log_params(job_id, ticket, rows, progress))


def resume(conn: Conn, job_id: int, ticket: str, step: int, seq: int, entry: dict[str, Any]) -> int:
    """Record that this attempt trains on from `step` (0: from the start): in one statement, the training rows of
    earlier attempts past it move to pgml.superseded_logs and `entry` becomes this attempt's info row `seq`.
    Returns how many rows moved."""
    with fenced(job_id):
        row = fetch_one(
            conn, q("child_resume"), {"id": job_id, "ticket": ticket, "step": step, "seq": seq, "entry": Jsonb(entry)}
        )
    return int(row["moved"])


def store_checkpoint(conn: Conn, job_id: int, ticket: str, step: int, src: Path, keep: int) -> tuple[int, int]:
    """Checkpoint directory `src` of `step` into pgml.checkpoints in one fenced transaction, keeping the
    newest `keep`. Returns (files, bytes)."""
    params = {"id": job_id, "ticket": ticket, "step": step, "keep": max(1, keep)}
    with fenced(job_id), conn.transaction():
        checkpoint_id = fetch_one(conn, q("child_checkpoint_begin"), params)["id"]
        stored = files.copy_dir_in(conn, q("copy_checkpoint_files"), checkpoint_id, src)
        budget = fetch_one(conn, q("child_checkpoint_end"), {**params, "checkpoint_id": checkpoint_id})
        if budget["max_bytes"] is not None and budget["bytes"] > budget["max_bytes"]:
            raise JobError(
                f"the job's checkpoints would hold {budget['bytes'] / 1e6:.0f} MB in PostgreSQL; its submitter may "
                f"keep {budget['max_bytes'] / 1e6:.0f} MB (pgml.role_limits): save fewer (save_total_limit) or "
                "smaller (a LoRA adapter) checkpoints"
            )
    return stored


def succeed(
    conn: Conn,
    job_id: int,
    ticket: str,
    model_dir: Path,
    metrics: dict[str, Any],
    base_model: str | None,
    report: Callable[[int, int], LogRow] | None = None,
) -> tuple[int, int]:
    """The job's final transaction: every file under model_dir into pgml.files, metrics, status succeeded; and
    the log row report(files, bytes) says what was stored, in the same transaction."""
    params = {"id": job_id, "ticket": ticket}
    with fenced(job_id), conn.transaction():
        model_id = fetch_one(conn, q("child_files_begin"), params)["model_id"]
        stored = files.copy_dir_in(conn, q("copy_files"), model_id, model_dir)
        if report is not None:
            conn.execute(q("child_log"), _log_params(job_id, ticket, [report(*stored)], {}))
        conn.execute(q("child_succeed"), {**params, "metrics": Jsonb(metrics), "base_model": base_model})
    return stored


def write_predictions(
    conn: Conn,
    job_id: int,
    ticket: str,
    rows: Sequence[tuple[Any, ...]],
    restart: bool,
    columns: tuple[str, ...] = ("key", "label", "score"),
) -> str:
    """One transaction of a predict_batch (or embed_batch: columns key, embedding) child: its output table (emptied
    first when `restart`), then a COPY of rows into it. Returns the table's name (in schema pgml)."""
    with fenced(job_id), conn.transaction():
        params = {"id": job_id, "ticket": ticket, "restart": restart}
        name = str(fetch_one(conn, q("child_predictions_begin"), params)["output"])
        if not rows:
            return name  # the table, (re)created or emptied
        stmt = sql.SQL("COPY {} ({}) FROM STDIN").format(
            sql.Identifier("pgml", name), sql.SQL(", ").join(map(sql.Identifier, columns))
        )
        with conn.cursor() as cur, cur.copy(stmt) as cp:
            for row in rows:
                cp.write_row(row)
    return name


def begin_dataset(conn: Conn, job_id: int, ticket: str, names: list[str], types: list[str]) -> str:
    """A load_dataset attempt's staging table in schema pgml, empty, with these columns; the child's login may
    INSERT (COPY) into it and nothing else."""
    with fenced(job_id), conn.transaction():
        row = fetch_one(conn, q("dataset_begin"), {"id": job_id, "ticket": ticket, "names": names, "types": types})
    return str(row["staging"])


def finish_dataset(
    conn: Conn,
    job_id: int,
    ticket: str,
    rows: int,
    metrics: dict[str, Any],
    report: Callable[[dict[str, Any]], LogRow] | None = None,
) -> dict[str, Any]:
    """A load_dataset job's final transaction: its staging table becomes pgml."<source>" and the job succeeds
    with the result (table_name, rows, columns) in its metrics — both or neither; and the log row report(result)
    says so, in the same transaction."""
    params = {"id": job_id, "ticket": ticket}
    with fenced(job_id), conn.transaction():
        result = fetch_one(conn, q("dataset_commit"), {**params, "rows": rows})["result"]
        if report is not None:
            conn.execute(q("child_log"), _log_params(job_id, ticket, [report(result)], {}))
        metrics = {**metrics, **result}
        conn.execute(q("child_succeed"), {**params, "metrics": Jsonb(metrics), "base_model": None})
    return metrics
