"""Several ranks against one: the same text-classification job on 2 CPU ranks (gloo) and on 1 process.

    python bench/dist.py [--dsn DSN] [--reps 2] [--steps 30] [--rows 256] [--json out.json]

Without --dsn it uses (starting if needed) the embedded PostgreSQL under .pgml-bench/; either way it works in
a fresh database (pgml_tuned.db.migrate), dropped at the end.

The job: a tiny BERT classifier (tests/support/models.py, hidden 64, 2 layers) fine-tuned on --rows labelled rows
for --steps steps, logging every step, through a real `pgml-tuned serve --drain`. The two runs see the same global
batch of 16 rows a step: 1 process × 16, or {"resources": {"procs": 2}} × 8 per rank (DDP averages the two
halves' gradients, so the updates match up to float rounding and the order of the rows drawn).

Measured per run, --reps times, alternating: wall-clock from the daemon's start to the job's success (what a user
waits, rank start-up included), the Trainer's own train_runtime, the loss at each logged step, eval_loss, and the
stored files (rows in pgml.files, distinct paths, and how many (path, part) were written twice: must be 0).
Printed: the loss curves side by side and the wall-clock ratio 2 ranks / 1 process. On a 2-core machine two ranks
are expected to be slower (each rank gets one core, and gloo all-reduces every step): this proves the path, not
speed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from common import DaemonProc, admin_dsn, bench_env, fresh_database, main_with_json
from psycopg.rows import dict_row

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one_run(
    dsn: str, home: Path, conn: psycopg.Connection[dict[str, Any]], model: Path, procs: int, steps: int
) -> dict[str, Any]:
    hyperparams: dict[str, Any] = {
        "dataset_args": {"text_column": "text", "class_column": "class"},
        "training_args": {
            "max_steps": steps,
            "per_device_train_batch_size": 16 // procs,
            "logging_steps": 1,
            "learning_rate": 1e-3,
            "seed": 7,
        },
    }
    if procs > 1:
        hyperparams["resources"] = {"procs": procs}
    job = conn.execute(
        "SELECT job_id FROM pgml.tune('bench_dist', task => 'text-classification', relation_name => 'bench_texts', "
        "model_name => %s, test_size => 0.25, hyperparams => %s::jsonb)",
        (str(model), json.dumps(hyperparams)),
    ).fetchone()["job_id"]
    t0 = time.monotonic()
    d = DaemonProc(dsn, home, "--drain", env=bench_env(home))
    try:
        if d.wait_exit(600) != 0:
            raise SystemExit(f"the daemon failed:\n{d.tail(40)}")
    finally:
        d.stop()
    row = conn.execute("SELECT status, error, model_id, metrics FROM pgml.jobs WHERE id = %s", (job,)).fetchone()
    if row["status"] != "succeeded":
        raise SystemExit(f"job {job} {row['status']}: {row['error']}")
    wall = time.monotonic() - t0
    losses = [
        (int(r["logs"]["step"]), float(r["logs"]["loss"]), r["logs"].get("world_size"))
        for r in conn.execute(
            "SELECT logs FROM pgml.logs WHERE job_id = %s AND logs ? 'loss' ORDER BY id", (job,)
        ).fetchall()
    ]
    files = conn.execute(
        "SELECT count(*) AS n, count(DISTINCT path) AS paths, count(*) - count(DISTINCT (path, part)) AS twice "
        "FROM pgml.files WHERE model_id = %s",
        (row["model_id"],),
    ).fetchone()
    return {
        "procs": procs,
        "job": job,
        "wall_s": wall,
        "train_runtime_s": float(row["metrics"]["train_runtime"]),
        "eval_loss": float(row["metrics"]["eval_loss"]),
        "world_size": row["metrics"].get("world_size"),
        "steps": [s for s, _, _ in losses],
        "loss": [v for _, v, _ in losses],
        "log_world_sizes": sorted({w for _, _, w in losses if w is not None}),
        "files": dict(files),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tests.support.models import build_tiny_classifier_base

    admin = admin_dsn(args.dsn)
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    with (
        fresh_database(admin, "pgml_bench_dist") as dsn,
        psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn,
        tempfile.TemporaryDirectory(prefix="pgml-bench-dist-") as tmp,
    ):
        home = Path(tmp)
        model = build_tiny_classifier_base(home / "bert", hidden=64, layers=2)
        conn.execute("CREATE TABLE bench_texts (text text, class text)")
        conn.execute(
            "INSERT INTO bench_texts SELECT 'sample text number ' || i || ' is ' || "
            "CASE WHEN i %% 2 = 0 THEN 'good' ELSE 'bad' END, CASE WHEN i %% 2 = 0 THEN 'pos' ELSE 'neg' END "
            "FROM generate_series(1, %s) i",
            (args.rows,),
        )
        for rep in range(args.reps):
            for procs in (1, 2) if rep % 2 == 0 else (2, 1):
                r = one_run(dsn, home, conn, model, procs, args.steps)
                runs[procs].append(r)
                print(
                    f"  rep {rep + 1} procs {procs}: wall {r['wall_s']:6.2f} s, train_runtime "
                    f"{r['train_runtime_s']:6.2f} s, eval_loss {r['eval_loss']:.4f}, world_size {r['world_size']}, "
                    f"files {r['files']['n']} rows / {r['files']['paths']} paths / {r['files']['twice']} twice",
                    flush=True,
                )
    one, two = runs[1][-1], runs[2][-1]
    print("\nloss by step (last rep): step, 1 process, 2 ranks (global batch 16 both)")
    for s, a, b in zip(one["steps"], one["loss"], two["loss"], strict=False):
        print(f"  {s:4d} {a:8.4f} {b:8.4f}")
    wall = {p: statistics.mean(r["wall_s"] for r in rs) for p, rs in runs.items()}
    train = {p: statistics.mean(r["train_runtime_s"] for r in rs) for p, rs in runs.items()}
    print(
        f"\nwall-clock (mean of {args.reps}): 1 process {wall[1]:.2f} s, 2 ranks {wall[2]:.2f} s, "
        f"ratio {wall[2] / wall[1]:.2f}x; train_runtime ratio {train[2] / train[1]:.2f}x"
    )
    return {
        "at": dt.datetime.now().isoformat(),
        "args": vars(args),
        "runs": runs,
        "wall_mean_s": wall,
        "train_runtime_mean_s": train,
        "wall_ratio": wall[2] / wall[1],
        "train_ratio": train[2] / train[1],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dsn", help="a server to create the benchmark database on (default: embedded)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rows", type=int, default=256)
    main_with_json(p, run)


if __name__ == "__main__":
    main()
