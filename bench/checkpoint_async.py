"""Training speed with checkpoints: our child's checkpoints streamed into PostgreSQL while training goes on, against a
plain Hugging Face Trainer saving the same checkpoints to local disk, and against no checkpoints at all.

    python bench/checkpoint_async.py [--dsn ADMIN_DSN] [--reps 3] [--steps 60] [--save-steps 10] [--hidden 256]
                                     [--layers 4] [--threads 1] [--json out.json]

Without --dsn it uses (starting if needed) the embedded PostgreSQL under .pgml-bench/; either way it works in a
fresh database (pgml_tuned.db.migrate), dropped at the end.

The model: a random BERT classifier from tests/support/models.py (--hidden 256, --layers 4: ~41 MB checkpoints —
weights and AdamW state), trained on 256 short labelled texts, batch 8, the same seed in every run. Each variant
builds a fresh Trainer (same TrainingArguments but for saving) and is timed from trainer.train() to the point the
last checkpoint is where it goes:

- no checkpoints:  save_strategy "no"
- plain local:     the plain Trainer, save_steps, save_total_limit 2, checkpoints written to local disk
- pgml async:      the same Trainer with our PgmlCallback and JobContext (recipes/hf.py train(): log rows into
                   pgml.logs, each checkpoint moved aside and uploaded by the child's uploader thread while training
                   goes on) — what a job's child runs
- pgml sync:       the same, but each checkpoint stored inside on_save before training goes on (what the child did
                   before the uploader: JobStore.store_checkpoint in the callback)

The variants alternate (random order within each rep), --reps times; steps/s = steps / wall seconds of the
training loop (train() until it returns: the plain Trainer's local saves are in it, our last upload may still
run — a job's evaluation overlaps it), and also "until stored": until the last checkpoint is in PostgreSQL.
Ratios are of medians. torch runs on --threads threads (default 1: on a GPU host the CPU is free for the upload;
on a small shared CPU host the training thread, PostgreSQL and the upload otherwise fight for the same cores).
MB = 10^6.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from common import admin_dsn, fresh_database, main_with_json
from psycopg.rows import dict_row

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TICKET = "bench-ticket"
VARIANTS = ("no checkpoints", "plain local", "pgml async", "pgml sync")


def dataset(model_dir: Path, n: int = 256) -> Any:
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    words = ["good", "bad"]
    texts = [f"sample text number {i} is really {words[i % 2]} and nothing else" for i in range(n)]
    enc = tok(texts, truncation=True, max_length=32, padding="max_length")
    return Dataset.from_dict({**enc, "labels": [i % 2 for i in range(n)]}), tok


def run_variant(
    variant: str, args: argparse.Namespace, model_dir: Path, data: Any, ctx: Any, out: Path
) -> tuple[float, float]:
    """(seconds of the training loop, seconds until its last checkpoint is stored)."""
    import torch
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments, set_seed

    from pgml_tuned.recipes import hf

    set_seed(42)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=2)
    saving: dict[str, Any] = (
        {"save_strategy": "no"}
        if variant == "no checkpoints"
        else {"save_strategy": "steps", "save_steps": args.save_steps, "save_total_limit": 2}
    )
    targs = TrainingArguments(
        output_dir=str(out),
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=1e-4,
        logging_steps=max(1, args.save_steps // 2),
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        seed=42,
        **saving,
    )
    callbacks: list[Any] = []
    if variant == "pgml async":
        callbacks = [hf.PgmlCallback(ctx)]
    elif variant == "pgml sync":

        class SyncStore(hf.PgmlCallback):
            def on_save(self, a: TrainingArguments, state: Any, control: Any, **kw: Any) -> None:
                src = Path(a.output_dir or ".") / f"checkpoint-{state.global_step}"
                self.ctx.store.store_checkpoint(state.global_step, src, keep=a.save_total_limit or 2)

        callbacks = [SyncStore(ctx)]
    trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=callbacks)
    if callbacks:
        # every run starts from step 0: never resume from the checkpoints the bench's earlier runs stored
        ctx._resume_looked_up, ctx._resume = True, None
    t0 = time.perf_counter()
    if variant.startswith("pgml"):
        hf.train(ctx, trainer)  # the last upload may still run: a job's evaluation overlaps it
    else:
        trainer.train()
    loop = time.perf_counter() - t0
    ctx.wait_checkpoints()
    return loop, time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from pgml_tuned.child.context import JobContext
    from pgml_tuned.child.events import Events
    from tests.support.models import build_tiny_classifier_base

    torch.set_num_threads(args.threads)
    admin = admin_dsn(args.dsn)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="pgml-bench-ckpt-async-"))
    os.environ["PGML_WORK_DIR"] = str(work)
    try:
        model_dir = build_tiny_classifier_base(
            work / "model", hidden=args.hidden, layers=args.layers, heads=4, verify=False
        )
        data, _tok = dataset(model_dir)
        with (
            fresh_database(admin, "pgml_bench_ckpt_async") as dsn,
            psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn,
        ):
            row = conn.execute("SELECT job_id, model_id FROM pgml.tune('ckpt', task => 'noop', model_name => 'none')")
            job = row.fetchone()
            conn.execute(
                "UPDATE pgml.jobs SET status = 'running', attempt = 1, worker = 'bench', "
                "lease_expires_at = now() + interval '1 day', heartbeat_at = now(), "
                "child_ticket = sha256(convert_to(%s, 'UTF8')) WHERE id = %s",
                (TICKET, job["job_id"]),
            )
            spec = {"id": job["job_id"], "attempt": 1, "model_id": job["model_id"], "hyperparams": {}}
            ctx = JobContext(spec, {}, dsn, TICKET, Events(open(os.devnull, "w")))
            seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
            stored: dict[str, list[float]] = {v: [] for v in VARIANTS}
            warm, _ = run_variant("no checkpoints", args, model_dir, data, ctx, work / "warmup")  # imports, caches
            shutil.rmtree(work / "warmup", ignore_errors=True)
            for rep in range(args.reps):
                order = list(VARIANTS)
                rng.shuffle(order)
                for variant in order:
                    out = work / f"out-{rep}-{variant.replace(' ', '-')}"
                    s, until_stored = run_variant(variant, args, model_dir, data, ctx, out)
                    seconds[variant].append(s)
                    stored[variant].append(until_stored)
                    print(
                        f"rep {rep + 1} {variant:15s} {args.steps / s:6.2f} steps/s ({s:.2f} s; last checkpoint "
                        f"stored after {until_stored:.2f} s)",
                        flush=True,
                    )
                    shutil.rmtree(out, ignore_errors=True)
                    shutil.rmtree(ctx.workdir / "uploads", ignore_errors=True)
            ckpt = conn.execute(
                "SELECT bytes, files FROM pgml.checkpoints WHERE job_id = %s ORDER BY step DESC LIMIT 1",
                (job["job_id"],),
            ).fetchone()
            ctx.store.conn().close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rate = {v: args.steps / statistics.median(s) for v, s in seconds.items()}
    rate_stored = {v: args.steps / statistics.median(s) for v, s in stored.items()}
    result = {
        "steps": args.steps,
        "save_steps": args.save_steps,
        "checkpoints_per_run": args.steps // args.save_steps,
        "checkpoint_mb": round(ckpt["bytes"] / 1e6, 1) if ckpt else None,
        "threads": args.threads,
        "warmup_seconds": round(warm, 2),
        "steps_per_second": {v: round(r, 3) for v, r in rate.items()},
        "steps_per_second_until_stored": {v: round(r, 3) for v, r in rate_stored.items()},
        "seconds": {v: [round(x, 2) for x in s] for v, s in seconds.items()},
        "seconds_until_stored": {v: [round(x, 2) for x in s] for v, s in stored.items()},
        "ratios": {
            "pgml async / plain local": round(rate["pgml async"] / rate["plain local"], 3),
            "pgml sync / plain local": round(rate["pgml sync"] / rate["plain local"], 3),
            "pgml async / plain local, until the last checkpoint is stored": round(
                rate_stored["pgml async"] / rate_stored["plain local"], 3
            ),
            "pgml async / no checkpoints": round(rate["pgml async"] / rate["no checkpoints"], 3),
            "plain local / no checkpoints": round(rate["plain local"] / rate["no checkpoints"], 3),
        },
    }
    print(f"\ncheckpoints: {result['checkpoints_per_run']} per run, {result['checkpoint_mb']} MB each")
    print(f"{'variant':16s} {'steps/s (median)':>17s} {'until stored':>13s}   training loops (s)")
    for v in VARIANTS:
        print(f"{v:16s} {rate[v]:17.2f} {rate_stored[v]:13.2f}   {', '.join(f'{x:.2f}' for x in seconds[v])}")
    for k, r in result["ratios"].items():
        print(f"{k:62s} {r:.3f}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dsn", help="an administrator's DSN (default: the embedded PostgreSQL under .pgml-bench/)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--save-steps", type=int, default=10)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training (default 1)")
    p.add_argument("--seed", type=int, default=0)
    main_with_json(p, run)


if __name__ == "__main__":
    main()
