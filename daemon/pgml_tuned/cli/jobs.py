"""The commands that follow jobs someone submitted: status, wait, logs, cancel."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import anyio
import psycopg

from .. import db
from .dsn import CliError, q, reading_dsn, run
from .output import LiveLines, cell, final_line, first_line, fleet_lines, key_metric, plain, progress_line, table

FINAL = ("succeeded", "failed", "cancelled")


async def job_progress(conn: psycopg.AsyncConnection[Any], job_id: int) -> dict[str, Any] | None:
    """What progress_line() and final_line() show of job `job_id` (None: no such job, or another user's)."""
    row = await (await conn.execute(q("job_progress"), {"job_id": job_id})).fetchone()
    return dict(row) if row else None


def cmd_wait(args: argparse.Namespace) -> int:
    """Exit status: 0 when every job succeeded, 1 when one failed or was cancelled."""
    dsn = reading_dsn(args)

    async def go() -> int:
        live = LiveLines(interval=args.interval)
        pending = list(dict.fromkeys(args.jobs))
        code = 0
        async with await db.connect(dsn) as conn:
            while pending:
                lines: dict[int, str] = {}
                for job_id in list(pending):
                    job = await job_progress(conn, job_id)
                    if job is None:
                        raise CliError(f"no job {job_id} (or it is another user's): see `pgml-tuned status`")
                    if job["status"] in FINAL:
                        pending.remove(job_id)
                        live.finish(job_id, final_line(job))
                        code = code or (0 if job["status"] == "succeeded" else 1)
                    else:
                        lines[job_id] = progress_line(job)
                if lines:
                    live.update(lines, anyio.current_time())
                    await anyio.sleep(0.5)
        return code

    return int(run(go))


def cmd_status(args: argparse.Namespace) -> int:
    dsn = reading_dsn(args)

    async def go() -> None:
        async with await db.connect(dsn) as conn:
            if args.job:
                row = await (await conn.execute(q("job_status"), {"job_id": args.job})).fetchone()
                if row is None:
                    raise CliError(f"no job {args.job} (or it is another user's): see `pgml-tuned status`")
                print(json.dumps(plain(row), indent=2))
                return
            summary = await (await conn.execute(q("queue_summary"))).fetchall()
            rows = await (await conn.execute(q("recent_jobs"), {"limit": args.limit})).fetchall()
            workers = await fleet_rows(conn)
            for r in rows:
                r["key_metric"], r["key_metric_value"] = key_metric(r["task"], r["metrics"]) or (None, None)
            if args.json:
                print(json.dumps({"queue": plain(summary), "jobs": plain(rows), "workers": plain(workers)}, indent=2))
                return
            parts = [f"{r['status']} {r['jobs']}" for r in summary]
            extra = [
                f"{r['expired_leases']} expired leases ({r['status']})" for r in summary if r["expired_leases"]
            ] + [f"oldest queued {cell(r['oldest_queued_age'])} ago" for r in summary if r["oldest_queued_age"]]
            print("jobs: " + ", ".join(parts) + ("; " + "; ".join(extra) if extra else ""))
            shown = [
                {
                    "id": r["id"],
                    "project": r["project"],
                    "task": r["task"],
                    "status": r["status"],
                    "attempt": r["attempt"],
                    "worker": r["worker"],
                    "step": f"{r['step']}/{r['max_steps']}" if r["step"] is not None else None,
                    "progress": f"{r['progress_pct']}%" if r["progress_pct"] is not None else None,
                    "loss": r["last_loss"],
                    "eta": r["eta"],
                    "metric": f"{r['key_metric']} {cell(r['key_metric_value'])}" if r["key_metric"] else None,
                    "model_id": r["model_id"],
                    "error": first_line(r["error"]),
                }
                for r in rows
            ]
            if shown:
                print()
                for line in table(shown):
                    print(line)
            else:
                print("no job queued, running or finished in the last hour")
            print()
            for line in fleet_lines(workers):
                print(line)

    run(go)
    return 0


async def fleet_rows(conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
    """The fleet registry (pgml.worker_status), live workers first; [] on a schema without it (before 0022)."""
    exists = await (await conn.execute(q("has_worker_status"))).fetchone()
    if not exists or exists["v"] is None:
        return []
    return await (await conn.execute(q("workers"))).fetchall()


def log_line(kind: str, logs: dict[str, Any]) -> dict[str, Any]:
    """A pgml.logs row as `logs` prints it: a training row as stored; a line about the job (claimed, resuming from
    step N, rows read, requeued, failed ...) with its kind first: {"kind": "info", "message": ..., ...}."""
    return logs if kind == "train" else {"kind": kind, **logs}


def cmd_logs(args: argparse.Namespace) -> int:
    """Exit status: 1 when the job failed or was cancelled (after its log rows and the reason), else 0."""
    dsn = reading_dsn(args)

    async def go() -> int:
        last = 0
        # --follow: the job's progress line on stderr (plain lines: stdout's log rows share the terminal)
        live = LiveLines(sys.stderr, interval=10.0, in_place=False)
        async with await db.connect(dsn) as conn:
            while True:
                job = await (await conn.execute(q("job_state"), {"job_id": args.job})).fetchone()
                if job is None:
                    raise CliError(f"no job {args.job} (or it is another user's): see `pgml-tuned status`")
                rows = await (await conn.execute(q("job_logs_after"), {"job_id": args.job, "after": last})).fetchall()
                for r in rows:
                    print(json.dumps(log_line(r["kind"], r["logs"])), flush=True)
                    last = r["id"]
                if job["status"] in FINAL:
                    progress = await job_progress(conn, args.job) if args.follow else None
                    if progress is not None:  # its metrics, model id and download command, or why it failed
                        live.finish(args.job, final_line(progress))
                    elif job["status"] != "succeeded":
                        error = f": {job['error']}" if job["error"] else ""
                        print(f"job {args.job} {job['status']}{error}", file=sys.stderr)
                    return 0 if job["status"] == "succeeded" else 1
                if not args.follow:
                    print(f"job {args.job} is {job['status']} (--follow keeps printing until it ends)", file=sys.stderr)
                    return 0
                progress = await job_progress(conn, args.job)
                if progress is not None:
                    live.update({args.job: progress_line(progress)}, anyio.current_time())
                await anyio.sleep(0.5)

    return int(run(go))


def cmd_cancel(args: argparse.Namespace) -> int:
    dsn = reading_dsn(args)

    async def go() -> str:
        async with await db.connect(dsn) as conn:
            row = await (await conn.execute(q("cancel_job"), {"job_id": args.job})).fetchone()
            return str(row["status"]) if row else "?"

    print(f"job {args.job}: {run(go)}")
    return 0
