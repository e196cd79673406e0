"""Several ranks against one: the same text-classification job on 2 CPU ranks (gloo) and on 1 process.

    python bench/dist.py [--dsn DSN] [--reps 2] [--steps 30] [--rows 256] [--json out.json]

Without --dsn it uses (starting if needed) the embedded PostgreSQL under .pgml-bench/; either way it works in
a fresh database (pgml_tuned.db.migrate), dropped at the end.

The job: a tiny BERT classifier (tests/support/models.py, hidden 64, 2 layers) fine-tuned on --rows labelled rows
for --steps steps, logging every step, through a real `pgml-tuned serve --drain`. The two runs see the same global
batch of 16 rows a step: 1 process × 16, or {"resources": {"procs": 2}} × 8 per rank (DDP averages the two
halves' gradients, so the updates match up to float rounding and the order of the rows drawn).

A third arm, "1 process, 1 thread", runs the 1-process job with OMP_NUM_THREADS=1 in the daemon's environment
(children inherit it): each rank of the 2-rank job runs with OMP_NUM_THREADS = cores / ranks = 1 (child/dist.py),
so this arm separates what the thread count does from what the second rank does.

Measured per run, --reps times, in a rotating order: wall-clock from the daemon's start to the job's success
(what a user waits, rank start-up included), the Trainer's own train_runtime, the loss at each logged step,
eval_loss, and the stored files (rows in pgml.files, distinct paths, and how many (path, part) were written
twice: must be 0).
Printed: the loss curves side by side and the ratios of 2 ranks to each 1-process arm. On a 2-core machine two ranks
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


ARMS = {"1 process": (1, None), "1 process, 1 thread": (1, "1"), "2 ranks": (2, None)}


def one_run(
    dsn: str,
    home: Path,
    conn: psycopg.Connection[dict[str, Any]],
    model: Path,
    procs: int,
    steps: int,
    threads: str | None = None,
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
    env = bench_env(home, [model.parent])  # the model is loaded by path: its directory is a model directory
    if threads:
        env["OMP_NUM_THREADS"] = threads
    d = DaemonProc(dsn, home, "--drain", env=env)
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
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    with (
        fresh_database(admin, "pgml_bench_dist") as dsn,
        psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn,
        tempfile.TemporaryDirectory(prefix="pgml-bench-dist-") as tmp,
        tempfile.TemporaryDirectory(prefix="pgml-bench-dist-models-") as models,
    ):
        home = Path(tmp)
        model = build_tiny_classifier_base(Path(models) / "bert", hidden=64, layers=2)  # outside the daemon's home
        conn.execute("CREATE TABLE bench_texts (text text, class text)")
        conn.execute(
            "INSERT INTO bench_texts SELECT 'sample text number ' || i || ' is ' || "
            "CASE WHEN i %% 2 = 0 THEN 'good' ELSE 'bad' END, CASE WHEN i %% 2 = 0 THEN 'pos' ELSE 'neg' END "
            "FROM generate_series(1, %s) i",
            (args.rows,),
        )
        arms = list(ARMS)
        for rep in range(args.reps):
            for arm in arms[rep % 3 :] + arms[: rep % 3]:  # rotate the order: drift hits every arm
                procs, threads = ARMS[arm]
                r = one_run(dsn, home, conn, model, procs, args.steps, threads)
                runs[arm].append(r)
                print(
                    f"  rep {rep + 1} {arm:20s}: wall {r['wall_s']:6.2f} s, train_runtime "
                    f"{r['train_runtime_s']:6.2f} s, eval_loss {r['eval_loss']:.4f}, world_size {r['world_size']}, "
                    f"files {r['files']['n']} rows / {r['files']['paths']} paths / {r['files']['twice']} twice",
                    flush=True,
                )
    last = {arm: rs[-1] for arm, rs in runs.items()}
    print("\nloss by step (last rep; global batch 16 in every arm): step, " + ", ".join(ARMS))
    for i, s in enumerate(last["1 process"]["steps"]):
        print(f"  {s:4d} " + " ".join(f"{last[arm]['loss'][i]:8.4f}" for arm in ARMS))
    wall = {arm: statistics.mean(r["wall_s"] for r in rs) for arm, rs in runs.items()}
    train = {arm: statistics.mean(r["train_runtime_s"] for r in rs) for arm, rs in runs.items()}
    print(f"\nmeans of {args.reps} reps:")
    for arm in ARMS:
        print(f"  {arm:20s} wall {wall[arm]:7.2f} s, train_runtime {train[arm]:6.2f} s")
    ratios = {
        f"2 ranks / {base}": {"wall": wall["2 ranks"] / wall[base], "train": train["2 ranks"] / train[base]}
        for base in ("1 process", "1 process, 1 thread")
    }
    for name, r in ratios.items():
        print(f"{name}: wall {r['wall']:.2f}x, train_runtime {r['train']:.2f}x")
    return {
        "at": dt.datetime.now().isoformat(),
        "args": vars(args),
        "runs": runs,
        "wall_mean_s": wall,
        "train_runtime_mean_s": train,
        "ratios": ratios,
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
