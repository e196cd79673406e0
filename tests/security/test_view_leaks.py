"""No view or function a user may read or call shows another user's rows (issue 20, class 2).

A user creates a cheap function that prints its arguments (COST 0.0000001: the planner runs it before anything
dearer) and runs it over every column of every view pgml_user may SELECT from, and over the result of every
function and procedure pgml_user may EXECUTE, called with another user's job, project, model and request ids and
project name. Views and functions are read from the catalog, so a new one is covered without editing this file.
Another user's rows carry markers (names, texts, ids from sequence ranges of their own); none may reach the
caller's notices, results or error messages, except a value the call itself passed in.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.conftest import OTHER_USER, as_login, connect

HP = json.dumps({"dataset_args": {"text_column": "text", "class_column": "class"}})
# the other user's ids come from ranges of their own, so an id in the caller's output can only be theirs
OTHER_PROJECT, OTHER_MODEL, OTHER_JOB = 770001, 880001, 990001
MARK = "zz_other"  # in every string of the other user's rows
OWN_PROJECT = "mine_project"

LEAK = """
CREATE FUNCTION public.leak(anyelement) RETURNS boolean LANGUAGE plpgsql COST 0.0000001 AS $$
BEGIN
    RAISE NOTICE 'leak: %', $1;
    RETURN true;
END $$"""


def submit(c: psycopg.Connection[dict[str, Any]], project: str, table: str) -> dict[str, Any]:
    c.execute(f"CREATE TABLE public.{table} (text text, class text)")
    c.execute(f"INSERT INTO public.{table} SELECT '{project} review ' || i, (i % 2)::text FROM generate_series(1, 8) i")
    row = c.execute(
        "SELECT * FROM pgml.tune(%s, task => 'text-classification', relation_name => %s, model_name => 'm', "
        "hyperparams => %s::jsonb)",
        (project, f"public.{table}", HP),
    ).fetchone()
    assert row is not None
    return row


@pytest.fixture
def world(su: psycopg.Connection[dict[str, Any]], su_dsn: str) -> dict[str, Any]:
    """The other user's project, model (deployed), job (failed, with error, metrics, logs), file, request and a
    worker running their job; the caller's own project and job beside them."""
    su.execute(
        "SELECT setval('pgml.projects_id_seq', %s, false), setval('pgml.models_id_seq', %s, false), "
        "setval('pgml.jobs_id_seq', %s, false)",
        (OTHER_PROJECT, OTHER_MODEL, OTHER_JOB),
    )
    other = connect(as_login(su_dsn, OTHER_USER))
    job = submit(other, f"{MARK}_project", f"{MARK}_reviews")
    assert (job["project_id"], job["model_id"], job["job_id"]) == (OTHER_PROJECT, OTHER_MODEL, OTHER_JOB)
    su.execute(
        "UPDATE pgml.jobs SET status = 'failed', error = %s, metrics = %s::jsonb, worker = %s, "
        "finished_at = clock_timestamp() WHERE id = %s",
        (f"{MARK}_error", json.dumps({f"{MARK}_metric": 1}), f"{MARK}_worker", OTHER_JOB),
    )
    su.execute(
        "UPDATE pgml.models SET status = 'successful', metrics = %s::jsonb WHERE id = %s",
        (json.dumps({"eval_accuracy": 0.5, f"{MARK}_metric": 1}), OTHER_MODEL),
    )
    su.execute(
        "INSERT INTO pgml.deployments (project_id, model_id, strategy, deployed_by) VALUES (%s, %s, 'model_id', %s)",
        (OTHER_PROJECT, OTHER_MODEL, OTHER_USER),
    )
    su.execute(
        "INSERT INTO pgml.logs (model_id, project_id, job_id, attempt, kind, logs) VALUES (%s, %s, %s, 1, 'info', %s)",
        (OTHER_MODEL, OTHER_PROJECT, OTHER_JOB, json.dumps({"message": f"{MARK}_log"})),
    )
    with other:
        request = other.execute(
            "SELECT pgml.request('classify', %s, '{}'::jsonb, %s::jsonb) AS id",
            (f"pgml:{MARK}_project", json.dumps([f"{MARK}_input"])),
        ).fetchone()
    su.execute("SET session_replication_role = replica")  # file_parts' trigger admits only a job's child
    su.execute(
        "INSERT INTO pgml.file_parts (model_id, path, part, data) VALUES (%s, %s, 0, %s)",
        (OTHER_MODEL, f"{MARK}_path", f"{MARK}_data".encode()),
    )
    su.execute("SET session_replication_role = origin")
    su.execute("SELECT pgml._worker_register('w1', repeat('t', 16), 'host1', 1, 'v', '[]', 0, 1, 5, 30)")
    su.execute(
        "UPDATE pgml.workers SET running = ARRAY[%s]::bigint[], models_cached = %s::jsonb, serving = %s::jsonb",
        (OTHER_JOB, json.dumps([f"{MARK}_cached"]), json.dumps({"adapters": f"{MARK}_serving"})),
    )
    su.execute(
        "SELECT setval('pgml.projects_id_seq', 300), setval('pgml.models_id_seq', 200), setval('pgml.jobs_id_seq', 100)"
    )
    return {
        "job": OTHER_JOB,
        "project": OTHER_PROJECT,
        "model": OTHER_MODEL,
        "request": request["id"] if request else None,
    }


@pytest.fixture
def user(conn: psycopg.Connection[dict[str, Any]], world: dict[str, Any]) -> Iterator[tuple[Any, list[str]]]:
    """The caller (pgml_user), with its own job, its leaking function, and what the server printed to it."""
    submit(conn, OWN_PROJECT, "mine_reviews")
    conn.execute(LEAK)
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(f"{d.message_primary} {d.message_detail or ''}"))
    yield conn, notices


SECRETS = [
    f"{MARK}_{s}"
    for s in ("project", "reviews", "error", "metric", "worker", "log", "path", "cached", "serving", "input")
]
SECRETS += [f"{MARK}_data".encode().hex(), str(OTHER_PROJECT), str(OTHER_MODEL), str(OTHER_JOB)]


def secrets(passed: str = "") -> list[str]:
    """What the caller may not learn, less what it passed in itself."""
    return [s for s in SECRETS if s not in passed]


def leaked(text: str, passed: str = "") -> list[str]:
    return [s for s in secrets(passed) if s in text]


def test_every_view_a_user_reads_is_a_barrier_or_runs_as_its_caller(su: psycopg.Connection[dict[str, Any]]) -> None:
    rows = su.execute(
        "SELECT c.oid::regclass::text AS view, coalesce(c.reloptions, '{}') AS options FROM pg_class c "
        "WHERE c.relnamespace = 'pgml'::regnamespace AND c.relkind IN ('v', 'm') "
        "AND has_table_privilege('pgml_user', c.oid, 'SELECT') ORDER BY 1"
    ).fetchall()
    assert rows, "pgml_user reads no view at all?"
    bare = [
        r["view"]
        for r in rows
        if not {"security_barrier=true", "security_invoker=true"} & {o.lower() for o in r["options"]}
    ]
    assert not bare, f"views pgml_user may read without security_barrier or security_invoker: {bare}"


def test_a_cheap_function_sees_no_other_users_rows_through_any_view(user: tuple[Any, list[str]]) -> None:
    conn, notices = user
    views = conn.execute(
        "SELECT c.relname, array_agg(a.attname ORDER BY a.attnum) AS columns FROM pg_class c "
        "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
        "WHERE c.relnamespace = 'pgml'::regnamespace AND c.relkind IN ('v', 'm') "
        "AND has_table_privilege(c.oid, 'SELECT') GROUP BY c.relname ORDER BY c.relname"
    ).fetchall()
    assert {"job_status", "worker_status", "queue_summary", "files"} <= {v["relname"] for v in views}
    found: dict[str, list[str]] = {}
    for v in views:
        for col in v["columns"]:
            notices.clear()
            query = sql.SQL("SELECT * FROM pgml.{} v WHERE public.leak(v.{})").format(
                sql.Identifier(v["relname"]), sql.Identifier(col)
            )
            rows = conn.execute(query).fetchall()
            if bad := leaked(" ".join(notices) + repr(rows)):
                found[f"pgml.{v['relname']}.{col}"] = bad
            if (v["relname"], col) == ("job_status", "project"):
                # the function did run over the caller's own rows (this test can see a leak)
                assert any(OWN_PROJECT in n for n in notices), notices
    assert not found, f"another user's values reached the caller through: {found}"


# one value per parameter type: the other user's ids, names and references (bigint parameters try each id)
def probes(world: dict[str, Any], typ: str) -> list[Any]:
    ids = [world["job"], world["project"], world["model"], world["request"]]
    names = [f"{MARK}_project", f"pgml:{MARK}_project", f"pgml:model:{world['model']}"]
    return {
        "bigint": ids,
        "integer": [v for v in ids if v < 2**31],
        "text": names,
        "name": [OTHER_USER],
        "jsonb": ["{}"],
        "jsonb[]": ["{}"],
        "text[]": ["{}"],
        "boolean": [False],
        "real": [0.1],
        "double precision": [0.1],
        "oid": [0],
        "numeric": [0],
    }.get(typ, [None])


def test_no_function_a_user_may_call_answers_about_another_users_rows(
    user: tuple[Any, list[str]], world: dict[str, Any]
) -> None:
    conn, notices = user
    routines = conn.execute(
        "SELECT p.oid::regprocedure::text AS signature, p.proname, p.prokind, "
        "  (SELECT array_agg(format_type(t, NULL) ORDER BY i) FROM unnest(p.proargtypes) WITH ORDINALITY AS x (t, i) "
        "   WHERE i <= p.pronargs - p.pronargdefaults) AS required "
        "FROM pg_proc p WHERE p.pronamespace = 'pgml'::regnamespace AND has_function_privilege(p.oid, 'EXECUTE') "
        "AND p.prorettype <> 'trigger'::regtype ORDER BY 1"
    ).fetchall()
    names = {r["proname"] for r in routines}
    assert {"deployed_model", "cancel", "wait", "_wait_advice"} <= names, names
    conn.execute("SET statement_timeout = '3s'")
    found: dict[str, list[str]] = {}
    calls = 0
    for r in routines:
        types = r["required"] or []
        # every combination would be many; each parameter takes the i-th probe of its type (the last when fewer)
        width = max([len(probes(world, t)) for t in types] or [1])
        for i in range(width):
            args = [probes(world, t)[min(i, len(probes(world, t)) - 1)] for t in types]
            casts = sql.SQL(", ").join(
                sql.SQL("{}::{}").format(sql.Literal(a), sql.SQL(t)) for a, t in zip(args, types, strict=True)
            )
            notices.clear()
            out = ""
            calls += 1
            try:
                if r["prokind"] == "p":  # pgml.wait commits: called outside a transaction
                    conn.execute(sql.SQL("CALL pgml.{}({})").format(sql.Identifier(r["proname"]), casts))
                else:
                    with conn.transaction(force_rollback=True):
                        rows = conn.execute(
                            sql.SQL("SELECT public.leak(f::text) FROM pgml.{}({}) AS f").format(
                                sql.Identifier(r["proname"]), casts
                            )
                        ).fetchall()
                        out = repr(rows)
            except psycopg.Error as e:
                out = f"{e.diag.message_primary} {e.diag.message_detail or ''} {e.diag.message_hint or ''}"
            if bad := leaked(" ".join(notices) + out, passed=repr(args)):
                found[f"{r['signature']} with {args}"] = bad
    assert calls >= len(routines)
    assert not found, f"another user's values reached the caller through: {found}"
