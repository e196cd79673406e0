"""pgml.predict_batch (a job: read at submit, classify in batches, COPY into pgml.<output>) vs the same batched
pipeline in-process over the same rows read with COPY, side by side in one run.

    python bench/predict_batch.py [--dsn DSN] [--rows 4000] [--batch-size 64] [--rounds 2] [--json out.json]

Without --dsn it starts (or reuses) the embedded PostgreSQL under .pgml-bench/; a fresh migrated database either
way, dropped at the end. The rows are short reviews (60-400 characters); the model the bundled all-MiniLM-L6-v2
with a 2-label head from an offline hub cache. Per round, in random order:
- job: `SELECT * FROM pgml.predict_batch(...)` until the job succeeded (submit, claim, child start, model load,
  classify, COPY out, commit) — a daemon with a warm (already started) process;
- in-process: COPY the rows out, `pipeline(texts, batch_size=...)`, COPY (key, label, score) into a table.
Reported: rows/s of each and their ratio (issue 9's target: ≥ 0.9×).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DaemonProc, admin_dsn, bench_env, fresh_database, main_with_json
from bench.serving import MODEL, build_model

WORDS = "a film that the story was great bad boring acting plot actors really movie".split()


def run(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    from transformers import pipeline

    admin = admin_dsn(args.dsn)
    home = Path(tempfile.mkdtemp(prefix="pgml-bench-predict-"))
    path = build_model(home)
    rng = random.Random(3)
    times: dict[str, list[float]] = {"job": [], "in_process": []}
    with fresh_database(admin, "bench_predict") as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE reviews (id int PRIMARY KEY, text text)")
        with conn.cursor() as cur, cur.copy("COPY reviews (id, text) FROM STDIN") as cp:
            for i in range(args.rows):
                cp.write_row((i, " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 80)))))
        conn.execute("CREATE TABLE local_out (key text, label text, score float8)")
        daemon = DaemonProc(dsn, home, "--poll-seconds", "1", "--serving", "false", env=bench_env(home))
        pipe = pipeline("text-classification", model=str(path), tokenizer=str(path))
        try:
            daemon.wait_event(lambda e: e.get("event") == "daemon.start", 120)

            def job(n: int) -> float:
                t0 = time.perf_counter()
                row = conn.execute(
                    "SELECT job_id FROM pgml.predict_batch(%s, 'public.reviews', %s, batch_size => %s)",
                    (MODEL, f"bench_out_{n}", args.batch_size),
                ).fetchone()
                assert row is not None
                while True:
                    status = conn.execute("SELECT status, error FROM pgml.jobs WHERE id = %s", (row[0],)).fetchone()
                    assert status is not None
                    if status[0] in ("succeeded", "failed", "cancelled"):
                        break
                    time.sleep(0.05)
                assert status[0] == "succeeded", status
                return time.perf_counter() - t0

            def local(_: int) -> float:
                t0 = time.perf_counter()
                with conn.cursor() as cur, cur.copy("COPY (SELECT id::text, text FROM reviews) TO STDOUT") as cp:
                    rows = list(cp.rows())
                answers = pipe([t for _, t in rows], batch_size=args.batch_size, truncation=True)
                conn.execute("TRUNCATE local_out")
                with conn.cursor() as cur, cur.copy("COPY local_out FROM STDIN") as cp:
                    for (k, _), a in zip(rows, answers, strict=True):
                        cp.write_row((k, a["label"], float(a["score"])))
                return time.perf_counter() - t0

            pipe(["warm up"] * 4)
            for n in range(args.rounds):
                for name, fn in random.sample([("job", job), ("in_process", local)], 2):
                    times[name].append(fn(n))
                ratio = times["in_process"][-1] / times["job"][-1]
                print(
                    f"  round {n + 1}: job {args.rows / times['job'][-1]:.0f} rows/s, in-process "
                    f"{args.rows / times['in_process'][-1]:.0f} rows/s: {ratio:.2f}x",
                    flush=True,
                )
            agree = conn.execute(
                "SELECT count(*) FROM pgml.bench_out_0 p JOIN local_out l USING (key) "
                "WHERE p.label = l.label AND abs(p.score - l.score) < 1e-4"
            ).fetchone()
            assert agree is not None and agree[0] == args.rows, agree
        finally:
            daemon.stop()
    job_rate = args.rows / sorted(times["job"])[len(times["job"]) // 2]
    local_rate = args.rows / sorted(times["in_process"])[len(times["in_process"]) // 2]
    print(
        f"median: job {job_rate:.0f} rows/s vs in-process {local_rate:.0f} rows/s: {job_rate / local_rate:.2f}x "
        "(the same labels and scores within 1e-4 on every row)"
    )
    return {
        "rows": args.rows,
        "job_rows_per_s": job_rate,
        "in_process_rows_per_s": local_rate,
        "ratio": job_rate / local_rate,
        "rounds": times,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="a server to create the benchmark database on (default: embedded)")
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    main_with_json(parser, run)
