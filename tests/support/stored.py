"""Stored models as a finished training job leaves them, written directly (as the superuser) for tests that
need a model in pgml.models / pgml.files without training one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from pgml_tuned import files
from pgml_tuned.db import q


def add_model(
    su: psycopg.Connection[dict[str, Any]],
    owner: str,
    project: str,
    task: str,
    *,
    status: str = "successful",
    base: str | None = None,
    path: Path | None = None,
) -> int:
    """A model of `owner`'s `project` (created if needed), with `path`'s files in pgml.files if given; its id."""
    su.execute(
        "INSERT INTO pgml.projects (name, task, owner) VALUES (%s, %s, %s) ON CONFLICT (owner, name) DO NOTHING",
        (project, task, owner),
    )
    row = su.execute(
        "INSERT INTO pgml.models (project_id, status, task, model_name, base_model, owner) "
        "SELECT id, %s, %s, 'test', %s, %s FROM pgml.projects WHERE owner = %s AND name = %s RETURNING id",
        (status, task, base, owner, owner, project),
    ).fetchone()
    assert row is not None
    if path is not None:
        with su.transaction():
            files.copy_dir_in(su, q("copy_files"), row["id"], path)
    return int(row["id"])
