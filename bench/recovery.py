"""Crash recovery: SIGKILL the daemon running a job → the job running again on another daemon.

    python bench/recovery.py [--dsn DSN] [--runs 3] [--short-lease 6 --short-heartbeat 1 --short-poll 0.5]
                             [--json out.json]

Without --dsn it uses (starting if needed) the embedded PostgreSQL under .pgml-bench/; either way it works in
a fresh database (pgml_tuned.db.migrate), dropped at the end.

Two settings are measured, each `--runs` times, in the same run:

- default: the daemon's defaults (lease 30 s, heartbeat 5 s, poll 2 s), and
- short:   --short-lease / --short-heartbeat / --short-poll (default 6 s / 1 s / 0.5 s).

One sample: daemon A (`serve`, the setting's flags) claims a noop job that would run for an hour; then daemon
B (same flags) starts and idles. After a random delay of 0..heartbeat s (so the kill falls at a random point
of A's heartbeat cycle) A is SIGKILLed (its child dies with it: PR_SET_PDEATHSIG) and the client notes
time.time(). Recovery is from that kill to the `at` of the job's pgml.job_events row for attempt 2 (status
running: B's claim; clock_timestamp() of the same machine). It is split, from the job row and its events,
into

- lease left:  kill → lease_expires_at of A's last renewal (nobody can know A is dead before this)
- reap lag:    lease expiry → the reap event (attempt 1, running → queued): up to one poll interval
- claim lag:   reap → B's claim (the reaping poller wakes its own claimer at once)

Expected: recovery ≈ lease − U(0, heartbeat) + U(0, poll), i.e. mean ≈ lease − heartbeat/2 + poll/2.
The job is then cancelled (pgml.cancel) and B stopped; each sample gets fresh daemons.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from common import DaemonProc, admin_dsn, bench_env, fresh_database, main_with_json
from psycopg.rows import dict_row

SETTINGS_DEFAULT = {"lease": 30.0, "heartbeat": 5.0, "poll": 2.0}


def one_sample(
    dsn: str, home: Path, conn: psycopg.Connection[dict[str, Any]], s: dict[str, float], tag: str, rng: random.Random
) -> dict[str, float]:
    flags = [
        "--lease-seconds",
        str(s["lease"]),
        "--heartbeat-seconds",
        str(s["heartbeat"]),
        "--poll-seconds",
        str(s["poll"]),
    ]
    env = bench_env(home)
    a = DaemonProc(dsn, home, *flags, "--worker-id", f"{tag}-A", env=env)
    b: DaemonProc | None = None
    try:
        a.wait_event(lambda e: e.get("event") == "daemon.start", 60)
        job = conn.execute(
            "SELECT job_id FROM pgml.tune('recovery', task => 'noop', model_name => 'none', "
            "hyperparams => '{\"seconds\": 3600}', max_attempts => 5)"
        ).fetchone()["job_id"]
        a.wait_event(lambda e: e.get("event") == "job.claimed" and e.get("job_id") == job, 30)
        b = DaemonProc(dsn, home, *flags, "--worker-id", f"{tag}-B", env=env)
        b.wait_event(lambda e: e.get("event") == "daemon.start", 60)
        time.sleep(1.0 + rng.uniform(0, s["heartbeat"]))
        a.proc.send_signal(signal.SIGKILL)
        killed = time.time()
        a.wait_exit(10)
        row = conn.execute("SELECT heartbeat_at, lease_expires_at FROM pgml.jobs WHERE id = %s", (job,)).fetchone()
        deadline = time.monotonic() + s["lease"] + 4 * s["poll"] + 30
        claim = None
        while claim is None and time.monotonic() < deadline:
            claim = conn.execute(
                "SELECT at, worker FROM pgml.job_events WHERE job_id = %s AND attempt = 2 AND new_status = 'running'",
                (job,),
            ).fetchone()
            if claim is None:
                time.sleep(0.01)
        if claim is None:
            raise TimeoutError(f"job {job} was not taken over; B's log: {b.log_path}")
        reap = conn.execute(
            "SELECT at FROM pgml.job_events WHERE job_id = %s AND attempt = 1 "
            "AND old_status = 'running' AND new_status = 'queued'",
            (job,),
        ).fetchone()
        conn.execute("SELECT pgml.cancel(%s)", (job,))
        ts = {
            k: v.timestamp()
            for k, v in (("expiry", row["lease_expires_at"]), ("reap", reap["at"]), ("claim", claim["at"]))
        }
        return {
            "recovery": ts["claim"] - killed,
            "lease_left": ts["expiry"] - killed,
            "reap_lag": ts["reap"] - ts["expiry"],
            "claim_lag": ts["claim"] - ts["reap"],
            "by_b": float(claim["worker"] == f"{tag}-B"),
        }
    finally:
        for d in (a, b):
            if d is not None:
                d.stop()


def run(args: argparse.Namespace) -> dict[str, Any]:
    admin = admin_dsn(args.dsn)
    short = {"lease": args.short_lease, "heartbeat": args.short_heartbeat, "poll": args.short_poll}
    settings = {"default": SETTINGS_DEFAULT, "short": short}
    rng = random.Random(args.seed)
    samples: dict[str, list[dict[str, float]]] = {k: [] for k in settings}
    with (
        fresh_database(admin, "pgml_bench_recovery") as dsn,
        psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn,
        tempfile.TemporaryDirectory(prefix="pgml-bench-recovery-") as tmp,
    ):
        home = Path(tmp)
        for i in range(args.runs):
            order = list(settings)
            rng.shuffle(order)  # alternate the settings, so drift on a shared machine hits both
            for name in order:
                sample = one_sample(dsn, home, conn, settings[name], f"{name}{i}", rng)
                samples[name].append(sample)
                print(
                    f"  run {i + 1} {name:7s} recovery {sample['recovery']:6.2f} s  (lease left "
                    f"{sample['lease_left']:5.2f}, reap lag {sample['reap_lag']:4.2f}, claim lag "
                    f"{sample['claim_lag']:5.3f})",
                    flush=True,
                )
    result: dict[str, Any] = {
        "settings": settings,
        "runs": args.runs,
        "at": dt.datetime.now().isoformat(),
        "samples": samples,
        "summary": {},
    }
    print(f"\nSIGKILL → running again on another daemon, {args.runs} runs each (mean / min / max, seconds)")
    print(f"{'':30s} {'default':>22s} {'short':>22s}")
    label = {k: f"lease {v['lease']:g} hb {v['heartbeat']:g} poll {v['poll']:g}" for k, v in settings.items()}
    print(f"{'setting':30s} {label['default']:>22s} {label['short']:>22s}")
    for metric in ("recovery", "lease_left", "reap_lag", "claim_lag"):
        cells = []
        for name in settings:
            xs = [s[metric] for s in samples[name]]
            result["summary"].setdefault(name, {})[metric] = {
                "mean": statistics.mean(xs),
                "min": min(xs),
                "max": max(xs),
            }
            cells.append(f"{statistics.mean(xs):6.2f} {min(xs):6.2f} {max(xs):6.2f}")
        print(f"{metric:30s} {cells[0]:>22s} {cells[1]:>22s}")
    for name, s in settings.items():
        expect = s["lease"] - s["heartbeat"] / 2 + s["poll"] / 2
        result["summary"][name]["expected_mean"] = expect
        print(f"expected mean ({name}): lease - heartbeat/2 + poll/2 = {expect:.2f} s")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dsn", help="a server to create the benchmark database on (default: embedded)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--short-lease", type=float, default=6.0)
    p.add_argument("--short-heartbeat", type=float, default=1.0)
    p.add_argument("--short-poll", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=1)
    main_with_json(p, run)


if __name__ == "__main__":
    main()
