"""Server CPU of each statement one job costs the queue, from submit to the child's final commit.

    python bench/job_statements.py [--dsn DSN] [--jobs 1000]

In a fresh migrated database, one noop job at a time (as bench/fleet.py's simulated workers run them): the admin
submits it (pgml.tune), a worker connection claims it and stores its child's ticket hash, a child connection runs
the noop child's two final statements, then the worker claims once more and finds the queue empty (what each losing
racer of a NOTIFY herd costs). Each statement's CPU is read from its backend's /proc/<pid>/stat (utime + stime,
clock ticks: summed over --jobs, after 30 untimed jobs), so the server must run on this machine. Prints per job,
per statement: server CPU and wall time (round trip included).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import admin_dsn, fresh_database, main_with_json
from fleet import TUNE, process_cpu_seconds

from pgml_tuned.db import q

WARMUP = 30


def run(args: argparse.Namespace) -> dict[str, Any]:
    cost: dict[str, list[float]] = {}

    def timed(name: str, conn: psycopg.Connection[Any], query: str, params: dict[str, Any] | None = None) -> Any:
        pid = conn.info.backend_pid
        cpu, wall = process_cpu_seconds(pid), time.perf_counter()
        rows = conn.execute(query, params).fetchall()
        spent = cost.setdefault(name, [0.0, 0.0])
        spent[0] += process_cpu_seconds(pid) - cpu
        spent[1] += time.perf_counter() - wall
        return rows

    claim = {"worker": "w", "lease_seconds": 60, "free_gpus": 0}
    with (
        fresh_database(admin_dsn(args.dsn), "pgml_bench_statements") as dsn,
        psycopg.connect(dsn, autocommit=True) as submitter,
        psycopg.connect(dsn, autocommit=True) as worker,
        psycopg.connect(dsn, autocommit=True) as child,
    ):
        for i in range(args.jobs + WARMUP):
            if i == WARMUP:
                cost.clear()
            timed("submit (pgml.tune)", submitter, TUNE)
            job_id, attempt = timed("claim_job, won", worker, q("claim_job"), claim)[0][:2]
            ticket = f"ticket-{i}"
            digest = hashlib.sha256(ticket.encode()).digest()
            timed("set_child_ticket", worker, q("set_child_ticket"), {"id": job_id, "attempt": attempt, "hash": digest})
            timed("child_files_begin", child, q("child_files_begin"), {"id": job_id, "ticket": ticket})
            final = {"id": job_id, "ticket": ticket, "metrics": Jsonb({}), "base_model": None}
            timed("child_succeed", child, q("child_succeed"), final)
            timed("claim_job, queue empty", worker, q("claim_job"), claim)
    result = {name: {"cpu_ms": c / args.jobs * 1e3, "wall_ms": w / args.jobs * 1e3} for name, (c, w) in cost.items()}
    print(f"per job, {args.jobs} noop jobs one at a time: server CPU / wall (round trip included)")
    for name, r in result.items():
        print(f"  {name:<24} {r['cpu_ms']:6.3f} ms / {r['wall_ms']:6.3f} ms")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="a server on this machine (default: the embedded one under .pgml-bench/)")
    parser.add_argument("--jobs", type=int, default=1000)
    main_with_json(parser, run)
