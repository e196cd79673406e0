"""The Python client's typed errors (pgml_tuned.errors): which class each SQLSTATE becomes, how one reads (message,
DETAIL, HINT; never CONTEXT), the job it is about, and a failed connection as sentences without its password."""

from __future__ import annotations

import psycopg
import pytest

import pgml_tuned
from pgml_tuned import errors


@pytest.mark.parametrize(
    ("sqlstate", "cls", "builtin"),
    [
        ("22023", pgml_tuned.InvalidInputError, ValueError),  # invalid_parameter_value: most of pgml's refusals
        ("22003", pgml_tuned.InvalidInputError, ValueError),
        ("42804", pgml_tuned.InvalidInputError, ValueError),  # datatype_mismatch
        ("0A000", pgml_tuned.InvalidInputError, ValueError),
        ("54000", pgml_tuned.InvalidInputError, ValueError),
        ("P0002", pgml_tuned.NotFoundError, LookupError),  # no_data_found: no job, no model, no project
        ("42704", pgml_tuned.NotFoundError, LookupError),  # undefined_object: an unknown model or credential
        ("42P01", pgml_tuned.NotFoundError, LookupError),
        ("42501", pgml_tuned.PermissionDeniedError, PermissionError),
        ("28P01", pgml_tuned.PermissionDeniedError, PermissionError),
        ("57014", pgml_tuned.TimedOutError, TimeoutError),  # query_canceled: pgml.wait's timeout
        ("55P03", pgml_tuned.TimedOutError, TimeoutError),
        ("38000", pgml_tuned.JobFailedError, RuntimeError),  # external_routine_exception: a failed job
        ("22000", pgml_tuned.JobFailedError, RuntimeError),  # data_exception: a failed request's answer
        ("08006", pgml_tuned.ConnectionFailedError, ConnectionError),
        ("57P01", pgml_tuned.ConnectionFailedError, ConnectionError),
        ("XX000", pgml_tuned.PgmlError, Exception),
    ],
)
def test_each_sqlstate_class_has_its_error(sqlstate: str, cls: type[Exception], builtin: type[Exception]) -> None:
    pg = psycopg.errors.lookup(sqlstate)("no job 42 for you")
    got = errors.translated(pg)
    assert type(got) is cls and isinstance(got, builtin) and isinstance(got, pgml_tuned.PgmlError)
    assert got.sqlstate == sqlstate and got.message == "no job 42 for you" and got.job_id == 42


def test_the_context_manager_chains_psycopgs_error_and_leaves_others_alone() -> None:
    pg = psycopg.errors.NoDataFound("no job 7")
    with pytest.raises(pgml_tuned.NotFoundError) as raised, pgml_tuned.pgml_errors():
        raise pg
    assert raised.value.__cause__ is pg
    with pytest.raises(KeyError), pgml_tuned.pgml_errors():
        raise KeyError("not ours")


def test_it_reads_as_message_detail_and_hint() -> None:
    e = pgml_tuned.InvalidInputError("unknown task 'x'", "the tasks: noop, conversation", detail="in pgml.tune")
    assert str(e) == "unknown task 'x'\nDETAIL: in pgml.tune\nHINT: the tasks: noop, conversation"
    assert str(pgml_tuned.NotFoundError("no model 3")) == "no model 3"
    assert pgml_tuned.NotFoundError("no model 3").job_id is None
    assert pgml_tuned.JobFailedError("it failed", job_id=9).job_id == 9


def test_a_failed_connection_is_sentences_naming_the_server_without_its_password() -> None:
    dsn = "postgresql://nobody:sekret@127.0.0.1:1/x?connect_timeout=3"
    with pytest.raises(psycopg.OperationalError) as raised:
        psycopg.connect(dsn)
    got = errors.translated(raised.value, dsn)
    assert isinstance(got, pgml_tuned.ConnectionFailedError) and isinstance(got, ConnectionError)
    assert got.message.startswith("cannot connect to nobody@127.0.0.1:1/x: Connection refused. Is the server")
    assert "\n" not in got.message and "sekret" not in str(got) and "connection to server at" not in got.message
    assert got.hint and "PGML_DSN" in got.hint
