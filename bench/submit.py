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
          (then the job and its rows are deleted and pgml.job_rows vacuumed, untimed: as autovacuum would between
          submissions, and as the plain side's TRUNCATE leaves its table empty)

It prints rows/s of both and their ratio per round and as medians (the target: tune ≥ 0.8× plain).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

import psycopg
from common import admin_dsn, fresh_database, main_with_json, with_db
from psycopg.conninfo import conninfo_to_dict

LOGIN = "pgml_bench_user"
HP = '{"dataset_args": {"text_column": "text", "class_column": "class"}}'


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

            def plain() -> float:
                t0 = time.perf_counter()
                conn.execute("INSERT INTO plain_copy (text, class) SELECT text, class FROM reviews")
                seconds = time.perf_counter() - t0
                conn.execute("TRUNCATE plain_copy")
                return seconds

            def tune() -> float:
                t0 = time.perf_counter()
                row = conn.execute(
                    "SELECT job_id FROM pgml.tune('bench', task => 'text-classification', "
                    "relation_name => 'public.reviews', model_name => 'm', hyperparams => %s::jsonb)",
                    (HP,),
                ).fetchone()
                seconds = time.perf_counter() - t0
                su.execute("DELETE FROM pgml.jobs WHERE id = %s", (row[0],))
                su.execute("VACUUM pgml.job_rows")
                return seconds

            times: dict[str, list[float]] = {"plain": [], "tune": []}
            plain(), tune()  # warm-up: caches, plans
            for r in range(args.rounds):
                order = [("plain", plain), ("tune", tune)]
                rng.shuffle(order)
                for name, fn in order:
                    times[name].append(fn())
                ratio = times["plain"][-1] / times["tune"][-1]
                print(
                    f"  round {r + 1}: plain {args.rows / times['plain'][-1]:9.0f} rows/s   "
                    f"tune {args.rows / times['tune'][-1]:9.0f} rows/s   tune/plain {ratio:.2f}×",
                    flush=True,
                )
    ratios = [p / t for p, t in zip(times["plain"], times["tune"], strict=True)]
    result = {
        "rows": args.rows,
        "plain_rows_per_s": args.rows / statistics.median(times["plain"]),
        "tune_rows_per_s": args.rows / statistics.median(times["tune"]),
        "ratio_median_of_rounds": statistics.median(ratios),
        "rounds": times,
    }
    print(
        f"median: plain {result['plain_rows_per_s']:.0f} rows/s, tune {result['tune_rows_per_s']:.0f} rows/s; "
        f"tune/plain {result['ratio_median_of_rounds']:.2f}× (median of per-round ratios)"
    )
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dsn", help="a server the benchmark may create a database on (default: embedded)")
    ap.add_argument("--rows", type=int, default=25_000)
    ap.add_argument("--rounds", type=int, default=7)
    main_with_json(ap, run)
