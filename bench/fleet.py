"""A fleet of N idle workers on one PostgreSQL under a stream of short jobs: the NOTIFY herd, before and after.

    python bench/fleet.py [--dsn DSN] [--workers 10,100,1000] [--rate 20] [--window 20]
                          [--modes before,after] [--json out.json]

Without --dsn it uses the embedded PostgreSQL under .pgml-bench/ (database CPU is read from /proc, so the server
must run on this machine). Each (N, mode) runs in a fresh migrated database:

- N simulated workers in this process: each is the real worker.daemon.Daemon (listener dispatch, claimer, poller
  with reap, lease and registry heartbeats, drain logic) over the real named queries (PgBackend), concurrency 1,
  default settings. What is simulated: (1) the child: a job "runs" by calling the same ticketed
  pgml._child_files_begin / pgml._child_succeed a noop child calls at its end (no process, seconds = 0);
  (2) connections: all workers share one LISTEN connection (each NOTIFY is handed to every worker's dispatch, as
  each daemon's own LISTEN connection would) and one pool of --pool connections. A real fleet of N holds N LISTEN
  connections plus a pool each; the statements, rows and WAL are the same, the server's per-listener NOTIFY
  delivery (a signal and a queue read per listening backend) is not in these figures, and at most --pool
  statements run at once (a herd queues in the pool rather than in the server).
- mode before: claim_spread 0 (every notified worker claims; each polls every poll_seconds) — the old daemon;
  after: the default claim_spread (about that many claims race per NOTIFY, the fleet's polls spread out).
- After all N registered, each worker re-reads the fleet's size once (as it does about every 10 heartbeats), the
  fleet settles for --settle s, then noop jobs are submitted (as the admin: noop is admin-only) at --rate per
  second for --window s.

Reported per (N, mode): pickup p50/p99 (job_events: queued → running, server clock), jobs/s, claim statements
per job (claims the workers ran / jobs), statements/s (pg_stat_database xact_commit + xact_rollback: every worker
statement is its own transaction), WAL bytes/s (pg_current_wal_lsn), database CPU in cores (utime + stime of the
postmaster and its children, /proc), and this process's CPU (the simulated fleet's client side).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import psycopg
from common import admin_dsn, fresh_database, machine_busy_seconds, main_with_json, percentile
from psycopg.types.json import Jsonb

from pgml_tuned import logconfig
from pgml_tuned.config import Settings
from pgml_tuned.db import Pool, connect, q, queries
from pgml_tuned.worker.backend import JOBS_CHANNEL, Notice, parse_notice
from pgml_tuned.worker.daemon import Daemon
from pgml_tuned.worker.pg import PgBackend

TUNE = "SELECT job_id FROM pgml.tune('fleet', task => 'noop', model_name => 'none', hyperparams => '{\"seconds\": 0}')"
TICK = os.sysconf("SC_CLK_TCK")


class CountingPool(Pool):
    """The fleet's shared pool, counting the statements it runs by their name in sql/queries.sql."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.names = {text: name for name, text in queries().items()}
        self.counts: dict[str, int] = {}

    async def fetch(self, query: str, params: dict[str, Any] | None = None, *, retry: bool = True) -> list[Any]:
        name = self.names.get(query, "other")
        self.counts[name] = self.counts.get(name, 0) + 1
        return await super().fetch(query, params, retry=retry)


class SimBackend(PgBackend):
    """PgBackend over a shared pool; its notices come from the shared listener (Fleet.listen)."""

    async def prepare(self) -> None:
        pass

    async def notices(self) -> AsyncIterator[Notice]:
        await anyio.sleep_forever()
        yield Notice("listening")  # never reached

    async def close(self) -> None:
        pass


class SimChild:
    """A noop child that ends at once: its final transaction's statements, with the attempt's ticket."""

    error: str | None = None
    lease_lost_reported = False

    def __init__(self, pool: Pool, payload: dict[str, Any]) -> None:
        self.pool, self.id, self.ticket = pool, payload["spec"]["id"], payload["ticket"]

    async def run(self, on_event: Any) -> int:
        params = {"id": self.id, "ticket": self.ticket}
        await self.pool.fetch(q("child_files_begin"), params)
        await self.pool.fetch(q("child_succeed"), {**params, "metrics": Jsonb({}), "base_model": None})
        return 0

    def terminate(self) -> None:
        pass

    def kill(self) -> None:
        pass

    def describe_exit(self, rc: int) -> str:
        return f"exited with {rc}"


def server_cpu_seconds(pid: int) -> float:
    """utime + stime of the postmaster `pid` and its children."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            total += int(fields[11]) + int(fields[12])
    return total / TICK


def process_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def counters(conn: psycopg.Connection[Any], pid: int) -> dict[str, float]:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute(
        "SELECT xact_commit + xact_rollback, pg_current_wal_lsn() - '0/0'::pg_lsn FROM pg_stat_database "
        "WHERE datname = current_database()"
    ).fetchone()
    assert row is not None
    return {"xacts": float(row[0]), "wal": float(row[1]), "cpu": server_cpu_seconds(pid), "at": time.monotonic()}


async def run_fleet(dsn: str, home: Path, n: int, spread: int, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    """One fleet of `n` workers (claim_spread `spread`) on the server whose postmaster is `pid`."""
    pool = CountingPool(dsn, "pgml-tuned bench fleet", max_size=args.pool)
    daemons: list[Daemon] = []
    for i in range(n):
        settings = Settings(home=home, worker_id=f"sim-{i}", concurrency=1, serving=False, claim_spread=spread)
        backend = SimBackend(settings, dsn)
        backend.pool = pool

        async def launch(payload: dict[str, Any], env: dict[str, str]) -> SimChild:
            return SimChild(pool, payload)

        daemons.append(Daemon(settings, backend, launch, dsn=dsn))
    async with anyio.create_task_group() as tg:
        listen = await connect(dsn, app="pgml-tuned bench fleet listen")
        await listen.execute(f"LISTEN {JOBS_CHANNEL}")

        async def fan_out() -> None:
            async for note in listen.notifies():
                notice = parse_notice(note.channel, note.payload)
                if notice is not None:
                    for d in daemons:
                        d.dispatch(notice)

        tg.start_soon(fan_out)
        stalls: list[float] = []

        async def watch_loop() -> None:  # the simulation's own fidelity: 1000 daemons share one event loop
            while True:
                t0 = time.monotonic()
                await anyio.sleep(0.01)
                late = time.monotonic() - t0 - 0.01
                if late > 0.05:
                    stalls.append(late)

        tg.start_soon(watch_loop)
        for d in daemons:
            tg.start_soon(d.serve)
        while not all(d.fleet.registered for d in daemons):  # noqa: ASYNC110 (a benchmark watching N daemons)
            await anyio.sleep(0.2)
        await anyio.sleep(args.settle)  # every registry row has had a heartbeat with its free slots
        for d in daemons:
            d.fleet.read_at = 0  # re-read the fleet's size at the next poll (a fleet up for a minute has)
            d.dispatch(Notice("listening"))
        await anyio.sleep(args.settle)
        with psycopg.connect(dsn, autocommit=True) as conn:
            i0, n0 = counters(conn, pid), dict(pool.counts)
            await anyio.sleep(args.idle)  # the fleet's floor: heartbeats, polls, reaps
            i1, n1 = counters(conn, pid), dict(pool.counts)
            cpu0, wall0, busy0 = time.process_time(), time.monotonic(), machine_busy_seconds()
            stalls.clear()
            first = conn.execute("SELECT coalesce(max(id), 0) FROM pgml.jobs").fetchone()[0]  # type: ignore[index]
            async with await connect(dsn, app="pgml-tuned bench submit") as submit:
                submitter = submit.info.backend_pid
                submit_cpu = process_cpu_seconds(submitter)
                jobs = int(args.rate * args.window)
                for k in range(jobs):
                    await anyio.sleep(max(0.0, wall0 + k / args.rate - time.monotonic()))
                    await submit.execute(TUNE)
                submit_cpu = process_cpu_seconds(submitter) - submit_cpu
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                left = conn.execute(
                    "SELECT count(*) FROM pgml.jobs WHERE id > %s AND status <> 'succeeded'", (first,)
                ).fetchone()[0]  # type: ignore[index]
                if not left:
                    break
                await anyio.sleep(0.1)
            await anyio.sleep(1.0)  # backends report their statements when idle
            b, nb = counters(conn, pid), dict(pool.counts)
            client_cpu, machine = time.process_time() - cpu0, machine_busy_seconds() - busy0
            busy_stalls = list(stalls)
            pickups = [
                r[0]
                for r in conn.execute(
                    "SELECT extract(epoch FROM min(e.at) FILTER (WHERE e.new_status = 'running') "
                    "- min(e.at) FILTER (WHERE e.new_status = 'queued'))::float8 FROM pgml.job_events e "
                    "WHERE e.job_id > %s GROUP BY e.job_id",
                    (first,),
                )
                if r[0] is not None
            ]
        tg.cancel_scope.cancel()
    await listen.close()
    await pool.close()
    idle_span, span = i1["at"] - i0["at"], b["at"] - i1["at"]
    done = max(1, len(pickups))

    def idle_rate(key: str) -> float:
        return (i1[key] - i0[key]) / idle_span

    def per_job(key: str) -> float:  # what the jobs added to the fleet's floor, per job
        return (b[key] - i1[key] - idle_rate(key) * span) / done

    def by_name(x: dict[str, int], y: dict[str, int], seconds: float) -> dict[str, float]:
        return {k: round((y.get(k, 0) - x.get(k, 0)) / seconds, 1) for k in sorted(y) if y.get(k, 0) > x.get(k, 0)}

    return {
        "workers": n,
        "claim_spread": spread,
        "jobs": jobs,
        "picked_up": len(pickups),
        "pickup_p50_ms": percentile(pickups, 50) * 1e3 if pickups else None,
        "pickup_p99_ms": percentile(pickups, 99) * 1e3 if pickups else None,
        "pickup_max_ms": max(pickups) * 1e3 if pickups else None,
        "pickups_over_100ms": sum(p > 0.1 for p in pickups),
        "pickups_over_1s": sum(p > 1.0 for p in pickups),
        # the simulating process's event loop late by > 50 ms (all 1000 daemons wait meanwhile: not a real fleet's)
        "client_stalls": len(busy_stalls),
        "client_stall_max_ms": max(busy_stalls, default=0.0) * 1e3,
        "idle": {
            "statements_per_s": idle_rate("xacts"),
            "wal_bytes_per_s": idle_rate("wal"),
            "db_cpu_cores": idle_rate("cpu"),
            "by_name_per_s": by_name(n0, n1, idle_span),
        },
        "busy": {
            "seconds": span,
            "jobs_per_s": len(pickups) / span,
            "claims_per_s": (nb.get("claim_job", 0) - n1.get("claim_job", 0)) / span,
            "statements_per_s": (b["xacts"] - i1["xacts"]) / span,
            "wal_bytes_per_s": (b["wal"] - i1["wal"]) / span,
            "db_cpu_cores": (b["cpu"] - i1["cpu"]) / span,
            "submit_cpu_cores": submit_cpu / span,  # pgml.tune() in the submitting session's backend
            "queue_cpu_cores": (b["cpu"] - i1["cpu"] - submit_cpu) / span,  # the rest: the fleet's statements
            "client_cpu_cores": client_cpu / span,
            "machine_busy_cores": machine / span,  # everything on this (shared) machine, others' work included
            "by_name_per_s": by_name(n1, nb, span),
        },
        "per_job": {
            "claims": (nb.get("claim_job", 0) - n1.get("claim_job", 0) - idle_rate_named(n0, n1, idle_span) * span)
            / done,
            "statements": per_job("xacts"),
            "wal_bytes": per_job("wal"),
            "db_cpu_ms": per_job("cpu") * 1e3,
            "queue_cpu_ms": (per_job("cpu") - submit_cpu / done) * 1e3,
        },
    }


def idle_rate_named(x: dict[str, int], y: dict[str, int], seconds: float, name: str = "claim_job") -> float:
    return (y.get(name, 0) - x.get(name, 0)) / seconds


def empty_claim_cpu_ms(dsn: str, times: int = 5000) -> float:
    """Server CPU of one claim_job that finds the queue empty (what each extra racer of a herd costs), in ms."""
    params = {"worker": "calibrate", "lease_seconds": 30, "free_gpus": 0}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(50):  # past psycopg's prepare threshold, as a daemon's claims are
            conn.execute(q("claim_job"), params)
        cpu = process_cpu_seconds(conn.info.backend_pid)
        for _ in range(times):
            conn.execute(q("claim_job"), params)
        return (process_cpu_seconds(conn.info.backend_pid) - cpu) / times * 1e3


def run(args: argparse.Namespace) -> dict[str, Any]:
    logconfig.configure("json", args.log_level)
    admin = admin_dsn(args.dsn)
    modes = {"before": 0, "after": Settings.__dataclass_fields__["claim_spread"].default}
    with psycopg.connect(admin, autocommit=True) as conn:
        row = conn.execute("SHOW data_directory").fetchone()
    assert row is not None
    pid = int((Path(row[0]) / "postmaster.pid").read_text().split()[0])
    with fresh_database(admin, "pgml_bench_fleet") as dsn:
        empty_claim = empty_claim_cpu_ms(dsn)
    print(f"one claim that finds the queue empty: {empty_claim * 1e3:.0f} us of server CPU", flush=True)
    rows = []
    for n in [int(x) for x in args.workers.split(",")]:
        for mode in args.modes.split(","):
            with fresh_database(admin, "pgml_bench_fleet") as dsn, tempfile.TemporaryDirectory() as tmp:
                row = {"mode": mode, **anyio.run(run_fleet, dsn, Path(tmp), n, modes[mode], pid, args)}
            rows.append(row)
            i, bz, j = row["idle"], row["busy"], row["per_job"]
            print(
                f"N={n:5d} {mode:6s}: pickup p50 {row['pickup_p50_ms']:.1f} ms p99 {row['pickup_p99_ms']:.1f} ms "
                f"({row['picked_up']}/{row['jobs']} jobs, {bz['jobs_per_s']:.1f}/s) | idle fleet: "
                f"{i['statements_per_s']:.0f} stmt/s, {i['wal_bytes_per_s'] / 1e3:.1f} kB WAL/s, DB CPU "
                f"{i['db_cpu_cores'] * 100:.1f} % | with jobs: {bz['claims_per_s']:.0f} claims/s, "
                f"{bz['statements_per_s']:.0f} stmt/s, {bz['wal_bytes_per_s'] / 1e3:.0f} kB WAL/s, DB CPU "
                f"{bz['db_cpu_cores'] * 100:.1f} % (queue {bz['queue_cpu_cores'] * 100:.1f} %), "
                f"client CPU {bz['client_cpu_cores'] * 100:.0f} %, machine {bz['machine_busy_cores']:.1f} cores busy | "
                f"{row['pickups_over_100ms']} pickups > 100 ms, {row['pickups_over_1s']} > 1 s (simulation's event "
                f"loop late > 50 ms {row['client_stalls']} times, at most {row['client_stall_max_ms']:.0f} ms) | "
                "per job: "
                f"{j['claims']:.1f} claims, {j['statements']:.1f} stmt, {j['wal_bytes'] / 1e3:.1f} kB WAL, "
                f"{j['db_cpu_ms']:.2f} ms DB CPU ({j['queue_cpu_ms']:.2f} ms queue)",
                flush=True,
            )
            print(f"    statements/s by name, idle: {i['by_name_per_s']}; with jobs: {bz['by_name_per_s']}", flush=True)
    return {
        "at": dt.datetime.now().isoformat(),
        "rate": args.rate,
        "window": args.window,
        "empty_claim_cpu_ms": empty_claim,
        "results": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dsn", help="a server on this machine (default: the embedded one under .pgml-bench/)")
    p.add_argument("--workers", default="10,100,1000")
    p.add_argument("--modes", default="before,after")
    p.add_argument("--rate", type=float, default=20, help="jobs submitted per second")
    p.add_argument("--window", type=float, default=20, help="seconds of submissions")
    p.add_argument("--idle", type=float, default=10, help="seconds of the idle fleet's floor")
    p.add_argument("--settle", type=float, default=6, help="seconds after registration, twice")
    p.add_argument("--pool", type=int, default=40, help="connections the simulated fleet shares")
    p.add_argument("--log-level", default="warning")
    main_with_json(p, run)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
