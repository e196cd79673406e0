"""Submit time: pgml.tune() copies the rows a job trains on at submit time (with the caller's rights, into
pgml.job_rows). How fast is that against a plain INSERT ... SELECT of the same rows?

    python bench/submit.py [--dsn DSN] [--rows 25000] [--rounds 7] [--json out.json]

Without --dsn it uses (starting if needed) the embedded PostgreSQL under .pgml-bench/; either way it works in a
fresh database (pgml_tuned.db.migrate), dropped at the end. A login of role pgml_user (the role a user has)
owns an IMDB-sized table: --rows rows of review text (lengths drawn like IMDB's: 230 to 13,700 characters,
mean ~1,300) and a label. Each round runs, in random order and in the user's session, each in its own
transaction (autocommit, so the commit is timed too):

- plain:  INSERT INTO plain_copy (text, class) SELECT text, class FROM reviews   (then TRUNCATE, untimed)
- tune:   SELECT * FROM pgml.tune('bench', task => 'text-classification', relation_name => 'public.reviews', ...)
          (then the job is deleted, untimed, which drops its table pgml_rows.job_<id>, as the plain side's TRUNCATE
          empties its table)

It prints rows/s of both and their ratio per round and as medians (the target: tune ≥ 0.8× plain). When the server
runs on this machine it also prints the ratio of the server backend's on-CPU time (/proc/PID/schedstat, ns): on a
busy machine the wall-clock ratio swings with whatever else runs, the CPU time the server spends on each statement
does not.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path
from typing import Any

import psycopg
from common import admin_dsn, fresh_database, main_with_json, with_db
from psycopg.conninfo import conninfo_to_dict

LOGIN = "pgml_bench_user"
HP = '{"dataset_args": {"text_column": "text", "class_column": "class"}}'


def backend_cpu(pid: int) -> float | None:
    """Seconds the server backend PID has run on a CPU (None when the server is not on this machine)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    admin = admin_dsn(args.dsn)
    rng = random.Random(7)
    with fresh_database(admin, "pgml_bench_submit") as dsn, psycopg.connect(dsn, autocommit=True) as su:
        su.execute(f"DO $$ BEGIN CREATE ROLE {LOGIN} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
        su.execute(f"GRANT pgml_user TO {LOGIN}")
        su.execute(f"GRANT CREATE ON SCHEMA public TO {LOGIN}")
        user_dsn = with_db(dsn, conninfo_to_dict(dsn)["dbname"], LOGIN)
        with psycopg.connect(user_dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE reviews (id serial PRIMARY KEY, text text NOT NULL, class text NOT NULL)")
            words = "a film that the story was great bad boring acting plot actors really movie".split()
            with conn.cursor() as cur, cur.copy("COPY reviews (text, class) FROM STDIN") as copy:
                for i in range(args.rows):
                    n = min(2400, max(40, int(rng.lognormvariate(5.1, 0.6))))  # words: ~1,300 characters mean
                    copy.write_row((" ".join(rng.choice(words) for _ in range(n)), "positive" if i % 2 else "negative"))
            conn.execute("CREATE TABLE plain_copy (text text, class text)")
            conn.execute("VACUUM ANALYZE reviews")
            mb = conn.execute("SELECT pg_total_relation_size('reviews') / 1e6 AS mb").fetchone()[0]
            print(f"{args.rows} rows, {mb:.0f} MB; {args.rounds} rounds", flush=True)

            pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            cpu: dict[str, list[float]] = {"plain": [], "tune": []}

            def timed(name: str, statement: str, params: tuple[Any, ...] = ()) -> tuple[float, Any]:
                c0, t0 = backend_cpu(pid), time.perf_counter()
                row = conn.execute(statement, params).fetchone() if params else conn.execute(statement)
                seconds, c1 = time.perf_counter() - t0, backend_cpu(pid)
                if c0 is not None and c1 is not None:
                    cpu[name].append(c1 - c0)
                return seconds, row

            def plain() -> float:
                seconds, _ = timed("plain", "INSERT INTO plain_copy (text, class) SELECT text, class FROM reviews")
                conn.execute("TRUNCATE plain_copy")
                return seconds

            def tune() -> float:
                seconds, row = timed(
                    "tune",
                    "SELECT job_id FROM pgml.tune('bench', task => 'text-classification', "
                    "relation_name => 'public.reviews', model_name => 'm', hyperparams => %s::jsonb)",
                    (HP,),
                )
                su.execute("DELETE FROM pgml.jobs WHERE id = %s", (row[0],))
                return seconds

            times: dict[str, list[float]] = {"plain": [], "tune": []}
            plain(), tune()  # warm-up: caches, plans
            cpu = {"plain": [], "tune": []}
            for r in range(args.rounds):
                order = [("plain", plain), ("tune", tune)]
                rng.shuffle(order)
                for name, fn in order:
                    times[name].append(fn())
                ratio = times["plain"][-1] / times["tune"][-1]
                on_cpu = (
                    f"   server CPU ms: plain {cpu['plain'][-1] * 1e3:.0f} tune {cpu['tune'][-1] * 1e3:.0f}"
                    if cpu["tune"]
                    else ""
                )
                print(
                    f"  round {r + 1}: plain {args.rows / times['plain'][-1]:9.0f} rows/s   "
                    f"tune {args.rows / times['tune'][-1]:9.0f} rows/s   tune/plain {ratio:.2f}×{on_cpu}",
                    flush=True,
                )
    ratios = [p / t for p, t in zip(times["plain"], times["tune"], strict=True)]
    result = {
        "rows": args.rows,
        "plain_rows_per_s": args.rows / statistics.median(times["plain"]),
        "tune_rows_per_s": args.rows / statistics.median(times["tune"]),
        "ratio_median_of_rounds": statistics.median(ratios),
        "rounds": times,
        "server_cpu_seconds": cpu,
    }
    if cpu["tune"]:
        result["cpu_ratio_median_of_rounds"] = statistics.median(
            p / t for p, t in zip(cpu["plain"], cpu["tune"], strict=True)
        )
    print(
        f"median: plain {result['plain_rows_per_s']:.0f} rows/s, tune {result['tune_rows_per_s']:.0f} rows/s; "
        f"tune/plain {result['ratio_median_of_rounds']:.2f}× (median of per-round ratios)"
    )
    if "cpu_ratio_median_of_rounds" in result:
        print(
            f"server CPU per statement (median): plain {statistics.median(cpu['plain']) * 1e3:.0f} ms, "
            f"tune {statistics.median(cpu['tune']) * 1e3:.0f} ms; "
            f"tune/plain {result['cpu_ratio_median_of_rounds']:.2f}× in rows per CPU-second"
        )
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", help="a server the benchmark may create a database on (default: embedded)")
    ap.add_argument("--rows", type=int, default=25_000)
    ap.add_argument("--rounds", type=int, default=7)
    main_with_json(ap, run)
