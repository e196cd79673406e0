"""What the child's narrow login costs on model files: a ~100 MB model stored and read back.

- child store:  writes.succeed as the children's login (a member of pgml_child only) with the attempt's ticket —
                pgml._child_files_begin, COPY into pgml.file_parts through its per-row ticket check, _child_succeed
- plain store:  DELETE + the same COPY into a table like pgml.file_parts without the trigger (what the worker's login
                did before), in one transaction
- child read:   COPY (SELECT * FROM pgml._child_model_files(job, ticket, model)) TO STDOUT, files written
- plain read:   COPY of the same rows straight from pgml.file_parts, files written

    python bench/child_store.py [--mb 100] [--reps 3] [--dsn ADMIN_DSN]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from common import admin_dsn, fresh_database, main_with_json, with_db
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from pgml_tuned import files
from pgml_tuned.child import writes

TICKET = "bench-ticket"
CHILD = "pgml_bench_child"


def run(args: argparse.Namespace) -> dict[str, Any]:
    admin = admin_dsn(args.dsn)
    work = Path(tempfile.mkdtemp(prefix="pgml-bench-child-"))
    try:
        model = work / "model"
        model.mkdir()
        for name, share in (("model.safetensors", 0.9), ("optimizer.pt", 0.1)):
            (model / name).write_bytes(os.urandom(int(args.mb * 1e6 * share)))
        with fresh_database(admin, "pgml_bench_child") as dsn, psycopg.connect(dsn, autocommit=True) as su:
            with psycopg.connect(admin, autocommit=True) as a:
                a.execute(f"DO $$ BEGIN CREATE ROLE {CHILD} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
                a.execute(f"GRANT pgml_child TO {CHILD}")
            su.execute("CREATE TABLE bench_parts (LIKE pgml.file_parts INCLUDING ALL)")
            su.execute(f"GRANT INSERT, SELECT, DELETE ON bench_parts TO {CHILD}")
            job = su.execute(
                "SELECT job_id, model_id FROM pgml.tune('child', task => 'noop', model_name => 'none')"
            ).fetchone()
            assert job is not None
            job_id, model_id = job
            su.execute(
                "UPDATE pgml.jobs SET status = 'running', attempt = 1, child_ticket = %s WHERE id = %s",
                (hashlib.sha256(TICKET.encode()).digest(), job_id),
            )
            child_dsn = with_db(dsn, str(conninfo_to_dict(dsn)["dbname"]), CHILD)
            t: dict[str, list[float]] = {"child store": [], "plain store": [], "child read": [], "plain read": []}
            with psycopg.connect(child_dsn, autocommit=True, row_factory=dict_row) as child:
                for _ in range(args.reps):
                    su.execute("UPDATE pgml.jobs SET status = 'running' WHERE id = %s", (job_id,))
                    su.execute("VACUUM pgml.file_parts, bench_parts")
                    su.execute("CHECKPOINT")
                    t0 = time.perf_counter()
                    writes.succeed(child, job_id, TICKET, model, {}, None)
                    t["child store"].append(time.perf_counter() - t0)
                    su.execute("CHECKPOINT")
                    t0 = time.perf_counter()
                    with child.transaction():
                        child.execute("DELETE FROM bench_parts")  # as the final commit drops an earlier try's parts
                        files.copy_dir_in(
                            child, "COPY bench_parts (model_id, path, part, data) FROM STDIN (FORMAT BINARY)", 1, model
                        )
                    t["plain store"].append(time.perf_counter() - t0)
                    su.execute(
                        "UPDATE pgml.jobs SET status = 'running', child_ticket = %s WHERE id = %s",
                        (hashlib.sha256(TICKET.encode()).digest(), job_id),
                    )
                    for name, query, params in (
                        ("child read", "child_model_files", {"id": job_id, "ticket": TICKET}),
                        ("plain read", "model_files", None),
                    ):
                        dest = work / name.replace(" ", "_")
                        shutil.rmtree(dest, ignore_errors=True)
                        t0 = time.perf_counter()
                        if params is None:
                            files.copy_dir_out(
                                child,
                                "SELECT path, part, data FROM bench_parts WHERE model_id = %(model_id)s "
                                "ORDER BY path, part",
                                {"model_id": 1},
                                dest,
                            )
                        else:
                            files.download_model(child, model_id, dest, query, params)
                        t[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in t.items()}
        result = {
            "mb": args.mb,
            "reps": args.reps,
            "median_seconds": {k: round(v, 3) for k, v in med.items()},
            "MB_per_s": {k: round(args.mb / v, 1) for k, v in med.items()},
            "store_ratio_child_vs_plain": round(med["plain store"] / med["child store"], 3),
            "read_ratio_child_vs_plain": round(med["plain read"] / med["child read"], 3),
        }
        print(result, flush=True)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=100.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dsn")
    main_with_json(p, run)


if __name__ == "__main__":
    main()
