"""The Python client against a real PostgreSQL, called with bad input: each refusal is a pgml_tuned.PgmlError of
its kind (InvalidInputError, NotFoundError, PermissionDeniedError, TimedOutError, JobFailedError,
ConnectionFailedError), reading as the message and its HINT without PL/pgSQL's CONTEXT lines, chained to
psycopg's error, with the job it is about. No worker runs here: nothing is answered."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

import pgml_tuned
from tests.conftest import ADMIN, as_login


def clean(e: pgml_tuned.PgmlError) -> str:
    text = str(e)
    assert "CONTEXT" not in text and "PL/pgSQL" not in text, text
    assert e.hint and text.endswith(f"\nHINT: {e.hint}"), text
    return text


def test_bad_input_raises_typed_errors(conn_dsn: str, su_dsn: str, conn: psycopg.Connection[dict[str, Any]]) -> None:
    client = pgml_tuned.OpenSourceAI(conn_dsn, timeout=1)
    # a task pgml.tune does not know: invalid input (SQLSTATE 22023), chained to psycopg's error
    with pytest.raises(pgml_tuned.InvalidInputError) as bad:
        client.tune("p", task="no_such_task", model_name="x/y")
    assert isinstance(bad.value, ValueError) and bad.value.sqlstate == "22023"
    assert isinstance(bad.value.__cause__, psycopg.Error) and "no_such_task" in clean(bad.value)
    # a diagnostic task only an administrator may queue: permission denied
    with pytest.raises(pgml_tuned.PermissionDeniedError) as denied:
        client.tune("p", task="noop", model_name="none", hyperparams={"steps": 1})
    assert denied.value.sqlstate == "42501" and isinstance(denied.value.__cause__, psycopg.errors.InsufficientPrivilege)
    clean(denied.value)
    # no such job: not found, about that job
    with pytest.raises(pgml_tuned.NotFoundError) as missing:
        client.cancel(987654)
    assert missing.value.job_id == 987654 and missing.value.sqlstate == "P0002"
    assert str(missing.value).startswith("no job 987654")
    with pytest.raises(pgml_tuned.NotFoundError) as gone:
        client.wait(987654)
    assert gone.value.job_id == 987654
    # a model nobody stored: not found, before anything is queued
    with pytest.raises(pgml_tuned.NotFoundError) as no_model:
        client.transform({"task": "text-classification", "model": "pgml:no_such_project"}, ["a"])
    assert no_model.value.sqlstate == "42704" and "no_such_project" in clean(no_model.value)
    # bad arguments found before the database is asked: InvalidInputError too (a ValueError, as before)
    with pytest.raises(pgml_tuned.InvalidInputError, match="messages"):
        client.chat_completions_create("x/y", [])
    # a queued job nobody runs: timed out, about that job (a TimeoutError, as before)
    admin = pgml_tuned.OpenSourceAI(as_login(su_dsn, ADMIN), timeout=1)
    job = admin.tune("p", task="noop", model_name="none", hyperparams={"steps": 1})["job_id"]
    with pytest.raises(pgml_tuned.TimedOutError) as waited:
        admin.wait(job, timeout=0.5)
    assert isinstance(waited.value, TimeoutError) and waited.value.job_id == job and waited.value.hint
    # cancelled: the job failed to finish, about that job
    admin.cancel(job)
    with pytest.raises(pgml_tuned.JobFailedError) as failed:
        admin.wait(job, timeout=5)
    assert failed.value.job_id == job and "cancelled" in failed.value.message
    assert isinstance(failed.value, pgml_tuned.client.RequestError)  # the name earlier versions raised
    # a request no worker serves: timed out, saying that no worker serves
    with pytest.raises(pgml_tuned.TimedOutError, match="no pgml-tuned worker is serving"):
        client.transform({"task": "text-classification", "model": "org/some-model"}, ["a"], {"timeout": 0.5})


def test_a_wrong_database_url_is_a_connection_error_without_the_password() -> None:
    client = pgml_tuned.OpenSourceAI("postgresql://nobody:sekret@127.0.0.1:1/x?connect_timeout=3")
    for call in (
        lambda: client.cancel(1),
        lambda: client.chat_completions_create("x/y", [{"role": "user", "content": "hi"}]),
    ):
        with pytest.raises(pgml_tuned.ConnectionFailedError) as raised:
            call()
        assert isinstance(raised.value, ConnectionError) and isinstance(
            raised.value.__cause__, psycopg.OperationalError
        )
        text = str(raised.value)
        assert text.startswith("cannot connect to nobody@127.0.0.1:1/x: Connection refused. ") and "sekret" not in text
