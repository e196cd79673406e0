"""The commands about models: download (a trained model's files, reassembled from pgml.files), models import (a
local model directory into pgml.files, deployed as a project's model) and hub add (a local directory into the
workers' Hugging Face cache under a hub id)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from .. import db, files, hub_cache, model_refs
from ..errors import JobError
from ..model_files import IMPORT_TASKS, ModelDir, ModelFileError, inspect
from .dsn import CliError, q, reading_dsn, resolve_dsn, settings_of
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


def refused(e: ModelFileError) -> CliError:
    return CliError(f"{e.message}\n  HINT: {e.hint}")


def import_task(model: ModelDir, task: str | None, directory: str) -> str:
    """The project's task: as given, else what the model's architecture says."""
    found = task or model.task()
    if found is None:
        archs = model.configs.get("config.json", {}).get("architectures")
        raise ModelFileError(
            f"cannot tell the task of {directory} from its configuration (architectures: {archs!r})",
            "pass --task " + " or --task ".join(IMPORT_TASKS),
        )
    if found not in IMPORT_TASKS:
        raise ModelFileError(f"task {found!r} cannot be imported", "pass --task " + " or --task ".join(IMPORT_TASKS))
    return found


def import_base(model: ModelDir, base: str | None) -> str | None:
    """What an adapter loads onto: --base, else its adapter_config.json's base_model_name_or_path."""
    if not model.adapter:
        if base:
            raise ModelFileError(
                f"--base {base} given for a full model (it has no adapter_config.json)",
                "a full model loads on its own: leave --base out",
            )
        return None
    base = base or model.base_model
    if not base:
        raise ModelFileError(
            "the adapter names no base model",
            "pass --base (pgml:<project>, pgml:model:<id>, or a hub id on the allow-list), or set "
            "base_model_name_or_path in its adapter_config.json",
        )
    try:
        model_refs.kind(base)
    except JobError as e:
        raise ModelFileError(f"base model: {e}", "pass --base with a model reference") from None
    return base


def import_model(
    conn: psycopg.Connection[Any],
    directory: Path,
    project: str,
    *,
    task: str | None = None,
    base: str | None = None,
    owner: str | None = None,
) -> dict[str, Any]:
    """Store the model in `directory` as a model of `project`, deployed: in one transaction of `conn` (checked
    here first, then by the database: sql/functions/76_imports.sql), its files with COPY as a training child stores
    its own. Returns the pgml.import_model_finish row (id, project_name, owner, files, bytes, ref)."""
    model = inspect(directory)
    params = {
        "project": project,
        "task": import_task(model, task, str(directory)),
        "base": import_base(model, base),
        "files": Jsonb(model.manifest()),
        "source": str(model.root),
        "owner": owner,
    }
    with conn.transaction():
        model_id = db.fetch_one(conn, q("import_model_begin"), params)["model_id"]
        files.copy_dir_in(conn, db.q("copy_files"), model_id, model.root, [(rel, p) for rel, p, _ in model.files])
        return dict(db.fetch_one(conn, q("import_model_finish"), {"model_id": model_id}))


def cmd_import(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    try:
        inspect(directory)  # before connecting: a directory refused needs no database
    except ModelFileError as e:
        raise refused(e) from None
    dsn = resolve_dsn(settings_of(args), announce=False, check="schema")
    with db.sync_connect(dsn) as conn:
        try:
            row = import_model(conn, directory, args.project, task=args.task, base=args.base, owner=args.owner)
        except ModelFileError as e:
            raise refused(e) from None
    print(
        f"imported {directory} as model {row['id']} of project {row['project_name']!r} (owner {row['owner']}): "
        f"{row['files']} files, {row['bytes'] / 1e6:.1f} MB in pgml.files, deployed"
    )
    print(f"use it as {row['ref']} (or pgml:model:{row['id']}): pgml.transform, chat, pgml.tune(model_name => ...)")
    return 0


def cmd_hub_add(args: argparse.Namespace) -> int:
    hf_home = Path(args.hf_home) if args.hf_home else None
    try:
        added = hub_cache.add(Path(args.dir), args.repo_id, hf_home)
    except ModelFileError as e:
        raise refused(e) from None
    cache = added.snapshot.parents[2]
    what = "added" if added.changed else "already there, unchanged:"
    print(f"{what} {args.repo_id} in the Hugging Face cache {cache} (snapshot {added.revision})")
    print(
        f"workers whose Hugging Face cache this is (HF_HOME={cache.parent}, or HF_HUB_CACHE={cache}) load it as "
        f"{args.repo_id!r}, offline with HF_HUB_OFFLINE=1"
    )
    print(
        "the hub allow-list applies: while pgml.hub_allowlist has entries, an administrator allows it with "
        f"SELECT pgml.hub_allow('{args.repo_id.lower()}');"
    )
    return 0
