"""load_dataset: rows/s into the table through the job (pgml.load_dataset_async → a daemon's child → COPY →
swap) against `datasets` → a plain COPY of the same rows in one process, side by side in one run.

    python bench/load_dataset.py [--dsn DSN] [--rows 25000] [--rounds 5] [--json out.json]

Without --dsn it uses (starting if needed) the embedded PostgreSQL under .pgml-bench/; either way it works in a
fresh database (pgml_tuned.db.migrate), dropped at the end. An offline datasets cache holds `imdb` with --rows
IMDB-sized reviews (~1.3 kB each) in two splits (tests/support/hf_datasets.py). A daemon serves as a pgml_worker
login; a pgml_user login submits. Each round runs, in random order:

- job:        SELECT pgml.load_dataset_async('imdb'), timed until the job's row says succeeded (polled every 5 ms):
              queue, claim, a fresh child process (Python + datasets imports), load from the cache, COPY, swap
- plain:      in this process (datasets already imported): datasets.load_dataset('imdb'), CREATE TABLE, one COPY
              with psycopg's write_row for every row of every split (the straightforward script), commit
- plain_csv:  the same, but the rows go as the job sends them (arrow batches → pyarrow CSV → COPY)

It prints rows/s of each per round and as medians, with job/plain (the target: ≥ 0.8×) and job/plain_csv, and the
job's own rows/s inside its child (its metrics: load + COPY + swap, without the process start).
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from common import REPO, DaemonProc, admin_dsn, bench_env, fresh_database, main_with_json, with_db
from psycopg.conninfo import conninfo_to_dict

sys.path.insert(0, str(REPO))

USER, WORKER = "pgml_bench_user", "pgml_bench_worker"


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ["HF_HUB_OFFLINE"] = "1"  # before datasets / huggingface_hub read it
    import datasets
    import pyarrow.csv as pa_csv

    from tests.support.hf_datasets import IMDB_FEATURES, imdb_rows, install_dataset

    admin = admin_dsn(args.dsn)
    home = Path(tempfile.mkdtemp(prefix="pgml-bench-ld-"))
    env = bench_env(home)
    cache = Path(env["HF_HOME"]) / "datasets"
    half = args.rows // 2
    splits = {"train": imdb_rows(half, "train"), "test": imdb_rows(args.rows - half, "test", seed=1)}
    install_dataset("imdb", splits, IMDB_FEATURES, config="plain_text", cache_dir=cache)
    datasets.disable_progress_bars()

    with fresh_database(admin, "pgml_bench_ld") as dsn, psycopg.connect(dsn, autocommit=True) as su:
        for login, role in ((USER, "pgml_user"), (WORKER, "pgml_worker")):
            su.execute(f"DO $$ BEGIN CREATE ROLE {login} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
            su.execute(f"GRANT {role} TO {login}")
        dbname = conninfo_to_dict(dsn)["dbname"]
        daemon = DaemonProc(with_db(dsn, dbname, WORKER), home, "--poll-seconds", "0.5", env=env)
        try:
            with psycopg.connect(with_db(dsn, dbname, USER), autocommit=True) as conn:
                conn.execute("SELECT 1")

                def job() -> tuple[float, float]:
                    t0 = time.perf_counter()
                    job_id = conn.execute("SELECT pgml.load_dataset_async('imdb')").fetchone()[0]
                    while True:
                        status, error, metrics = conn.execute(
                            "SELECT status, error, metrics FROM pgml.jobs WHERE id = %s", (job_id,)
                        ).fetchone()
                        if status in ("succeeded", "failed", "cancelled"):
                            break
                        time.sleep(0.005)
                    seconds = time.perf_counter() - t0
                    if status != "succeeded" or metrics["rows"] != args.rows:
                        raise RuntimeError(f"job {job_id} {status}: {error} {metrics}")
                    return seconds, float(metrics["seconds"])

                def plain(csv: bool) -> float:
                    t0 = time.perf_counter()
                    loaded = datasets.load_dataset("imdb", cache_dir=str(cache))
                    with su.transaction():
                        su.execute("CREATE TABLE plain_copy (text text, label bigint)")
                        with su.cursor() as cur, cur.copy("COPY plain_copy (text, label) FROM STDIN" + (
                            " (FORMAT csv)" if csv else "")) as cp:  # fmt: skip
                            for split in loaded.values():
                                if csv:
                                    options = pa_csv.WriteOptions(include_header=False, quoting_style="needed")
                                    for batch in split.with_format("arrow").iter(batch_size=10_000):
                                        buffer = io.BytesIO()
                                        pa_csv.write_csv(batch, buffer, options)
                                        cp.write(buffer.getvalue())
                                else:
                                    for row in split:
                                        cp.write_row((row["text"], row["label"]))
                    seconds = time.perf_counter() - t0
                    n = su.execute("SELECT count(*) FROM plain_copy").fetchone()[0]
                    su.execute("DROP TABLE plain_copy")
                    assert n == args.rows, n
                    return seconds

                job()  # warm: the first load of a name prepares nothing more, but the OS caches the files
                plain(False)
                times: dict[str, list[float]] = {"job": [], "plain": [], "plain_csv": [], "job_inside": []}
                rng = random.Random(3)
                for r in range(args.rounds):
                    order = ["job", "plain", "plain_csv"]
                    rng.shuffle(order)
                    for name in order:
                        if name == "job":
                            total, inside = job()
                            times["job"].append(total)
                            times["job_inside"].append(inside)
                        else:
                            times[name].append(plain(name == "plain_csv"))
                    print(
                        f"  round {r + 1}: "
                        + "   ".join(f"{k} {args.rows / v[-1]:8.0f} rows/s" for k, v in times.items())
                        + f"   job/plain {times['plain'][-1] / times['job'][-1]:.2f}×",
                        flush=True,
                    )
        finally:
            daemon.stop()
    med = {k: args.rows / statistics.median(v) for k, v in times.items()}
    ratio = statistics.median(p / j for p, j in zip(times["plain"], times["job"], strict=True))
    ratio_csv = statistics.median(p / j for p, j in zip(times["plain_csv"], times["job"], strict=True))
    print(
        f"median rows/s: job {med['job']:.0f} (inside its child {med['job_inside']:.0f}), plain {med['plain']:.0f}, "
        f"plain_csv {med['plain_csv']:.0f}; job/plain {ratio:.2f}×, job/plain_csv {ratio_csv:.2f}× "
        "(medians of per-round ratios)"
    )
    return {
        "rows": args.rows,
        "rows_per_s": med,
        "job_over_plain": ratio,
        "job_over_plain_csv": ratio_csv,
        "seconds": times,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", help="a server the benchmark may create a database on (default: embedded)")
    ap.add_argument("--rows", type=int, default=25_000)
    ap.add_argument("--rounds", type=int, default=5)
    main_with_json(ap, run)
