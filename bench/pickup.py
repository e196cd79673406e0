"""NOTIFY → claimed: how long an idle daemon takes to claim a job after the submitting transaction commits.

    python bench/pickup.py [--dsn DSN] [--jobs 200] [--warmup 10] [--profile-jobs 100] [--peers procrastinate,pgqueuer]
                           [--profile-variants baseline,inline-claim]
                           [--synchronous-commit on|off] [--json out.json] [--keep]

Without --dsn it starts (or reuses) the embedded PostgreSQL under .pgml-bench/. Either way it creates a fresh
database, migrates it (pgml_tuned.db.migrate), starts `python -m pgml_tuned.cli serve --log-format json
--poll-seconds 30` (so the fallback poll is not what picks jobs up) and stops it and drops the database at
the end.

One sample: BEGIN; SELECT pgml.tune('bench', task => 'noop', model_name => 'none'); then a client wall-clock
timestamp right before sending COMMIT. The claim time is the `at` of the job's pgml.job_events row with
new_status 'running' (clock_timestamp() in the claim's trigger; same machine, same clock). Jobs are submitted
one at a time; each is waited for (its `job.succeeded` log line) and followed by a random 20-100 ms gap, so
the daemon is idle every time.

References, measured in the same run and interleaved with the jobs (random order within each round):

- raw NOTIFY: a transaction that inserts one row (so its COMMIT flushes WAL, as tune()'s does) and
  pg_notify()s; timestamp before COMMIT → a listener process receives it. Two listeners, separate processes:
  plain psycopg (blocking `conn.notifies()`) and psycopg async under anyio/asyncio (the daemon's stack).
- NOTIFY + 1 statement: the listener then runs `SELECT clock_timestamp()` on a second connection; its server
  time is the floor for "notified, then one statement on the command connection" (what a claim is).
- COMMIT duration: COMMIT sent → acknowledged, for both kinds of transaction (WAL flush).

--profile-jobs N then runs N more jobs per variant against bench/traced_daemon.py (the same daemon with
timestamps on the listener → claimer → claim path, daemon.py unchanged) and prints where the pickup time goes.
Variants other than `baseline` prototype daemon changes by patching them in (see traced_daemon.py); each runs on
its own database with its own idle daemon, samples interleaved, so they compare side by side.

--peers procrastinate,pgqueuer adds, to every round in random order, one job of each peer queue on the same server
and database (bench/peers.py: their own schema, a worker subprocess each with a no-op task): INSERT + COMMIT →
claimed (a trigger on their job table) → body started, beside pgml-tuned's commit → claimed → the noop child's
first log row. Each system's own COMMIT duration is printed too, and the claim minus it (the disk's flush out).

--synchronous-commit off is a diagnostic only: the submitting session's COMMIT then returns (and NOTIFYs)
without waiting for its WAL flush, which shows the daemon's part without the disk's fsync latency.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import queue
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import peers
import psycopg
from common import DaemonProc, admin_dsn, bench_env, fresh_database, summary_ms

HERE = Path(__file__).resolve().parent
# steps 1: the noop recipe's body logs one row first thing, whose timestamp is when the body started
TUNE = "SELECT job_id FROM pgml.tune('bench', task => 'noop', model_name => 'none', hyperparams => '{\"steps\": 1}')"
P50_TARGET_MS, P99_TARGET_MS = 2.0, 5.0


# ---- the reference listeners (run as `pickup.py --listener sync|async`) ----


def listener_main(kind: str, dsn: str, channel: str) -> int:
    if kind == "sync":
        with psycopg.connect(dsn, autocommit=True) as conn, psycopg.connect(dsn, autocommit=True) as cmd:
            conn.execute(f"LISTEN {channel}")
            for _ in range(10):  # past psycopg's prepare threshold, as the daemon's claim is
                cmd.execute("SELECT clock_timestamp()")
            print("ready", flush=True)
            for note in conn.notifies():
                t_recv = time.time()
                row = cmd.execute("SELECT clock_timestamp()").fetchone()
                assert row is not None
                print(json.dumps({"payload": note.payload, "t_recv": t_recv, "t_stmt": row[0].timestamp()}), flush=True)
                if note.payload == "stop":
                    return 0
        return 0

    import anyio

    async def run() -> None:
        from pgml_tuned.db import connect

        conn = await connect(dsn, app="bench listen")
        cmd = await connect(dsn, app="bench cmd")
        async with conn, cmd:
            await conn.execute(f"LISTEN {channel}")
            for _ in range(10):
                await cmd.execute("SELECT clock_timestamp() AS t")
            print("ready", flush=True)
            async for note in conn.notifies():
                t_recv = time.time()
                row = await (await cmd.execute("SELECT clock_timestamp() AS t")).fetchone()
                assert row is not None
                print(
                    json.dumps({"payload": note.payload, "t_recv": t_recv, "t_stmt": row["t"].timestamp()}), flush=True
                )
                if note.payload == "stop":
                    return

    anyio.run(run, backend="asyncio")
    return 0


class LineProc:
    """A subprocess that prints "ready", then one JSON object a line; `get()` returns the next one."""

    def __init__(self, kind: str, argv: list[str], env: dict[str, str]) -> None:
        self.kind = kind
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        if self.lines.get(timeout=60) != "ready":
            raise RuntimeError(f"{kind} did not start")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def get(self, timeout: float = 10) -> dict[str, Any]:
        return json.loads(self.lines.get(timeout=timeout))


class Listener(LineProc):
    """A reference listener subprocess; `get()` returns its next received notification."""

    def __init__(self, kind: str, dsn: str, channel: str, env: dict[str, str]) -> None:
        self.channel = channel
        super().__init__(kind, [sys.executable, __file__, "--listener", kind, "--dsn", dsn, "--channel", channel], env)

    def stop(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT pg_notify(%s, 'stop')", (self.channel,))
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait()


# ---- samples ----


def sample_job(conn: psycopg.Connection[Any], daemon: DaemonProc) -> dict[str, float]:
    conn.execute("BEGIN")
    row = conn.execute(TUNE).fetchone()
    assert row is not None
    job_id = int(row[0])
    t_commit = time.time()
    conn.execute("COMMIT")
    t_ack = time.time()
    done = daemon.wait_event(
        lambda e: e.get("job_id") == job_id and e.get("event") in ("job.succeeded", "job.failed"), 60
    )
    if done["event"] != "job.succeeded":
        raise RuntimeError(f"job {job_id} failed: {done}")
    at = conn.execute(
        "SELECT at FROM pgml.job_events WHERE job_id = %s AND new_status = 'running' ORDER BY id LIMIT 1", (job_id,)
    ).fetchone()
    body = conn.execute(
        "SELECT logs ->> 'timestamp' FROM pgml.logs WHERE job_id = %s AND logs ? 'timestamp' ORDER BY id LIMIT 1",
        (job_id,),
    ).fetchone()
    assert at is not None and body is not None
    return {
        "job_id": job_id,
        "t_commit": t_commit,
        "commit": t_ack - t_commit,
        "claimed": at[0].timestamp(),
        "pickup": at[0].timestamp() - t_commit,
        # the child's local wall clock (dt.datetime.now()), same machine
        "body": dt.datetime.fromisoformat(body[0]).timestamp() - t_commit,
    }


def start_peer(system: str, dsn: str, env: dict[str, str]) -> LineProc:
    peers.install(dsn, system)
    w = LineProc(system, [sys.executable, str(HERE / "peers.py"), system, dsn], env)
    time.sleep(1.0)  # listening, idle
    return w


def sample_peer(conn: psycopg.Connection[Any], worker: LineProc) -> dict[str, float]:
    """One job of a peer queue: INSERT + COMMIT (timestamp before COMMIT) → claimed (trigger) → body started."""
    conn.execute("BEGIN")
    row = conn.execute(peers.TABLES[worker.kind][2]).fetchone()
    assert row is not None
    job_id = int(row[0])
    t_commit = time.time()
    conn.execute("COMMIT")
    t_ack = time.time()
    got = worker.get(timeout=60)
    if got["id"] != job_id:
        raise RuntimeError(f"{worker.kind} ran job {got['id']}, expected {job_id}")
    at = conn.execute(
        "SELECT at FROM bench_claims WHERE system = %s AND job_id = %s ORDER BY at LIMIT 1", (worker.kind, job_id)
    ).fetchone()
    assert at is not None, f"{worker.kind} job {job_id}: no claim mark"
    return {"commit": t_ack - t_commit, "pickup": at[0].timestamp() - t_commit, "body": got["t_body"] - t_commit}


def sample_raw(conn: psycopg.Connection[Any], listener: Listener, n: int) -> dict[str, float]:
    conn.execute("BEGIN")
    conn.execute("INSERT INTO bench_notify_ref (n) VALUES (%s)", (n,))
    conn.execute("SELECT pg_notify(%s, %s)", (listener.channel, str(n)))
    t_commit = time.time()
    conn.execute("COMMIT")
    t_ack = time.time()
    got = listener.get()
    if got["payload"] != str(n):
        raise RuntimeError(f"{listener.kind} listener got {got} for {n}")
    return {"commit": t_ack - t_commit, "recv": got["t_recv"] - t_commit, "stmt": got["t_stmt"] - t_commit}


def gap() -> None:
    time.sleep(random.uniform(0.02, 0.10))


def start_daemon(dsn: str, home: Path, traced: bool, env: dict[str, str] | None = None) -> DaemonProc:
    argv0 = [sys.executable, str(HERE / "traced_daemon.py")] if traced else None
    d = DaemonProc(dsn, home, "--poll-seconds", "30", argv0=argv0, env=env)
    d.wait_event(lambda e: e.get("event") == "daemon.start", 60)
    time.sleep(1.0)  # listening, idle
    return d


def fmt(name: str, s: dict[str, float]) -> str:
    return (
        f"  {name:<54} p50 {s['p50']:7.3f}  p90 {s['p90']:7.3f}  p99 {s['p99']:7.3f}  max {s['max']:7.3f}  "
        f"mean {s['mean']:7.3f}  (n={s['n']})"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    admin = admin_dsn(args.dsn)
    home = Path(tempfile.mkdtemp(prefix="pgml-bench-pickup-"))
    env = bench_env(home)
    results: dict[str, Any] = {"home": str(home)}
    with fresh_database(admin, "pgml_bench_pickup") as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE bench_notify_ref (n int, at timestamptz DEFAULT clock_timestamp())")
        if args.synchronous_commit != "on":  # diagnostic: the submitting session's COMMIT skips the WAL flush wait
            conn.execute(f"SET synchronous_commit = {args.synchronous_commit}")
        results["synchronous_commit"] = args.synchronous_commit
        listeners = [Listener("sync", dsn, "bench_raw_sync", env), Listener("async", dsn, "bench_raw_async", env)]
        daemon = start_daemon(dsn, home, traced=False)
        workers = [start_peer(p, dsn, env) for p in args.peers]
        jobs: list[dict[str, float]] = []
        raw: dict[str, list[dict[str, float]]] = {"sync": [], "async": []}
        peer_jobs: dict[str, list[dict[str, float]]] = {p: [] for p in args.peers}
        try:
            for i in range(args.warmup + args.jobs):
                steps: list[Any] = [("job", None), *(("raw", ls) for ls in listeners), *(("peer", w) for w in workers)]
                random.shuffle(steps)
                for kind, ls in steps:
                    if kind == "job":
                        s = sample_job(conn, daemon)
                        if i >= args.warmup:
                            jobs.append(s)
                    elif kind == "peer":
                        s = sample_peer(conn, ls)
                        if i >= args.warmup:
                            peer_jobs[ls.kind].append(s)
                    else:
                        r = sample_raw(conn, ls, i)
                        if i >= args.warmup:
                            raw[ls.kind].append(r)
                    gap()
                if (i + 1) % 50 == 0:
                    print(f"  ... {i + 1}/{args.warmup + args.jobs} rounds", file=sys.stderr, flush=True)
        finally:
            rc = daemon.stop()
            for ls in listeners:
                ls.stop(conn)
            for w in workers:
                w.proc.kill()  # no graceful shutdown to wait for: the database is dropped next
                w.proc.wait(30)
        if rc != 0:
            raise RuntimeError(f"daemon exited with {rc}; log {daemon.log_path}")

        stats = {
            "pickup": summary_ms([s["pickup"] for s in jobs]),
            "raw_sync": summary_ms([r["recv"] for r in raw["sync"]]),
            "raw_async": summary_ms([r["recv"] for r in raw["async"]]),
            "raw_sync_stmt": summary_ms([r["stmt"] for r in raw["sync"]]),
            "raw_async_stmt": summary_ms([r["stmt"] for r in raw["async"]]),
            "commit_tune": summary_ms([s["commit"] for s in jobs]),
            "commit_ref": summary_ms([r["commit"] for r in raw["sync"] + raw["async"]]),
        }
        results["stats"] = stats
        results["systems"] = {
            name: {
                "claim": summary_ms([s["pickup"] for s in v]),
                "body": summary_ms([s["body"] for s in v]),
                "commit": summary_ms([s["commit"] for s in v]),
                # the WAL flush of the submitter's own COMMIT taken out (a slow disk hits every system alike)
                "claim_after_ack": summary_ms([s["pickup"] - s["commit"] for s in v]),
            }
            for name, v in {"pgml-tuned": jobs, **peer_jobs}.items()
        }
        # the claim happens after the commit is acknowledged? (a NOTIFY is delivered after the WAL flush)
        results["pickup_after_ack"] = summary_ms([s["pickup"] - s["commit"] for s in jobs])
        results["raw_sync_after_ack"] = summary_ms([r["recv"] - r["commit"] for r in raw["sync"]])

    if args.profile_jobs:
        variants = [v.strip() for v in args.profile_variants.split(",") if v.strip()]
        results["profile"] = profile(admin, home, env, variants, args.profile_jobs, args.synchronous_commit)
    return results


def profile(
    admin: str, home: Path, env: dict[str, str], variants: list[str], n: int, sync_commit: str
) -> dict[str, Any]:
    """Pickups against traced daemons, one per variant (each on its own database, all idle, samples
    interleaved in random order): each pickup split into phases on one clock."""
    rows: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    with contextlib.ExitStack() as stack:
        setups = []
        for v in variants:
            dsn = stack.enter_context(fresh_database(admin, "pgml_bench_pickup_prof"))
            conn = stack.enter_context(psycopg.connect(dsn, autocommit=True))
            if sync_commit != "on":
                conn.execute(f"SET synchronous_commit = {sync_commit}")
            venv = {**env, "PGML_BENCH_VARIANT": "" if v == "baseline" else v.replace("+", ",")}
            daemon = start_daemon(dsn, home, traced=True, env=venv)
            stack.callback(daemon.stop)
            setups.append((v, conn, daemon))
        for i in range(10 + n):
            random.shuffle(setups)
            for v, conn, daemon in setups:
                s = sample_job(conn, daemon)
                tr = daemon.wait_event(
                    lambda e, j=s["job_id"]: e.get("event") == "trace.claim" and e.get("job_id") == j, 10
                )
                if i >= 10:
                    rows[v].append({**s, **{k: x for k, x in tr.items() if k.startswith("t_")}})
                gap()
    out: dict[str, Any] = {}
    for v, rs in rows.items():
        phases = {
            "commit sent → daemon listener has the notify": [r["t_notify"] - r["t_commit"] for r in rs],
            "  (COMMIT sent → acknowledged, client)": [r["commit"] for r in rs],
            "listener has the notify → claim() called": [r["t_claim_call"] - r["t_notify"] for r in rs],
            "claim() called → Db lock held (statement sent)": [r["t_locked"] - r["t_claim_call"] for r in rs],
            "statement sent → claim's trigger runs (server)": [r["claimed"] - r["t_locked"] for r in rs],
            "total: commit sent → claimed": [r["pickup"] for r in rs],
            "daemon's part: listener has the notify → claimed": [r["claimed"] - r["t_notify"] for r in rs],
            "(after: trigger → claim() returns, incl. its commit)": [r["t_claim_return"] - r["claimed"] for r in rs],
        }
        out[v] = {name: summary_ms(x) for name, x in phases.items()}
    return out


def report(results: dict[str, Any]) -> None:
    st = results["stats"]
    print("\nNOTIFY → claimed, idle daemon (milliseconds; timestamp before COMMIT → job_events 'running'.at)")
    if results["synchronous_commit"] != "on":
        print(f"DIAGNOSTIC RUN: the submitting session has synchronous_commit = {results['synchronous_commit']}")
    print(fmt("pgml-tuned pickup (commit → claimed)", st["pickup"]))
    print("reference, same run, interleaved:")
    print(fmt("raw NOTIFY → psycopg sync listener", st["raw_sync"]))
    print(fmt("raw NOTIFY → psycopg async listener (anyio)", st["raw_async"]))
    print(fmt("raw NOTIFY + 1 statement (sync listener)", st["raw_sync_stmt"]))
    print(fmt("raw NOTIFY + 1 statement (async listener)", st["raw_async_stmt"]))
    print(fmt("COMMIT sent → acknowledged, tune() txn", st["commit_tune"]))
    print(fmt("COMMIT sent → acknowledged, reference txn", st["commit_ref"]))
    print(fmt("pickup minus its own COMMIT duration", results["pickup_after_ack"]))
    print(fmt("raw sync minus its own COMMIT duration", results["raw_sync_after_ack"]))
    p, r, ra, rs = st["pickup"], st["raw_sync"], st["raw_async"], st["raw_async_stmt"]
    print("ratios (pickup / reference):")
    for name, ref in (
        ("raw NOTIFY, sync listener", r),
        ("raw NOTIFY, async listener", ra),
        ("raw NOTIFY + 1 statement, async", rs),
    ):
        print(f"  {name:<54} p50 {p['p50'] / ref['p50']:5.2f}x  p99 {p['p99'] / ref['p99']:5.2f}x")
    ok50, ok99 = p["p50"] <= P50_TARGET_MS, p["p99"] <= P99_TARGET_MS
    print(
        f"target p50 ≤ {P50_TARGET_MS} ms: {'met' if ok50 else 'MISSED'} ({p['p50']:.3f} ms); "
        f"p99 ≤ {P99_TARGET_MS} ms: {'met' if ok99 else 'MISSED'} ({p['p99']:.3f} ms)"
    )
    systems = results["systems"]
    if len(systems) > 1:
        print("\nside by side, same server, alternating (ms from the timestamp before COMMIT; no-op body):")
        ours = systems["pgml-tuned"]
        for name, s in systems.items():
            print(fmt(f"{name}: → job owned (claim)", s["claim"]))
            print(fmt(f"{name}: → job body started", s["body"]))
            print(fmt(f"{name}: its COMMIT sent → acknowledged", s["commit"]))
            print(fmt(f"{name}: claim minus its own COMMIT", s["claim_after_ack"]))
        for name, s in systems.items():
            if name != "pgml-tuned":
                c, b = ours["claim"], s["claim"]
                print(
                    f"  pgml-tuned / {name}: claim p50 {c['p50'] / b['p50']:.2f}x p99 {c['p99'] / b['p99']:.2f}x; "
                    f"body p50 {ours['body']['p50'] / s['body']['p50']:.2f}x "
                    f"p99 {ours['body']['p99'] / s['body']['p99']:.2f}x"
                )
    for variant, phases in results.get("profile", {}).items():
        print(f"\nwhere the pickup time goes: traced daemon (bench/traced_daemon.py), variant {variant} (ms):")
        for name, s in phases.items():
            print(fmt(name, s))
    prof = results.get("profile", {})
    if "baseline" in prof and len(prof) > 1:
        print("\nvariants vs baseline (same run, interleaved; ms):")
        for key in ("daemon's part: listener has the notify → claimed", "total: commit sent → claimed"):
            base = prof["baseline"][key]
            print(f"  {key}")
            for variant, phases in prof.items():
                t = phases[key]
                print(
                    f"    {variant:<26} p50 {t['p50']:7.3f} ({t['p50'] - base['p50']:+.3f})  "
                    f"p90 {t['p90']:7.3f} ({t['p90'] - base['p90']:+.3f})  "
                    f"p99 {t['p99']:7.3f} ({t['p99'] - base['p99']:+.3f})"
                )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", help="a server to create the bench database on (default: embedded, .pgml-bench/)")
    ap.add_argument("--jobs", type=int, default=200, help="measured jobs (default 200)")
    ap.add_argument("--warmup", type=int, default=10, help="unmeasured rounds first (default 10)")
    ap.add_argument(
        "--profile-jobs",
        type=int,
        default=100,
        help="jobs per variant against traced daemons afterwards, for the phase breakdown (0: skip)",
    )
    ap.add_argument(
        "--profile-variants",
        default="baseline",
        help="comma-separated: baseline, inline-claim "
        "(prototypes of daemon changes, see bench/traced_daemon.py; default baseline)",
    )
    ap.add_argument(
        "--synchronous-commit",
        choices=["on", "off"],
        default="on",
        help="DIAGNOSTIC: synchronous_commit of the submitting session (default on, the real case); "
        "off shows the pickup without the WAL flush a COMMIT waits for",
    )
    ap.add_argument(
        "--peers",
        type=lambda v: [p for p in v.split(",") if p],
        default=[],
        help=f"comma-separated peer queues measured alongside, alternating: {','.join(peers.SYSTEMS)} "
        "(bench/peers.py; pip install -e '.[bench]')",
    )
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (daemon logs) after a good run")
    ap.add_argument("--listener", choices=["sync", "async"], help=argparse.SUPPRESS)
    ap.add_argument("--channel", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.listener:
        return listener_main(args.listener, args.dsn, args.channel)
    if args.jobs < 1:
        ap.error("--jobs must be at least 1")
    results = run(args)
    report(results)
    if not args.keep:
        shutil.rmtree(results.pop("home"), ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
