"""pgml.tune() validates at submit time: clear errors with a HINT, and nothing is queued on error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgml_tuned import embedded
from tests.conftest import OTHER_USER, USER, as_login, connect

ROOT = Path(__file__).resolve().parents[2]

OK_ARGS = {"text_column": "text", "class_column": "class"}


def tune(conn: psycopg.Connection[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    args = {
        "project_name": "p",
        "task": "text-classification",
        "relation_name": "public.reviews",
        "model_name": "some/model",
        "hyperparams": {"dataset_args": OK_ARGS},
        **kw,
    }
    if isinstance(args.get("hyperparams"), dict | list | str | int):
        args["hyperparams"] = json.dumps(args["hyperparams"])
    names = ", ".join(f"{k} => %({k})s" + ("::jsonb" if k == "hyperparams" else "") for k in args)
    row = conn.execute(f"SELECT * FROM pgml.tune({names})", args).fetchone()
    assert row is not None
    return row


def assert_rejected(conn: psycopg.Connection[dict[str, Any]], message: str, hint: str, **kw: Any) -> None:
    before = conn.execute("SELECT count(*) AS n FROM pgml.jobs").fetchone()
    with pytest.raises(psycopg.Error) as info:
        tune(conn, **kw)
    diag = info.value.diag
    assert message in (diag.message_primary or ""), diag.message_primary
    assert hint in (diag.message_hint or ""), diag.message_hint
    after = conn.execute("SELECT count(*) AS n FROM pgml.jobs").fetchone()
    assert before == after, "a rejected call must queue nothing"
    assert conn.execute("SELECT count(*) AS n FROM pgml.models").fetchone()["n"] == before["n"]


def test_valid_call_returns_job_at_once(conn: psycopg.Connection[dict[str, Any]], reviews: str) -> None:
    row = tune(conn)
    assert row["status"] == "queued" and row["job_id"] > 0
    job = conn.execute("SELECT * FROM pgml.jobs WHERE id = %s", (row["job_id"],)).fetchone()
    assert job["relation_schema"] == "public" and job["relation_table"] == "reviews"
    assert job["test_sampling"] == "stratified" and job["test_size"] == pytest.approx(0.25)
    assert conn.execute("SELECT task FROM pgml.projects WHERE name = 'p'").fetchone()["task"] == "text-classification"


def test_unknown_relation(conn: psycopg.Connection[dict[str, Any]], reviews: str) -> None:
    assert_rejected(conn, "relation 'public.nope' does not exist", "search_path", relation_name="public.nope")


def test_injection_in_relation_name_is_just_a_bad_name(conn: psycopg.Connection[dict[str, Any]], reviews: str) -> None:
    # newer PostgreSQL resolves the odd name to nothing ("does not exist"; 18 here), older ones refuse its
    # syntax (15 here): either way a clear error, nothing queued, nothing executed
    before = conn.execute("SELECT count(*) AS n FROM pgml.jobs").fetchone()
    with pytest.raises(psycopg.Error) as info:
        tune(conn, relation_name="public.reviews; DROP TABLE public.reviews")
    message = info.value.diag.message_primary or ""
    assert "does not exist" in message or "is not a valid relation name: invalid name syntax" in message, message
    assert conn.execute("SELECT count(*) AS n FROM pgml.jobs").fetchone() == before
    assert_rejected(conn, "is not a valid relation name", "double-quoting", relation_name="a.b.c.d")
    assert conn.execute("SELECT to_regclass('public.reviews') IS NOT NULL AS ok").fetchone()["ok"]


def test_quoted_identifiers_work(
    conn: psycopg.Connection[dict[str, Any]], su: psycopg.Connection[dict[str, Any]]
) -> None:
    su.execute('CREATE SCHEMA "My Schema"')
    su.execute('CREATE TABLE "My Schema"."Odd ""Name""" ("Text Col" text, "Class" text)')
    su.execute("INSERT INTO \"My Schema\".\"Odd \"\"Name\"\"\" VALUES ('a', '0'), ('b', '1')")
    su.execute(f'GRANT USAGE ON SCHEMA "My Schema" TO {USER}')
    su.execute(f'GRANT SELECT ON "My Schema"."Odd ""Name""" TO {USER}')
    row = tune(
        conn,
        relation_name='"My Schema"."Odd ""Name"""',
        hyperparams={"dataset_args": {"text_column": "Text Col", "class_column": "Class"}},
    )
    job = conn.execute(
        "SELECT relation_schema, relation_table FROM pgml.jobs WHERE id = %s", (row["job_id"],)
    ).fetchone()
    assert job == {"relation_schema": "My Schema", "relation_table": 'Odd "Name"'}


def test_relation_the_caller_cannot_select(conn: psycopg.Connection[dict[str, Any]], su_dsn: str, reviews: str) -> None:
    """Another user may not train on this user's table (nor learn more than that it may not read it)."""
    with connect(as_login(su_dsn, OTHER_USER)) as other:
        assert_rejected(other, "may not SELECT from public.reviews", f"GRANT SELECT ON public.reviews TO {OTHER_USER}")
        conn.execute(f"GRANT SELECT ON reviews TO {OTHER_USER}")
        assert tune(other)["status"] == "queued"  # once granted, it may


def test_missing_text_and_class_columns(conn: psycopg.Connection[dict[str, Any]], reviews: str) -> None:
    assert_rejected(
        conn,
        "column 'body_text' (dataset_args.text_column) does not exist",
        "columns of public.reviews are: id, text",
        hyperparams={"dataset_args": {"text_column": "body_text", "class_column": "class"}},
    )
    assert_rejected(
        conn,
        "column 'label' (dataset_args.class_column) does not exist",
        "class_column",
        hyperparams={"dataset_args": {"text_column": "text", "class_column": "label"}},
    )
    assert_rejected(
        conn,
        "dataset_args.class_column is required",
        "y_column_name",
        hyperparams={"dataset_args": {"text_column": "text"}},
    )


def test_y_column_name_supplies_the_class_column(conn: psycopg.Connection[dict[str, Any]], reviews: str) -> None:
    row = tune(conn, y_column_name="class", hyperparams={"dataset_args": {"text_column": "text"}})
    hp = conn.execute("SELECT hyperparams FROM pgml.jobs WHERE id = %s", (row["job_id"],)).fetchone()["hyperparams"]
    assert hp["dataset_args"]["class_column"] == "class"


def test_non_text_text_column(conn: psycopg.Connection[dict[str, Any]], reviews: str) -> None:
    assert_rejected(
        conn,
        "has type integer, but it must hold text",
        "CREATE VIEW",
        hyperparams={"dataset_args": {"text_column": "score", "class_column": "class"}},
    )
    tune(conn, hyperparams={"dataset_args": {"text_column": "body", "class_column": "score"}})  # varchar is text


def test_unknown_task(conn: psycopg.Connection[dict[str, Any]], reviews: str) -> None:
    assert_rejected(conn, "unknown task 'summarization'", "'text-classification'", task="summarization")


def test_task_required_for_new_project_and_fixed_per_project(
    conn: psycopg.Connection[dict[str, Any]], reviews: str
) -> None:
    assert_rejected(conn, "task is required", "task =>", task=None)
    tune(conn)
    tune(conn, task=None)  # the project's task
    assert_rejected(
        conn, "is a text-classification project, not conversation", "another project_name", task="conversation"
    )


@pytest.mark.parametrize("size", [0, -0.5, 1, 2.5, None])
def test_test_size_out_of_range(conn: psycopg.Connection[dict[str, Any]], reviews: str, size: float | None) -> None:
    assert_rejected(conn, "out of range", "fraction between 0 and 1", test_size=size)


def test_test_size_row_count_and_sampling(conn: psycopg.Connection[dict[str, Any]], reviews: str) -> None:
    tune(conn, test_size=3, test_sampling="last")
    tune(conn, test_size=0.2, test_sampling="random")
    assert_rejected(conn, "unknown test_sampling 'first'", "'last'", test_sampling="first")


@pytest.mark.parametrize("hp", [[1, 2], "just text", 3])
def test_hyperparams_not_an_object(conn: psycopg.Connection[dict[str, Any]], reviews: str, hp: Any) -> None:
    assert_rejected(conn, "hyperparams must be a JSON object", "training_args", hyperparams=hp)


def test_nested_args_must_be_objects_and_keys_known(conn: psycopg.Connection[dict[str, Any]], reviews: str) -> None:
    assert_rejected(
        conn,
        "hyperparams.training_args must be a JSON object",
        "e.g.",
        hyperparams={"dataset_args": OK_ARGS, "training_args": [1]},
    )
    assert_rejected(
        conn,
        "unknown hyperparams key 'traning_args'",
        "training_args",
        hyperparams={"dataset_args": OK_ARGS, "traning_args": {}},
    )


def test_model_name_required(conn: psycopg.Connection[dict[str, Any]], reviews: str) -> None:
    assert_rejected(conn, "model_name is required", "pgml:<project>", model_name=None)


def test_secrets_are_sealed_never_stored_in_clear(conn: psycopg.Connection[dict[str, Any]], reviews: str) -> None:
    secret = "hf_SuperSecretToken123"
    row = tune(
        conn,
        hyperparams={
            "dataset_args": OK_ARGS,
            "token": secret,
            "training_args": {"hub_token": secret, "num_train_epochs": 1},
        },
    )
    for table in ("jobs", "models", "projects", "job_events", "logs"):
        dump = conn.execute(f"SELECT coalesce(string_agg(t::text, ' '), '') AS d FROM pgml.{table} t").fetchone()["d"]
        assert secret not in dump, f"token stored in clear in pgml.{table}"
    job = conn.execute("SELECT hyperparams, secrets FROM pgml.jobs WHERE id = %s", (row["job_id"],)).fetchone()
    assert "token" not in job["hyperparams"] and "hub_token" not in job["hyperparams"]["training_args"]
    assert job["hyperparams"]["training_args"] == {"num_train_epochs": 1}
    assert job["secrets"].startswith("v2:")


def test_notify_wakes_the_workers_naming_no_job(
    conn_dsn: str, conn: psycopg.Connection[dict[str, Any]], su: psycopg.Connection[dict[str, Any]], reviews: str
) -> None:
    """A queued job wakes the workers; the payload names no job (anyone may LISTEN), but the notices of one
    transaction stay apart (a nonce each), so k jobs queued at once are k wake-ups."""
    with psycopg.connect(conn_dsn, autocommit=True) as listener:
        listener.execute("LISTEN pgml_jobs")
        row = tune(conn)
        notes = [json.loads(n.payload) for n in listener.notifies(timeout=2, stop_after=1)]
        assert [n["type"] for n in notes] == ["job_queued"] and set(notes[0]) == {"type", "nonce"}
        # jobs put back in the queue (requeue, reaped lease) wake the workers too, once each
        other = tune(conn)
        list(listener.notifies(timeout=2, stop_after=1))
        ids = [row["job_id"], other["job_id"]]
        su.execute("UPDATE pgml.jobs SET status = 'running', attempt = 1 WHERE id = ANY(%s)", (ids,))
        su.execute("UPDATE pgml.jobs SET status = 'queued' WHERE id = ANY(%s)", (ids,))
        notes = [json.loads(n.payload) for n in listener.notifies(timeout=2, stop_after=2)]
        assert [n["type"] for n in notes] == ["job_queued"] * 2 and notes[0]["nonce"] != notes[1]["nonce"]


def test_limits_refuse_oversized_requests(ops: psycopg.Connection[dict[str, Any]]) -> None:
    conn = ops  # noop is an administrator's task
    with pytest.raises(psycopg.errors.ProgramLimitExceeded, match=r"hyperparams is \d+ bytes") as e:
        conn.execute(
            "SELECT pgml.tune('big', task => 'noop', model_name => 'none', hyperparams => %s::jsonb)",
            (json.dumps({"seconds": 0, "fail": "x" * 70_000}),),
        )
    assert e.value.diag.message_hint and "relation" in e.value.diag.message_hint
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="max_attempts 1000 is more than 20"):
        conn.execute("SELECT pgml.tune('big', task => 'noop', model_name => 'none', max_attempts => 1000)")
    assert conn.execute("SELECT count(*) AS n FROM pgml.jobs").fetchone() == {"n": 0}


def test_inserts_are_calls(
    conn: psycopg.Connection[dict[str, Any]], su: psycopg.Connection[dict[str, Any]], reviews: str
) -> None:
    """INSERT INTO pgml.tune_requests queues exactly as pgml.tune() does: same checks, snapshot, submitter."""
    hp = json.dumps({"dataset_args": {"text_column": "text", "class_column": "class"}})
    row = conn.execute(
        "INSERT INTO pgml.tune_requests (project_name, task, relation_name, model_name, hyperparams) "
        "VALUES ('by_insert', 'text-classification', 'reviews', 'm', %s::jsonb) RETURNING job_id, status",
        (hp,),
    ).fetchone()
    assert row is not None and row["status"] == "queued"
    job = su.execute("SELECT * FROM pgml.jobs WHERE id = %s", (row["job_id"],)).fetchone()
    assert job["submitted_by"] == USER and job["snapshot_rows"] > 0 and job["snapshot_columns"] == ["text", "class"]
    # many projects in one statement, as an ETL tool would
    many = conn.execute(
        "INSERT INTO pgml.tune_requests (project_name, task, relation_name, model_name, hyperparams) "
        "SELECT 'p' || i, 'text-classification', 'public.reviews', 'm', %s::jsonb FROM generate_series(1, 3) i "
        "RETURNING job_id",
        (hp,),
    ).fetchall()
    assert len({r["job_id"] for r in many}) == 3
    with pytest.raises(psycopg.errors.UndefinedColumn, match=r"dataset_args\.text_column"):
        conn.execute(
            "INSERT INTO pgml.tune_requests (project_name, task, relation_name, model_name, hyperparams) "
            "VALUES ('bad', 'text-classification', 'reviews', 'm', '{\"dataset_args\": {\"text_column\": \"x\"}}')"
        )
    assert conn.execute("SELECT count(*) AS n FROM pgml.jobs").fetchone() == {"n": 4}


def test_every_function_pins_its_search_path(su: psycopg.Connection[dict[str, Any]]) -> None:
    rows = su.execute(
        "SELECT p.proname, p.prokind, p.proconfig FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = 'pgml'"
    ).fetchall()
    unpinned = {r["proname"] for r in rows if "search_path=pg_catalog, pg_temp" not in (r["proconfig"] or [])}
    assert unpinned == {"wait", "_tune_request"}  # both schema-qualify every name instead (see 0008_security)


def psql(dsn: str, sql: str) -> subprocess.CompletedProcess[str]:
    """`psql -c` as a user runs it (default verbosity, context shown for errors)."""
    return subprocess.run(
        [embedded.psql_path(), dsn, "-X", "-v", "VERBOSITY=default", "-c", sql],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("call", "message", "hint"),
    [
        (
            "pgml.tune('p', task => 'summarization', relation_name => 'public.reviews', model_name => 'm')",
            "unknown task 'summarization'",
            "tasks are:",
        ),
        (
            "pgml.tune('p', task => 'text-classification', relation_name => 'public.nope', model_name => 'm')",
            "relation 'public.nope' does not exist",
            "check the spelling",
        ),
        (
            "pgml.tune('p', task => 'text-classification', relation_name => 'public.reviews', model_name => 'm', "
            'hyperparams => \'{"dataset_args": {"text_column": "nope", "class_column": "class"}}\')',
            "column 'nope' (dataset_args.text_column) does not exist",
            "columns of public.reviews are",
        ),
        (
            "pgml.tune('p', task => 'text-classification', relation_name => 'public.reviews', model_name => 'm', "
            'hyperparams => \'{"dataset_args": {"text_column": "text", "class_column": "class"}, '
            '"training_args": {"num_train_epochs": "one"}}\')',
            'training_args.num_train_epochs must be a number, not the string "one"',
            "declares num_train_epochs: float",
        ),
        ("pgml.load_dataset_async('../etc/passwd.csv')", "leaves its directory", "below the workers' datasets"),
        ("pgml.transform('bogus', inputs => ARRAY['x'])", "pgml.transform does not serve task 'bogus'", "serve "),
        (
            # raised in the loopback (pgml.request over dblink): its statement is never shown
            'pgml.transform(\'{"task": "text-classification", "model": "pgml:nope"}\'::jsonb, inputs => ARRAY[\'x\'])',
            "model 'pgml:nope': there is no successful model",
            "SELECT id, project_id, status FROM pgml.models",
        ),
        (
            "INSERT INTO pgml.tune_requests (project_name, task, relation_name, model_name, hyperparams) VALUES "
            "('p', 'text-classification', 'public.reviews', 'm', '{\"dataset_args\": {\"text_column\": \"x\"}}')",
            "column 'x' (dataset_args.text_column) does not exist",
            "columns of public.reviews are",
        ),
    ],
)
def test_psql_shows_the_message_its_hint_and_one_context_line(
    conn_dsn: str, conn: psycopg.Connection[dict[str, Any]], reviews: str, call: str, message: str, hint: str
) -> None:
    r = psql(conn_dsn, call if call.startswith("INSERT") else f"SELECT {call}")
    assert r.returncode == 1, r.stdout
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("ERROR:  ") and message in lines[0], r.stderr
    assert lines[1].startswith("HINT:  ") and hint in lines[1], r.stderr
    context = [line for line in lines if line.startswith("CONTEXT:")]
    assert len(lines) <= 3 and len(context) <= 1, r.stderr  # not 5-8 lines quoting internal PL/pgSQL
    assert "_fail" not in r.stderr and "SQL statement" not in r.stderr, r.stderr
    assert "loopback" not in r.stderr and "dblink" not in r.stderr, r.stderr


def test_no_function_raises_through_pgml_fail(su: psycopg.Connection[dict[str, Any]]) -> None:
    """A check raises where it finds the problem: a call through pgml._fail adds 3 CONTEXT lines to every error
    (re-creating a function from an older migration's text brings it back)."""
    callers = su.execute(
        "SELECT p.oid::regprocedure::text AS f FROM pg_proc p WHERE p.pronamespace = 'pgml'::regnamespace "
        "AND p.prosrc ~ 'pgml\\._fail\\(' ORDER BY 1"
    ).fetchall()
    assert [r["f"] for r in callers] == []


@pytest.mark.parametrize(
    ("args", "message", "hint"),
    [
        (
            {"num_train_epochs": "one"},
            'training_args.num_train_epochs must be a number, not the string "one"',
            '"num_train_epochs": 3.0',
        ),
        ({"per_device_train_batch_size": 2.5}, "per_device_train_batch_size must be a whole number, not 2.5", "int"),
        ({"fp16": "yes"}, 'training_args.fp16 must be true or false, not the string "yes"', "fp16: bool"),
        ({"eval_steps": "ten"}, "training_args.eval_steps must be a number or null", "float | None"),
        ({"lr_scheduler_type": 3}, "training_args.lr_scheduler_type must be a string, not 3", "SchedulerType | str"),
        ({"hub_token": 12345}, "training_args.hub_token must be a string or null, not a JSON number", "str | None"),
    ],
)
def test_training_args_of_the_wrong_type_name_the_key_and_type(
    conn: psycopg.Connection[dict[str, Any]], reviews: str, args: dict[str, Any], message: str, hint: str
) -> None:
    assert_rejected(conn, message, hint, hyperparams={"dataset_args": OK_ARGS, "training_args": args})


def test_training_args_of_the_right_types_pass(conn: psycopg.Connection[dict[str, Any]], reviews: str) -> None:
    args = {
        "num_train_epochs": 3,
        "learning_rate": 2e-5,
        "per_device_train_batch_size": 8.0,
        "fp16": False,
        "eval_steps": None,
        "lr_scheduler_type": "linear",
        "report_to": ["none"],
        "lr_scheduler_kwargs": {},
        "some_future_key": "the worker's to judge",
    }
    assert tune(conn, hyperparams={"dataset_args": OK_ARGS, "training_args": args})["status"] == "queued"


BAD_RANGES = [  # (key, a value out of its range, the range as the error says it)
    ("learning_rate", 0, "greater than 0"),
    ("learning_rate", -0.001, "greater than 0"),
    ("num_train_epochs", 0, "greater than 0"),
    ("per_device_train_batch_size", 0, "at least 1"),
    ("per_device_eval_batch_size", -8, "at least 1"),
    ("gradient_accumulation_steps", 0, "at least 1"),
    ("max_steps", 0, "greater than 0, or -1"),
    ("max_steps", -2, "greater than 0, or -1"),
    ("warmup_steps", -1, "at least 0"),
    ("weight_decay", -0.01, "at least 0"),
    ("logging_steps", 0, "greater than 0"),
    ("eval_steps", -5, "greater than 0"),
    ("save_steps", 0, "greater than 0"),
    ("max_grad_norm", -1, "at least 0"),
    ("seed", -1, "at least 0"),
    ("adam_beta1", 1, "at least 0 and less than 1"),
    ("adam_beta2", -0.1, "at least 0 and less than 1"),
    ("label_smoothing_factor", 1.5, "at least 0 and less than 1"),
]


@pytest.mark.parametrize(("key", "value", "allowed"), BAD_RANGES, ids=[f"{k}={v}" for k, v, _ in BAD_RANGES])
def test_training_args_out_of_range_name_the_key_value_and_range(
    conn: psycopg.Connection[dict[str, Any]], reviews: str, key: str, value: float, allowed: str
) -> None:
    example = conn.execute("SELECT example::text AS e FROM pgml.training_arg_types WHERE key = %s", (key,)).fetchone()
    assert_rejected(
        conn,
        f"training_args.{key} = {value} is out of range: it must be {allowed}",
        f'transformers accepts {key} {allowed}; e.g. "{key}": {example["e"]}',
        hyperparams={"dataset_args": OK_ARGS, "training_args": {key: value}},
    )


def test_training_args_at_the_edges_of_their_ranges_pass(
    conn: psycopg.Connection[dict[str, Any]], reviews: str
) -> None:
    edges = {
        "learning_rate": 1e-12,
        "num_train_epochs": 0.01,
        "per_device_train_batch_size": 1,
        "per_device_eval_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "max_steps": -1,
        "warmup_steps": 0,
        "weight_decay": 0,
        "logging_steps": 0.001,
        "eval_steps": 1,
        "save_steps": 0.5,
        "max_grad_norm": 0,
        "seed": 0,
        "adam_beta1": 0,
        "adam_beta2": 0.999999,
        "label_smoothing_factor": 0,
    }
    assert tune(conn, hyperparams={"dataset_args": OK_ARGS, "training_args": edges})["status"] == "queued"
    assert tune(conn, hyperparams={"dataset_args": OK_ARGS, "training_args": {"max_steps": 1}})["status"] == "queued"
    # every range is of a numeric key the table types (one table for both checks)
    assert not conn.execute(
        "SELECT key FROM pgml.training_arg_types WHERE (min_value IS NOT NULL OR max_value IS NOT NULL) "
        "AND NOT json_types && ARRAY['integer', 'number']"
    ).fetchall()


@pytest.mark.parametrize("value", ["256", 0, 12.5, None])
def test_max_seq_length_must_be_a_positive_whole_number(
    conn: psycopg.Connection[dict[str, Any]], reviews: str, value: Any
) -> None:
    assert_rejected(
        conn,
        "hyperparams.max_seq_length must be a whole number of tokens",
        '"max_seq_length": 256',
        hyperparams={"dataset_args": OK_ARGS, "max_seq_length": value},
    )


def test_the_training_arg_types_are_those_of_the_installed_transformers() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts/training_arg_types.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(
    ("resources", "message", "hint"),
    [
        ([2], "hyperparams.resources must be a JSON object, got a JSON array", '"resources": {"gpus": 4}'),
        ({"gpu": 2}, "unknown key hyperparams.resources.gpu", "are gpus, procs and nodes"),
        ({"gpus": "4"}, "hyperparams.resources.gpus must be a positive whole number, got a JSON string", "procs"),
        ({"procs": 0}, "hyperparams.resources.procs must be a positive whole number, not 0", "procs"),
        ({"procs": 1.5}, "hyperparams.resources.procs must be a positive whole number, not 1.5", "procs"),
        ({"gpus": 65}, "hyperparams.resources.gpus = 65 is more than the most a job may ask for (64)", "gpus"),
        (
            {"nodes": 17, "gpus": 8},
            "hyperparams.resources.nodes = 17 is more than the most a job may ask for (16)",
            "nodes",
        ),
        ({"gpus": 2, "procs": 2}, "hyperparams.resources gives both gpus and procs", "not both"),
    ],
)
def test_resources_are_checked(
    conn: psycopg.Connection[dict[str, Any]], reviews: str, resources: Any, message: str, hint: str
) -> None:
    assert_rejected(conn, message, hint, hyperparams={"dataset_args": OK_ARGS, "resources": resources})


def test_resources_are_kept(conn: psycopg.Connection[dict[str, Any]], reviews: str) -> None:
    row = tune(conn, hyperparams={"dataset_args": OK_ARGS, "resources": {"procs": 2, "nodes": 1}})
    job = conn.execute("SELECT hyperparams FROM pgml.jobs WHERE id = %s", (row["job_id"],)).fetchone()
    assert job["hyperparams"]["resources"] == {"procs": 2, "nodes": 1}
