"""The command that fetches a trained model: download (its files, reassembled from pgml.files)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import psycopg

from .. import db
from .dsn import CliError, q, reading_dsn
from .output import first_line


def cmd_download(args: argparse.Namespace) -> int:
    from ..files import download_model

    dsn = reading_dsn(args)
    with db.sync_connect(dsn) as conn:
        try:
            path = download_model(conn, args.model_id, Path(args.dest))
        except FileNotFoundError:
            raise CliError(why_no_files(conn, args.model_id)) from None
    print(f"model {args.model_id} written to {path}")
    return 0


def why_no_files(conn: psycopg.Connection[Any], model_id: int) -> str:
    """Why model `model_id` has no files to download, from its latest job."""
    job = conn.execute(q("model_latest_job"), {"model_id": model_id}).fetchone()
    if job is None:
        return (
            f"no model {model_id} (or it is another user's): a model id is pgml.jobs.model_id, "
            "shown by `pgml-tuned status`, not a job id"
        )
    if job["id"] is None:
        return f"model {model_id} has no files: no job trained it"
    if job["status"] == "failed":
        return f"model {model_id} has no files: its job {job['id']} failed: {first_line(job['error'], 200)}"
    if job["status"] == "cancelled":
        return f"model {model_id} has no files: its job {job['id']} was cancelled"
    if job["status"] != "succeeded":
        return (
            f"model {model_id} has no files yet: its job {job['id']} is {job['status']}, not finished "
            f"(pgml-tuned logs {job['id']} --follow)"
        )
    return f"model {model_id} has no files in pgml.files (its job {job['id']} stored none)"
