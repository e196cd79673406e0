"""The loopback (0013_loopback.sql): statements a SQL call must see committed before its own transaction ends
go through dblink, as a login of their own, and act only as the user whose session sent them."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from tests.conftest import USER, as_login, connect


@pytest.fixture
def lb(su: psycopg.Connection[dict[str, Any]]) -> dict[str, Any]:
    """The loopback login of this database, and a probe: users may call _loopback, the loopback _submitter."""
    row = su.execute("SELECT login, password FROM pgml.loopback_login").fetchone()
    assert row is not None
    su.execute("GRANT EXECUTE ON FUNCTION pgml._loopback(text), pgml._loopback_send(text) TO pgml_user")
    su.execute("GRANT EXECUTE ON FUNCTION pgml._submitter() TO pgml_loopback")
    return dict(row)


def test_a_loopback_statement_acts_as_the_calling_user(lb: dict[str, Any], conn: psycopg.Connection[Any]) -> None:
    row = conn.execute("SELECT pgml._loopback('to_jsonb(pgml._submitter())') AS who").fetchone()
    assert row["who"] == USER
    # the connection stays open for the session and is reused
    again = conn.execute("SELECT pgml._loopback('to_jsonb(pg_backend_pid())') AS pid").fetchone()["pid"]
    assert conn.execute("SELECT pgml._loopback('to_jsonb(pg_backend_pid())') AS pid").fetchone()["pid"] == again
    assert again != conn.execute("SELECT pg_backend_pid() AS p").fetchone()["p"]


def test_the_loopback_sees_what_the_callers_transaction_has_not_committed_as_committed(
    lb: dict[str, Any], conn: psycopg.Connection[Any], su: psycopg.Connection[Any]
) -> None:
    su.execute("CREATE TABLE public.lb_probe (v int)")
    su.execute("GRANT INSERT, SELECT ON public.lb_probe TO pgml_loopback, pgml_user")
    su.execute(
        "CREATE FUNCTION public.lb_insert() RETURNS int LANGUAGE sql "
        "AS 'INSERT INTO public.lb_probe VALUES (7) RETURNING v'"
    )
    with conn.transaction():
        conn.execute("SELECT pgml._loopback('to_jsonb(public.lb_insert())')")
        # autonomous: another session sees it before the caller commits
        assert su.execute("SELECT count(*) AS n FROM public.lb_probe").fetchone()["n"] == 1
        raise psycopg.Rollback()
    # and the caller's rollback does not undo it
    assert su.execute("SELECT count(*) AS n FROM public.lb_probe").fetchone()["n"] == 1


def test_the_loopback_login_without_a_proof_is_nobody(lb: dict[str, Any], su_dsn: str) -> None:
    """Someone who had the loopback's password (they do not: only pgml_owner reads it) still could not act as
    anyone: every statement needs a proof made with the secret for that backend."""
    with connect(as_login(su_dsn, lb["login"]) + f" password={lb['password']}") as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="without a valid proof"):
            c.execute("SELECT pgml._submitter()")
        c.execute("SELECT set_config('pgml.on_behalf_of', 'pgml_test_user2', false)")
        c.execute("SELECT set_config('pgml.loopback_proof', 'abc:def', false)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="without a valid proof"):
            c.execute("SELECT pgml._submitter()")


def test_a_proof_made_for_another_backend_does_not_work(
    lb: dict[str, Any], su_dsn: str, su: psycopg.Connection[Any]
) -> None:
    secret = su.execute("SELECT secret FROM pgml.loopback_login").fetchone()["secret"]
    proof = su.execute("SELECT pgml._loopback_proof(%s, 'victim', 1, 'n') AS p", (secret,)).fetchone()["p"]
    with connect(as_login(su_dsn, lb["login"])) as c:
        c.execute("SELECT set_config('pgml.on_behalf_of', 'victim', false)")
        c.execute("SELECT set_config('pgml.loopback_proof', %s, false)", (f"n:{proof}",))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT pgml._submitter()")


def test_users_cannot_reach_dblink_nor_the_loopbacks_password(
    lb: dict[str, Any], conn: psycopg.Connection[Any]
) -> None:
    conn.execute("SELECT pgml._loopback('to_jsonb(1)')")  # the session holds an open loopback connection
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT * FROM pgml_dblink.dblink('pgml_loopback', 'SELECT 1') AS t(x int)")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT password FROM pgml.loopback_login")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT pgml._setup_loopback()")


def test_a_sent_statement_is_not_waited_for_and_the_next_one_reads_its_result_first(
    lb: dict[str, Any], conn: psycopg.Connection[Any], su: psycopg.Connection[Any]
) -> None:
    """pgml._loopback_send (an answer's removal, once its caller has the answer): it returns before the statement
    is done; the session's next loopback statement reads and drops its result first, on the same connection; its
    error reaches nobody; a transaction rolled back after a send (which forgets that a result is waiting) costs no
    new connection either."""
    su.execute("CREATE TABLE public.lb_sent (v int)")
    su.execute("GRANT INSERT, SELECT ON public.lb_sent TO pgml_loopback, pgml_user")
    su.execute(
        "CREATE FUNCTION public.lb_send(v int) RETURNS int LANGUAGE sql "
        "AS 'INSERT INTO public.lb_sent VALUES (v) RETURNING v'"
    )
    pid = conn.execute("SELECT pgml._loopback('to_jsonb(pg_backend_pid())') AS p").fetchone()["p"]

    def pid_now() -> int:
        return int(conn.execute("SELECT pgml._loopback('to_jsonb(pg_backend_pid())') AS p").fetchone()["p"])

    t0 = time.monotonic()
    conn.execute(
        "SELECT pgml._loopback_send('(SELECT to_jsonb(pg_sleep(0.5)) "
        "FROM (SELECT 1 FROM (VALUES (1)) v, LATERAL (SELECT 1) w) x)')"
    )
    assert time.monotonic() - t0 < 0.4  # not waited for
    assert pid_now() == pid
    assert time.monotonic() - t0 >= 0.5  # the next statement waited for its result
    # a write, committed on the loopback's own
    conn.execute("SELECT pgml._loopback_send('to_jsonb(public.lb_send(1))')")
    assert pid_now() == pid
    assert su.execute("SELECT count(*) AS n FROM public.lb_sent").fetchone() == {"n": 1}
    # a statement that fails: its error is nobody's, and the connection stays
    conn.execute("SELECT pgml._loopback_send('to_jsonb(1 / 0)')")
    assert pid_now() == pid
    # sent in a transaction that rolls back: the mark is gone, the result is read all the same
    with pytest.raises(psycopg.errors.DivisionByZero):
        with conn.transaction():
            conn.execute("SELECT pgml._loopback_send('to_jsonb(2)')")
            conn.execute("SELECT 1 / 0")
    assert pid_now() == pid
    assert conn.execute("SELECT pgml._loopback('to_jsonb(41 + 1)') AS v").fetchone()["v"] == 42


def test_a_broken_loopback_connection_is_opened_again(
    lb: dict[str, Any], conn: psycopg.Connection[Any], su: psycopg.Connection[Any]
) -> None:
    pid = conn.execute("SELECT pgml._loopback('to_jsonb(pg_backend_pid())') AS p").fetchone()["p"]
    su.execute("SELECT pg_terminate_backend(%s)", (pid,))
    new = conn.execute("SELECT pgml._loopback('to_jsonb(pg_backend_pid())') AS p").fetchone()["p"]
    assert new != pid


def test_without_dblink_the_error_names_both_ways_out(
    lb: dict[str, Any], conn: psycopg.Connection[Any], su: psycopg.Connection[Any]
) -> None:
    su.execute("DROP EXTENSION dblink")
    with pytest.raises(psycopg.errors.FeatureNotSupported) as e:
        conn.execute("SELECT pgml._loopback('to_jsonb(1)')")
    assert "dblink" in str(e.value)
    assert "CREATE EXTENSION dblink" in e.value.diag.message_hint
    assert "_async" in e.value.diag.message_hint
