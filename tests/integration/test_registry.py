"""The facts SQL and Python both hold agree: the tasks (pgml.tasks rows vs pgml_tuned.tasks.TASKS) and the
secret hyperparams keys (pgml._secret_keys() vs pgml_tuned.secrets.SECRET_KEYS)."""

from __future__ import annotations

import importlib
from typing import Any

import psycopg

from pgml_tuned.secrets import SECRET_KEYS
from pgml_tuned.tasks import TASKS, recipe_module


def test_sql_and_python_know_the_same_tasks(conn: psycopg.Connection[dict[str, Any]]) -> None:
    rows = {r["name"]: r for r in conn.execute("SELECT * FROM pgml.tasks").fetchall()}
    assert set(rows) == set(TASKS)
    for name, task in TASKS.items():
        row = rows[name]
        assert row["required_columns"] == task.required_columns, name
        assert set(row["text_columns"]) == set(task.text_columns), name
        assert set(row["optional_columns"]) == set(task.optional_columns), name
        assert set(row["hyperparams"]) == set(task.hyperparams), name
        assert row["admin_only"] == task.admin_only, name


def test_every_task_has_a_runnable_recipe() -> None:
    for name in TASKS:
        assert callable(importlib.import_module(recipe_module(name)).run), name


def test_sql_and_python_know_the_same_secret_keys(su: psycopg.Connection[dict[str, Any]]) -> None:
    row = su.execute("SELECT pgml._secret_keys() AS keys").fetchone()
    assert row is not None and tuple(row["keys"]) == SECRET_KEYS


def test_sql_and_python_allow_the_same_load_dataset_kwargs(conn: psycopg.Connection[dict[str, Any]]) -> None:
    from pgml_tuned.recipes.load_dataset import KWARGS

    row = conn.execute("SELECT pgml._dataset_kwargs() AS keys").fetchone()
    assert row is not None and tuple(row["keys"]) == KWARGS
