"""The attacks of the security review, as tests against the real SQL API and the real daemon. Each runs as the
logins a deployment has: users (pgml_user) submit, the daemon serves as pgml_worker, setup no user could do
runs as a superuser (`su`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import OTHER_USER, USER, WORKER, as_login, connect, wait_for, wait_job
from tests.support import models as testing

HP = json.dumps({"dataset_args": {"text_column": "text", "class_column": "class"}, "training_args": {"max_steps": 2}})


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing.build_tiny_classifier_base(tmp_path_factory.mktemp("models") / "tiny-bert", hidden=32, layers=1)


@pytest.fixture
def payroll(su: psycopg.Connection[dict[str, Any]]) -> str:
    """A table no pgml role may read."""
    su.execute("CREATE TABLE public.payroll (name text, salary text)")
    su.execute("INSERT INTO public.payroll VALUES ('ceo', '1000000'), ('intern', '10')")
    return "public.payroll"


def reviews(conn: psycopg.Connection[dict[str, Any]], name: str = "reviews") -> None:
    conn.execute(f"CREATE TABLE {name} (text text, class text)")
    conn.execute(f"INSERT INTO {name} SELECT 'review ' || i, (i % 2)::text FROM generate_series(1, 12) i")


def tune(conn: psycopg.Connection[dict[str, Any]], relation: str, model: str, project: str = "p") -> dict[str, Any]:
    row = conn.execute(
        "SELECT * FROM pgml.tune(%s, task => 'text-classification', relation_name => %s, model_name => %s, "
        "hyperparams => %s::jsonb, test_size => 0.25, test_sampling => 'random')",
        (project, relation, model, HP),
    ).fetchone()
    assert row is not None
    return row


def test_a_function_in_a_view_runs_as_its_caller_and_never_as_the_worker(
    conn: psycopg.Connection[dict[str, Any]],
    su: psycopg.Connection[dict[str, Any]],
    payroll: str,
    daemon: Any,
    tiny_model: Path,
) -> None:
    reviews(conn)
    conn.execute("CREATE TABLE spy_log (who text, session text, stolen text)")
    conn.execute(
        "CREATE FUNCTION spy(t text) RETURNS text LANGUAGE plpgsql AS $$ BEGIN "
        "INSERT INTO spy_log VALUES (current_user, session_user, NULL); "
        "BEGIN INSERT INTO spy_log SELECT current_user, session_user, salary FROM public.payroll; "
        "EXCEPTION WHEN insufficient_privilege THEN NULL; END; "
        "BEGIN INSERT INTO pgml.sealing_keys (key_id, n, e, active) VALUES ('x', 1, 3, true); "
        "EXCEPTION WHEN insufficient_privilege THEN NULL; END; "
        "RETURN t; END $$"
    )
    conn.execute("CREATE VIEW spying AS SELECT spy(text) AS text, class FROM reviews")
    job = tune(conn, "public.spying", str(tiny_model))
    # the rows were read at submit time, in the user's session, with the user's rights
    who = conn.execute("SELECT DISTINCT who, session, stolen FROM spy_log").fetchall()
    assert who == [{"who": USER, "session": USER, "stolen": None}]
    assert su.execute("SELECT count(*) AS n FROM pgml.sealing_keys WHERE key_id = 'x'").fetchone() == {"n": 0}
    conn.execute("DELETE FROM spy_log")
    daemon("--drain").wait(180)
    done = wait_job(conn, job["job_id"], 10)
    assert done["status"] == "succeeded", done["error"]
    assert conn.execute("SELECT count(*) AS n FROM spy_log").fetchone() == {"n": 0}  # the worker ran none of it
    assert done["snapshot_rows"] == 12
    # the snapshot is gone with the job (materialize_snapshot keeps it)
    assert su.execute("SELECT count(*) AS n FROM pgml.job_rows").fetchone() == {"n": 0}
    assert su.execute("SELECT count(*) AS n FROM pg_tables WHERE schemaname = 'pgml_rows'").fetchone() == {"n": 0}


def test_views_cannot_reach_what_the_caller_cannot_read(
    conn: psycopg.Connection[dict[str, Any]], su: psycopg.Connection[dict[str, Any]], payroll: str
) -> None:
    conn.execute("CREATE VIEW leak AS SELECT name AS text, salary AS class FROM public.payroll")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="payroll"):
        tune(conn, "public.leak", "m")
    if su.info.server_version >= 150000:  # security_invoker views (PostgreSQL 15+)
        conn.execute(
            "CREATE VIEW leak2 WITH (security_invoker = true) AS SELECT name AS text, salary AS class "
            "FROM public.payroll"
        )
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="payroll"):
            tune(conn, "public.leak2", "m")
    assert su.execute("SELECT count(*) AS n FROM pgml.jobs").fetchone() == {"n": 0}


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO pgml.jobs (project_id, model_id, task, model_name, test_size, test_sampling) "
        "VALUES (1, 1, 'noop', 'x', 0.2, 'random')",
        "UPDATE pgml.jobs SET status = 'succeeded'",
        "UPDATE pgml.jobs SET submitted_by = 'someone'",
        "DELETE FROM pgml.jobs",
        "INSERT INTO pgml.projects (name, task) VALUES ('x', 'noop')",
        "UPDATE pgml.models SET status = 'successful'",
        "INSERT INTO pgml.logs (model_id, project_id, logs) VALUES (1, 1, '{}')",
        "INSERT INTO pgml.file_parts (model_id, path, part, data) VALUES (1, 'x', 0, '')",
        "SELECT * FROM pgml.file_parts",
        "INSERT INTO pgml.sealing_keys (key_id, n, e) VALUES ('x', 1, 3)",
        "SELECT * FROM pgml.sealing_keys",
        "UPDATE pgml.sealing_keys SET active = true",
        "SELECT pgml.register_sealing_key(1, 3)",
        "SELECT pgml.activate_sealing_key('x')",
        "SELECT pgml.retire_sealing_key('x')",
        "INSERT INTO pgml.credentials (name) VALUES ('x')",
        "INSERT INTO pgml.credential_grants (credential, role) VALUES ('x', 'pgml_user')",
        "SELECT pgml.allow_credential('x', 'pgml_user')",
        "SELECT pgml.revoke_credential('x', 'pgml_user')",
        "SELECT pgml.drop_credential('x')",
        "SELECT pgml.job_credential(1, 1)",
        "SELECT * FROM pgml.checkpoint_files",
        "DELETE FROM pgml.checkpoints",
        "UPDATE pgml.tasks SET admin_only = false",
        "SELECT pgml._seal('{\"token\": \"x\"}'::jsonb, 1, 'x')",
        "SELECT pgml._own_everything()",
        "CREATE FUNCTION pgml.cancel(job_id integer) RETURNS text LANGUAGE sql AS $$ SELECT 'mine' $$",
        "CREATE TYPE pgml.t AS (a int)",
    ],
)
def test_users_reach_tables_only_through_the_api(conn: psycopg.Connection[dict[str, Any]], statement: str) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(statement)


def test_another_users_jobs_models_and_projects_are_out_of_reach(
    conn: psycopg.Connection[dict[str, Any]], su_dsn: str, daemon: Any, tiny_model: Path
) -> None:
    reviews(conn)
    mine = tune(conn, "public.reviews", str(tiny_model), project="alices")
    daemon("--drain").wait(180)
    assert wait_job(conn, mine["job_id"], 10)["status"] == "succeeded"
    with connect(as_login(su_dsn, OTHER_USER)) as other:
        for table in (
            "jobs",
            "models",
            "projects",
            "logs",
            "superseded_logs",
            "files",
            "job_events",
            "job_status",
            "job_rows",
        ):
            assert other.execute(f"SELECT count(*) AS n FROM pgml.{table}").fetchone() == {"n": 0}, table
        with pytest.raises(psycopg.errors.NoDataFound, match=f"no job {mine['job_id']}"):
            other.execute("SELECT pgml.cancel(%s)", (mine["job_id"],))
        reviews(other, "other_reviews")
        stolen = [
            tune(other, "public.other_reviews", f"pgml:model:{mine['model_id']}", project="o1"),
            tune(other, "public.other_reviews", "pgml:alices", project="o2"),
        ]
        daemon("--drain").wait(120)
        for job in stolen:
            row = wait_job(other, job["job_id"], 10)
            assert row["status"] == "failed" and "there is no" in row["error"], row["error"]
        # the same name is another project for another user
        assert other.execute("SELECT name, owner FROM pgml.projects ORDER BY id").fetchall() == [
            {"name": "o1", "owner": OTHER_USER},
            {"name": "o2", "owner": OTHER_USER},
        ]


def job_heartbeat(ops: psycopg.Connection[dict[str, Any]], job: int) -> Any:
    return ops.execute("SELECT heartbeat_at FROM pgml.jobs WHERE id = %s", (job,)).fetchone()["heartbeat_at"]


def test_a_stranger_cannot_control_the_daemon(
    ops: psycopg.Connection[dict[str, Any]], su: psycopg.Connection[dict[str, Any]], su_dsn: str, daemon: Any
) -> None:
    su.execute("DROP ROLE IF EXISTS pgml_test_stranger")
    su.execute("CREATE ROLE pgml_test_stranger LOGIN")
    try:
        job = ops.execute(
            "SELECT job_id FROM pgml.tune('ctl', task => 'noop', model_name => 'none', "
            "hyperparams => '{\"seconds\": 30}')"
        ).fetchone()["job_id"]
        daemon()
        deadline = time.monotonic() + 30
        while ops.execute("SELECT status FROM pgml.jobs WHERE id = %s", (job,)).fetchone()["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with connect(as_login(su_dsn, "pgml_test_stranger")) as stranger:
            for payload in (f"cancel:{job}", json.dumps({"type": "cancel_requested", "id": job})):
                stranger.execute("SELECT pg_notify('pgml_control', %s)", (payload,))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                stranger.execute("SELECT pgml.cancel(%s)", (job,))
        # several heartbeats after the notices: the daemon's loop went round, the job still runs
        beat = ops.execute("SELECT clock_timestamp() AS t").fetchone()["t"]
        for _ in range(3):
            beat = wait_for(
                lambda b=beat: (r := job_heartbeat(ops, job)) is not None and r > b and r, 10, what="a heartbeat"
            )
        assert ops.execute("SELECT status FROM pgml.jobs WHERE id = %s", (job,)).fetchone()["status"] == "running"
        assert ops.execute("SELECT pgml.cancel(%s) AS s", (job,)).fetchone()["s"] == "cancelling"
        assert wait_job(ops, job, 20)["status"] == "cancelled"
    finally:
        su.execute("DROP OWNED BY pgml_test_stranger")
        su.execute("DROP ROLE pgml_test_stranger")


def test_planted_functions_are_never_called_by_the_worker(
    ops: psycopg.Connection[dict[str, Any]], su: psycopg.Connection[dict[str, Any]], daemon: Any
) -> None:
    """CVE-2018-1058: functions in public that out-match pg_catalog's for the calls the queue makes."""
    su.execute("CREATE TABLE public.planted_calls (fn text, who text)")
    su.execute("GRANT INSERT ON public.planted_calls TO PUBLIC")
    for signature, returns, value in [
        ("json_build_object(text, bigint, text, text, text, integer)", "json", "'{}'::json"),
        ("jsonb_build_object(text, integer, text, text, text, timestamptz, text, text)", "jsonb", "'{}'::jsonb"),
        ("make_interval(secs double precision)", "interval", "interval '1 day'"),
        ("format(text, text, timestamptz)", "text", "'x'"),
    ]:
        name = signature.split("(")[0]
        su.execute(
            f"CREATE FUNCTION public.{signature} RETURNS {returns} LANGUAGE plpgsql AS $$ BEGIN "
            f"INSERT INTO public.planted_calls VALUES ('{name}', current_user); RETURN {value}; END $$"
        )
        su.execute(f"GRANT EXECUTE ON FUNCTION public.{signature} TO PUBLIC")
    su.execute(f"ALTER ROLE {WORKER} SET search_path = public, pg_catalog")
    try:
        job = ops.execute(
            "SELECT job_id FROM pgml.tune('plant', task => 'noop', model_name => 'none', "
            'hyperparams => \'{"steps": 3, "seconds": 0.3}\')'
        ).fetchone()["job_id"]
        daemon("--drain").wait(60)
        assert wait_job(ops, job, 10)["status"] == "succeeded"
        assert su.execute("SELECT * FROM public.planted_calls").fetchall() == []
    finally:
        su.execute(f"ALTER ROLE {WORKER} RESET search_path")
