"""`pgml-tuned`: migrate, serve, demo, status, wait, logs, cancel, download, dashboard, gc, db, keys.

The DSN comes from --dsn, else PGML_DSN, else the embedded PostgreSQL under $PGML_HOME.
"""

from __future__ import annotations

import argparse
import datetime
import decimal
import io
import json
import os
import sys
from collections.abc import Callable, Coroutine
from dataclasses import fields
from pathlib import Path
from typing import Any

import anyio
import psycopg
from psycopg.conninfo import conninfo_to_dict

from . import __version__, db, embedded, logconfig
from .config import Settings, field_type

COMMON_SETTINGS = ("dsn", "home", "log_format", "log_level")  # every command takes these; serve takes all


def q(name: str) -> str:
    """The named statement `name` of sql/cli.sql."""
    return db.q(name, file="cli.sql")


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(**{f.name: getattr(args, f.name, None) for f in fields(Settings)})


def add_setting_flags(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """A --flag for each named Settings field (all that have one when names is None), typed and helped by it."""
    for f in fields(Settings):
        if not f.metadata.get("flag", True) or (names is not None and f.name not in names):
            continue
        kind = field_type(f)
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=kind if kind in (int, float) else str,
            choices=f.metadata.get("choices"),
            help=f.metadata.get("help"),
            metavar=None if f.metadata.get("choices") else f.name.split("_")[-1].upper(),
        )


class CliError(Exception):
    """A user's error: main() prints `pgml-tuned: <message>` (no traceback) and exits with `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def shown_dsn(dsn: str) -> str:
    """The DSN as it may be printed: user@host:port/dbname, never a password."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "the DSN given"
    host = params.get("host") or params.get("hostaddr") or "localhost"
    user = f"{params['user']}@" if params.get("user") else ""
    port = f":{params['port']}" if params.get("port") else ""
    return f"{user}{host}{port}/{params.get('dbname') or ''}"


def _reason(e: BaseException, dsn: str) -> str:
    """An error's text on one line, with the DSN and its password taken out (libpq may quote either)."""
    text = " ".join(str(e).split())
    secrets = [dsn]
    try:
        secrets.append(str(conninfo_to_dict(dsn).get("password") or ""))
    except psycopg.ProgrammingError:
        pass
    for secret in filter(None, secrets):
        text = text.replace(secret, "***")
    return text.removeprefix("connection failed: ")


def check_syntax(dsn: str) -> None:
    try:
        conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as e:
        raise CliError(f"--dsn / PGML_DSN is not a PostgreSQL connection string: {_reason(e, dsn)}", 2) from None


def check_database(dsn: str, *, schema: bool) -> None:
    """Connect once: an unreachable server or a wrong login is a CliError (exit 2) naming the server and the fix;
    with `schema`, so is a database that has no pgml schema."""
    check_syntax(dsn)
    try:
        with db.sync_connect(dsn) as conn:
            found = conn.execute(q("schema_installed")).fetchone()
    except psycopg.OperationalError as e:
        raise CliError(
            f"cannot connect to {shown_dsn(dsn)}: {_reason(e, dsn)} (check --dsn or PGML_DSN; without either, "
            "pgml-tuned uses its embedded PostgreSQL)",
            2,
        ) from None
    if schema and found is None:
        raise CliError(
            f"the database {shown_dsn(dsn)} has no pgml schema yet: an administrator installs it with "
            "`pgml-tuned migrate --dsn ...` (or try everything locally: `pgml-tuned demo` without a DSN)",
            2,
        )


def resolve_dsn(
    settings: Settings, *, announce: bool = True, role: str = "user", check: str = "reach", setup: bool = True
) -> str:
    """--dsn / PGML_DSN as given; else the embedded server, migrated, as `role`'s login there: "user" (submits),
    "worker" (serves) or "admin" (its superuser) — the same separation as any deployment.

    check: "reach" (connect once first), "schema" (and the pgml schema must be there) or "none" (serve: the
    daemon waits for its database). setup=False (commands that read what was set up: status, logs, cancel,
    download): never create nor migrate an embedded server; say how to start instead."""
    if settings.dsn:
        if check == "none":
            check_syntax(settings.dsn)
        else:
            check_database(settings.dsn, schema=check == "schema")
        return settings.dsn
    pgdata = settings.home / "pgdata"
    if not setup:
        if not pgdata.is_dir():
            raise CliError(
                f"no database: neither --dsn nor PGML_DSN is set, and there is no embedded PostgreSQL in {pgdata} "
                "yet. Set PGML_DSN to your database, or start a local one: `pgml-tuned demo` (a fine-tune on "
                "bundled data) or `pgml-tuned migrate`",
                2,
            )
        admin = embedded.ensure(settings.home)
        try:
            check_database(admin, schema=True)
        except CliError as e:
            raise CliError(
                f"no --dsn / PGML_DSN: the embedded PostgreSQL in {pgdata} has no pgml schema yet "
                "(set PGML_DSN to your database, or run `pgml-tuned migrate` or `pgml-tuned demo`)"
                if "no pgml schema" in str(e)
                else str(e),
                e.code,
            ) from None
        print(f"pgml-tuned: no --dsn / PGML_DSN: using the embedded PostgreSQL in {pgdata}", file=sys.stderr)
    else:
        admin = embedded.ensure(settings.home)
    _run(lambda: db.prepare_local(admin))
    _run(lambda: db.local_sealing_key(admin, settings.keyring))
    dsn = embedded.as_login(admin, role)
    if announce:
        print(
            f"embedded PostgreSQL running in {pgdata}\n"
            f"  connect: {embedded.psql_path()} '{embedded.as_login(admin, 'user')}'\n"
            f"  stop:    pgml-tuned db stop",
            file=sys.stderr,
        )
    return dsn


def child_dsn(settings: Settings) -> str | None:
    """The children's login: --child-dsn / PGML_CHILD_DSN; else the embedded server's child login; else None
    (a deployment that did not configure one: the children use the worker's DSN, and the daemon says so)."""
    if settings.child_dsn or settings.dsn:
        return settings.child_dsn
    return embedded.as_login(embedded.ensure(settings.home), "child")


def _run(fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return anyio.run(fn, backend="asyncio")


def cmd_migrate(args: argparse.Namespace) -> int:
    dsn = resolve_dsn(_settings(args), role="admin")
    applied = _run(lambda: db.migrate(dsn))
    print(f"applied {', '.join(applied)}" if applied else "schema pgml is up to date")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """The sealing keys of inline tokens: an administrator's commands (a worker never creates or registers one)."""
    from . import secrets

    if args.action == "generate":
        if not (args.out or args.file):
            raise ValueError("keys generate needs --out FILE: where to write the new private key")
        path = Path(args.out or args.file)
        key = secrets.generate_private_key(args.bits)
        secrets.write_private_key(key, path)
        print(
            f"key {secrets.key_id_of(key)} written to {path} (mode 0600)\n"
            f"  copy it into every worker's keyring directory (PGML_KEYRING_DIR, default $PGML_HOME/keyring),\n"
            f"  then: pgml-tuned keys register {path}"
        )
        return 0
    if args.action != "list" and not args.file:
        what = "the private key file" if args.action == "register" else "the key id (pgml-tuned keys list)"
        raise ValueError(f"keys {args.action} needs {what}")
    dsn = resolve_dsn(_settings(args), announce=False, role="admin", check="schema")

    async def go() -> None:
        async with await db.connect(dsn) as conn:
            if args.action == "register":
                key = await anyio.to_thread.run_sync(secrets.load_private_key, Path(args.file))
                key_id = await secrets.register_key(conn, key, activate=not args.no_activate)
                state = "registered" if args.no_activate else "registered and active: inline tokens are sealed to it"
                print(f"key {key_id} {state}")
            elif args.action in ("activate", "retire"):
                await conn.execute(q(f"{args.action}_sealing_key"), {"key_id": args.file})
                print(f"key {args.file} {args.action}d")
            rows = await (await conn.execute(q("sealing_keys"))).fetchall()
            if args.action == "list":
                for r in rows:
                    print("  ".join(f"{k}={v}" for k, v in r.items()))
                if not rows:
                    print("no sealing key is registered (pgml-tuned keys generate --out FILE; keys register FILE)")

    _run(go)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .worker.daemon import serve

    settings = _settings(args)
    logconfig.configure(settings.log_format, settings.log_level)
    # the embedded server is migrated by resolve_dsn; a daemon waits for a database that is not up yet
    dsn = resolve_dsn(settings, role="worker", check="reach" if args.migrate else "none")
    if args.migrate and settings.dsn:
        _run(lambda: db.migrate(dsn))
    _run(lambda: serve(settings, dsn, child_dsn=child_dsn(settings), drain=args.drain))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    settings = _settings(args)
    logconfig.configure(settings.log_format, settings.log_level)
    admin = resolve_dsn(settings, role="admin")
    user, worker = (
        (admin, admin) if settings.dsn else (embedded.as_login(admin, "user"), embedded.as_login(admin, "worker"))
    )
    return run_demo(settings, admin, user, worker, child_dsn(settings), epochs=args.epochs)


def _reading(args: argparse.Namespace) -> str:
    """The DSN of a command that reads jobs someone submitted: the database must hold the pgml schema."""
    return resolve_dsn(_settings(args), announce=False, check="schema", setup=False)


FINAL = ("succeeded", "failed", "cancelled")


def plain(value: Any) -> Any:
    """A database value as JSON keeps it: numbers stay numbers (numeric a float), intervals are seconds."""
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, datetime.datetime | datetime.date):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def _cell(value: Any) -> str:
    """A table cell: `-` for nothing, 4 significant digits for a float, whole seconds for an interval."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, datetime.timedelta):
        return str(value - datetime.timedelta(microseconds=value.microseconds))
    return str(value)


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Aligned columns under their names (numbers right-aligned), two spaces apart."""
    if not rows:
        return []
    cols = list(rows[0])
    cells = [[_cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    numeric = [all(isinstance(r[c], int | float | decimal.Decimal) or r[c] is None for r in rows) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()]
    for row in cells:
        lines.append(
            "  ".join(
                v.rjust(w) if num else v.ljust(w) for v, w, num in zip(row, widths, numeric, strict=True)
            ).rstrip()
        )
    return lines


def _first_line(text: str | None, width: int = 60) -> str | None:
    if not text:
        return None
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def key_metric(task: str | None, metrics: dict[str, Any] | None) -> tuple[str, float] | None:
    """The one number that says how good a job's model is: eval_accuracy (else eval_f1) for a classifier,
    eval_loss for a conversation model; for other tasks the first of these that is there."""
    order = ("eval_loss",) if task == "conversation" else ("eval_accuracy", "eval_f1", "eval_loss")
    for name in order:
        value = (metrics or {}).get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return name, float(value)
    return None


def _eval_part(metrics: dict[str, Any] | None) -> str:
    """`eval_accuracy 0.91 eval_f1 0.9 eval_loss 0.31`: the numeric eval_* values (no runtimes)."""
    skip = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_epoch")
    return " ".join(
        f"{k} {_cell(float(v))}"
        for k, v in sorted((metrics or {}).items())
        if k.startswith("eval_") and k not in skip and isinstance(v, int | float) and not isinstance(v, bool)
    )


async def job_progress(conn: psycopg.AsyncConnection[Any], job_id: int) -> dict[str, Any] | None:
    """What progress_line() and final_line() show of job `job_id` (None: no such job, or another user's)."""
    row = await (await conn.execute(q("job_progress"), {"job_id": job_id})).fetchone()
    return dict(row) if row else None


def progress_line(job: dict[str, Any]) -> str:
    """One line of a job's live progress, from job_progress(): `job 12 running  step 40/120  33.3%  ETA 0:01:05
    loss 0.4123  eval_loss 0.39 eval_accuracy 0.81`. `pgml-tuned wait` prints it; `logs --follow` may too."""
    parts = [f"job {job['id']} {job['status']}"]
    if job["step"] is not None:
        parts.append(f"step {job['step']}/{job['max_steps'] if job['max_steps'] is not None else '?'}")
    if job["progress_pct"] is not None:
        parts.append(f"{float(job['progress_pct']):.1f}%")
    if job["eta"] is not None:
        parts.append(f"ETA {_cell(job['eta'])}")
    if job["last_loss"] is not None:
        parts.append(f"loss {_cell(float(job['last_loss']))}")
    evals = _eval_part(job.get("last_eval"))
    if evals:
        parts.append(evals)
    return "  ".join(parts)


def final_line(job: dict[str, Any]) -> str:
    """The line a finished job ends with: its metrics, its model id and how to download the model; or why it
    failed."""
    if job["status"] == "succeeded":
        evals = _eval_part(job["metrics"])
        model = job["model_id"]
        fetch = f"; model {model}: pgml-tuned download {model} ./model-{model}" if model is not None else ""
        return f"job {job['id']} succeeded" + (f": {evals}" if evals else "") + fetch
    if job["status"] == "failed":
        return f"job {job['id']} failed: {_first_line(job['error'], 300) or 'no reason recorded'}"
    return f"job {job['id']} {job['status']}"


class LiveLines:
    """Lines that follow jobs: on a terminal rewritten in place (one line a job); elsewhere (a pipe, a file, CI)
    printed as plain lines: a job's line at once when its status changed, else when it changed and at most every
    `interval` seconds."""

    def __init__(self, stream: Any = None, interval: float = 10.0, *, in_place: bool = True) -> None:
        self.stream = stream or sys.stdout
        self.tty = in_place and bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval
        self.shown = 0  # lines drawn in place (tty)
        self.last: dict[int, tuple[str, float]] = {}

    def update(self, lines: dict[int, str], now: float) -> None:
        if self.tty:
            up = f"\x1b[{self.shown}F" if self.shown else ""
            width = self.width()  # a line that wrapped would take two rows: the next draw would go up too few
            self.stream.write(up + "".join(f"\x1b[2K{line[:width]}\n" for line in lines.values()))
            self.shown = len(lines)
        else:
            for job, line in lines.items():
                before = self.last.get(job)
                moved = before is not None and before[0].split("  ")[0] != line.split("  ")[0]  # e.g. queued → running
                if before is None or moved or (before[0] != line and now - before[1] >= self.interval):
                    self.stream.write(line + "\n")
                    self.last[job] = (line, now)
        self.stream.flush()

    def width(self) -> int:
        try:
            return max(20, os.get_terminal_size(self.stream.fileno()).columns - 1)
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            return 200

    def finish(self, job: int, line: str) -> None:
        """Print a job's final line; on a terminal it takes the place of the job's live line."""
        if self.tty and self.shown:
            self.stream.write(f"\x1b[{self.shown}F\x1b[2K{line}\n" + ("\n" * (self.shown - 1)))
            self.shown -= 1
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def cmd_wait(args: argparse.Namespace) -> int:
    """Exit status: 0 when every job succeeded, 1 when one failed or was cancelled."""
    dsn = _reading(args)

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

    return int(_run(go))


def cmd_status(args: argparse.Namespace) -> int:
    dsn = _reading(args)

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
            ] + [f"oldest queued {_cell(r['oldest_queued_age'])} ago" for r in summary if r["oldest_queued_age"]]
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
                    "metric": f"{r['key_metric']} {_cell(r['key_metric_value'])}" if r["key_metric"] else None,
                    "model_id": r["model_id"],
                    "error": _first_line(r["error"]),
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

    _run(go)
    return 0


async def fleet_rows(conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
    """The fleet registry (pgml.worker_status), live workers first; [] on a schema without it (before 0022)."""
    exists = await (await conn.execute(q("has_worker_status"))).fetchone()
    if not exists or exists["v"] is None:
        return []
    return await (await conn.execute(q("workers"))).fetchall()


def fleet_lines(workers: list[dict[str, Any]]) -> list[str]:
    """`pgml-tuned status`'s workers section: one line of counts, then a row per worker."""
    if not workers:
        return ["workers: none registered (start one: pgml-tuned serve)"]
    states = [s for s in ("live", "late", "gone", "stopped") if any(w["state"] == s for w in workers)]
    counts = ", ".join(f"{sum(w['state'] == s for w in workers)} {s}" for s in states)
    shown = [
        {
            "worker": w["id"],
            "state": w["state"],
            "heartbeat": f"{w['heartbeat_age']}s ago",
            "slots": f"{w['free_slots']}/{w['concurrency']} free",
            "gpus": f"{w['free_gpus']}/{w['gpus']} free" if w["gpus"] else None,
            "devices": ", ".join(
                f"{d.get('index')}:{d.get('name') or '?'}" + (f" {d['memory_mb']} MB" if d.get("memory_mb") else "")
                for d in w["devices"]
            ),
            "running": ",".join(str(j) for j in w["running"]),
            "models": ", ".join(w["models_cached"] or []),  # NULL: not shown to users
            "version": w["version"],
        }
        for w in workers
    ]
    return [f"workers: {counts}", *table(shown)]


def log_line(kind: str, logs: dict[str, Any]) -> dict[str, Any]:
    """A pgml.logs row as `logs` prints it: a training row as stored; a line about the job (claimed, resuming from
    step N, rows read, requeued, failed ...) with its kind first: {"kind": "info", "message": ..., ...}."""
    return logs if kind == "train" else {"kind": kind, **logs}


def cmd_logs(args: argparse.Namespace) -> int:
    """Exit status: 1 when the job failed or was cancelled (after its log rows and the reason), else 0."""
    dsn = _reading(args)

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

    return int(_run(go))


def cmd_cancel(args: argparse.Namespace) -> int:
    dsn = _reading(args)

    async def go() -> str:
        async with await db.connect(dsn) as conn:
            row = await (await conn.execute(q("cancel_job"), {"job_id": args.job})).fetchone()
            return str(row["status"]) if row else "?"

    print(f"job {args.job}: {_run(go)}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from .files import download_model

    dsn = _reading(args)
    with db.sync_connect(dsn) as conn:
        try:
            path = download_model(conn, args.model_id, Path(args.dest))
        except FileNotFoundError:
            raise CliError(_why_no_files(conn, args.model_id)) from None
    print(f"model {args.model_id} written to {path}")
    return 0


def _why_no_files(conn: psycopg.Connection[Any], model_id: int) -> str:
    """Why model `model_id` has no files to download, from its latest job."""
    job = conn.execute(q("model_latest_job"), {"model_id": model_id}).fetchone()
    if job is None:
        return (
            f"no model {model_id} (or it is another user's): a model id is pgml.jobs.model_id, "
            "shown by `pgml-tuned status`, not a job id"
        )
    if job["id"] is None:
        return f"model {model_id} has no files: no job trained it"
    if job["status"] == "failed":
        return f"model {model_id} has no files: its job {job['id']} failed: {_first_line(job['error'], 200)}"
    if job["status"] == "cancelled":
        return f"model {model_id} has no files: its job {job['id']} was cancelled"
    if job["status"] != "succeeded":
        return (
            f"model {model_id} has no files yet: its job {job['id']} is {job['status']}, not finished "
            f"(pgml-tuned logs {job['id']} --follow)"
        )
    return f"model {model_id} has no files in pgml.files (its job {job['id']} stored none)"


def cmd_dashboard(args: argparse.Namespace) -> int:
    """The read-only web page, reading as the DSN's login (the viewer's own: what it may see, nothing more)."""
    try:
        from .dashboard.server import bind, serve_dashboard
    except ImportError as e:
        raise CliError(
            f"the dashboard needs the `dashboard` extra ({e.name} is not installed): "
            "pip install 'pgml-tuned[dashboard]'"
        ) from None
    settings = _settings(args)
    logconfig.configure(settings.log_format, settings.log_level)
    dsn = _reading(args)
    sock = bind(args.host, args.port)

    def ready(url: str) -> None:
        print(f"pgml-tuned dashboard: {url}  (reading as {shown_dsn(dsn)}; Ctrl-C stops)", flush=True)

    _run(lambda: serve_dashboard(dsn, shown_dsn(dsn), sock, poll_seconds=settings.poll_seconds, on_ready=ready))
    return 0


# the tables each kind of pgml.gc row frees space in
GC_TABLES: dict[str, str | None] = {
    "model_files": "pgml.file_parts",
    "logs": "pgml.logs",
    "checkpoints": "pgml.checkpoint_files",
    "job_rows": "pgml.job_rows",
    "job_table": None,  # dropped: its space is returned at once
}
AGE_UNITS = {"m": "minutes", "min": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str) -> str:
    """--logs-older-than 30d / 12h / 2w / 90min → a PostgreSQL interval ('30 days')."""
    import re

    m = re.fullmatch(r"\s*(\d+)\s*(min|m|h|d|w)\s*", text or "")
    if not m:
        raise CliError(f"--logs-older-than {text!r}: give an age such as 30d, 12h, 2w or 90min", 2)
    return f"{m.group(1)} {AGE_UNITS[m.group(2)]}"


def human_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"


def cmd_gc(args: argparse.Namespace) -> int:
    """What old jobs hold (pgml.gc, an administrator's function): a table of it; --apply frees it."""
    if args.keep_last < 1:
        raise CliError(f"--keep-last {args.keep_last}: keep at least 1 model per project", 2)
    age = parse_age(args.logs_older_than) if args.logs_older_than else None
    dsn = resolve_dsn(_settings(args), announce=False, role="admin", check="schema", setup=False)
    with db.sync_connect(dsn) as conn:
        try:
            rows = conn.execute(
                q("gc"),
                {
                    "keep_last": args.keep_last,
                    "logs_older_than": age,
                    "include_kept": args.include_kept,
                    "apply": args.apply,
                },
            ).fetchall()
        except psycopg.errors.InsufficientPrivilege as e:
            if "function gc" not in str(e) and "pgml_admin" not in str(e):
                raise
            raise CliError(
                f"gc frees what every user's jobs left: it needs an administrator's login (a member of pgml_admin), "
                f"and {shown_dsn(dsn)} is not one; run it with such a --dsn (GRANT pgml_admin TO <login>)"
            ) from None
        conn.commit()
    header = ("kind", "project", "job", "model", "items", "size", "why")
    table = [
        (
            r["kind"],
            r["project"] or "-",
            str(r["job_id"] or "-"),
            str(r["model_id"] or "-"),
            str(r["items"]),
            human_bytes(int(r["bytes"])),
            r["note"],
        )
        for r in rows
    ]
    if not table:
        print("nothing to free: no unused model files, old logs or leftovers of ended jobs")
        return 0
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    total = sum(int(r["bytes"]) for r in rows)
    tables = sorted({t for r in rows if (t := GC_TABLES.get(r["kind"]))})
    if args.apply:
        print(f"\nfreed {human_bytes(total)} in {len(rows)} rows above.")
        if tables:
            print(
                "The space is reusable by new rows now; it returns to the operating system only after VACUUM FULL "
                "(which locks each table while it rewrites it), e.g.:\n"
                f"  psql -c 'VACUUM (FULL, ANALYZE) {', '.join(tables)}'"
            )
    else:
        print(f"\nwould free {human_bytes(total)} (dry run: nothing was deleted; --apply deletes it)")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.action == "stop":
        print("stopped" if embedded.stop(settings.home) else "not running")
    elif args.action == "dsn":
        print(resolve_dsn(settings, announce=False))
    else:
        dsn = resolve_dsn(settings, announce=False)
        print(f"{embedded.psql_path()} '{dsn}'")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    add_setting_flags(common, COMMON_SETTINGS)

    p = argparse.ArgumentParser(prog="pgml-tuned", description=__doc__)
    p.add_argument("--version", action="version", version=f"pgml-tuned {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("migrate", parents=[common], help="install/upgrade the pgml schema (idempotent)").set_defaults(
        fn=cmd_migrate
    )

    s = sub.add_parser("serve", parents=[common], help="run the training daemon")
    s.add_argument("--drain", action="store_true", help="run queued jobs, exit 0 when the queue is empty")
    add_setting_flags(s, tuple(f.name for f in fields(Settings) if f.name not in COMMON_SETTINGS))
    s.add_argument(
        "--migrate",
        action="store_true",
        help="apply pending migrations first (needs an administrator's DSN; workers normally run with the "
        "pgml_worker role, and an administrator runs `pgml-tuned migrate`)",
    )
    s.set_defaults(fn=cmd_serve)

    d = sub.add_parser("demo", parents=[common], help="end-to-end fine-tune on bundled data, offline")
    d.add_argument("--epochs", type=float, default=3.0, help="training epochs of the demo's fine-tune (default 3)")
    d.set_defaults(fn=cmd_demo)

    st = sub.add_parser("status", parents=[common], help="queue summary and recent jobs, or one job")
    st.add_argument("job", type=int, nargs="?", help="a job id: print that job's whole row as JSON")
    st.add_argument("--limit", type=int, default=20, help="show at most this many of the latest jobs (default 20)")
    st.add_argument(
        "--json", action="store_true", help="print the queue summary and the jobs as JSON (intervals in seconds)"
    )
    st.set_defaults(fn=cmd_status)

    lg = sub.add_parser(
        "logs",
        parents=[common],
        help='print a job\'s log rows (JSON lines: training rows, and its info/warning/error lines with a "kind" '
        'and a "message"); exit 1 if it failed or was cancelled',
    )
    lg.add_argument("job", type=int, help="the job id (pgml.tune's job_id)")
    lg.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="keep printing until the job ends, with its live progress line and final line (model id, download "
        "command) on stderr",
    )
    lg.set_defaults(fn=cmd_logs)

    w = sub.add_parser(
        "wait",
        parents=[common],
        help="follow jobs to their end with a live progress line each (step, %%, ETA, loss, eval metrics), then "
        "their metrics, model id and download command; exit 1 if one failed or was cancelled",
    )
    w.add_argument("jobs", type=int, nargs="+", metavar="job", help="the job ids (pgml.tune's job_id)")
    w.add_argument(
        "--interval",
        type=float,
        default=10.0,
        help="when stdout is not a terminal: print a job's progress line at most this often, in seconds (default 10)",
    )
    w.set_defaults(fn=cmd_wait)

    c = sub.add_parser("cancel", parents=[common], help="cancel a queued or running job")
    c.add_argument("job", type=int, help="the job id (pgml.tune's job_id)")
    c.set_defaults(fn=cmd_cancel)

    dl = sub.add_parser("download", parents=[common], help="reassemble a model's files from pgml.files")
    dl.add_argument("model_id", type=int, help="the model id (pgml.jobs.model_id, `pgml-tuned status`), not a job id")
    dl.add_argument("dest", help="directory to write the model's files into (created if missing)")
    dl.set_defaults(fn=cmd_download)

    dash = sub.add_parser(
        "dashboard",
        parents=[common],
        help="a read-only web page: jobs, live loss/eval curves, two models side by side, a model's files",
    )
    dash.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    dash.add_argument("--port", type=int, default=8765, help="port to listen on (default 8765; 0: any free port)")
    dash.set_defaults(fn=cmd_dashboard)

    k = sub.add_parser(
        "keys",
        parents=[common],
        help="sealing keys of inline tokens (administrators): generate --out FILE, register FILE, list, "
        "activate KEY_ID, retire KEY_ID",
    )
    k.add_argument(
        "action", choices=["generate", "register", "list", "activate", "retire"], help="what to do with the keys"
    )
    k.add_argument("file", nargs="?", help="register: the private key file; activate/retire: the key id")
    k.add_argument("--out", help="generate: the new private key file (never overwritten)")
    k.add_argument("--bits", type=int, default=3072, help="generate: RSA key size (default 3072)")
    k.add_argument("--no-activate", action="store_true", help="register: do not make it the sealing key yet")
    k.set_defaults(fn=cmd_keys)

    g = sub.add_parser(
        "gc",
        parents=[common],
        help="show (and with --apply free) what old jobs hold: unused model files, old log rows, leftovers of "
        "ended jobs (administrators)",
        description="Lists what pgml.gc would free, as an administrator's login (a member of pgml_admin). Model "
        "files: a project keeps its deployed model, its best model (the deployment metric), its --keep-last newest "
        "successful models and every model another one is based on or a queued job starts from; the files of its "
        "other models are freed (their rows, metrics and logs stay). Log rows: older than --logs-older-than. Ended "
        "jobs: checkpoints and the copy of the training rows (those kept by materialize_snapshot only with "
        "--include-kept). Dry run unless --apply.",
    )
    g.add_argument("--apply", action="store_true", help="delete what is listed (default: only list it)")
    g.add_argument(
        "--keep-last", type=int, default=1, help="successful models to keep per project, newest first (default 1)"
    )
    g.add_argument("--logs-older-than", metavar="AGE", help="also free log rows older than AGE (30d, 12h, 2w, 90min)")
    g.add_argument(
        "--include-kept",
        action="store_true",
        help="also free checkpoints and training rows that tune(materialize_snapshot => true) kept",
    )
    g.set_defaults(fn=cmd_gc)

    e = sub.add_parser("db", parents=[common], help="the embedded PostgreSQL: psql command, dsn, stop")
    e.add_argument(
        "action",
        choices=["psql", "dsn", "stop"],
        help="psql: print the command that connects to it; dsn: print its DSN; stop: stop the server",
    )
    e.set_defaults(fn=cmd_db)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user's error is one line on stderr, never a traceback: exit 2 for a wrong invocation
    or an unreachable database, 1 for what the database refused and for failed jobs."""
    args = build_parser().parse_args(argv)
    try:
        code = int(args.fn(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:
        # `pgml-tuned status | head`: the reader has what it wanted; exit quietly like `git log | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a process killed by it
    except CliError as e:
        print(f"pgml-tuned: {e}", file=sys.stderr)
        return e.code
    except ValueError as e:
        print(f"pgml-tuned: {e}", file=sys.stderr)
        return 2
    except psycopg.OperationalError as e:
        print(f"pgml-tuned: lost the connection to the database: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction, psycopg.errors.UndefinedColumn) as e:
        # a pgml schema older than this pgml-tuned (the commands check that there is one at all)
        print(
            f"pgml-tuned: {e.diag.message_primary or e}: the pgml schema is older than pgml-tuned {__version__}; "
            "an administrator upgrades it with `pgml-tuned migrate`",
            file=sys.stderr,
        )
        return 2
    except psycopg.Error as e:
        hint = e.diag.message_hint
        print(f"pgml-tuned: {e.diag.message_primary or e}" + (f"\n  HINT: {hint}" if hint else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
