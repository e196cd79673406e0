"""Inference as users call it: pgml.transform (through the loopback), pgml.predict_batch (a job), pgml.deploy, and
the Python client OpenSourceAI — a real daemon and its serving process, tiny models stored in pgml.files or in
the offline hub cache, answers compared with the same transformers code run in this process."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

import pgml_tuned
from tests.conftest import OTHER_USER, as_login, connect, wait_job
from tests.e2e.test_serving import (
    CHAT,
    TEXTS,
    in_process_chat,
    in_process_classify,
    same_answers,
    serving,
    store_model,
    tiny,
)

pytestmark = pytest.mark.slow
__all__ = ["serving", "tiny"]  # fixtures of test_serving, used here too

Conn = psycopg.Connection[dict[str, Any]]


def transform(conn: Conn, model: str, inputs: list[str], args: dict[str, Any] | None = None) -> Any:
    row = conn.execute(
        "SELECT pgml.transform(task => %s::jsonb, args => %s::jsonb, inputs => %s::text[]) AS t",
        (json.dumps({"task": "text-classification", "model": model}), json.dumps(args or {}), inputs),
    ).fetchone()
    assert row is not None
    return row["t"]


def test_transform_serves_stored_models_by_project_and_id_and_follows_deployments(
    serving: Any, conn: Conn, su: Conn, tiny: dict[str, Path]
) -> None:
    first = store_model(su, "pgml_test_user", "reviews", "text-classification", tiny["classifier"])
    second = store_model(su, "pgml_test_user", "reviews", "text-classification", tiny["classifier2"])
    want1, want2 = in_process_classify(tiny["classifier"]), in_process_classify(tiny["classifier2"])
    same_answers(transform(conn, f"pgml:model:{first}", TEXTS), want1)
    conn.execute("SELECT * FROM pgml.deploy('reviews', %s)", (first,))
    same_answers(transform(conn, "pgml:reviews", TEXTS), want1)
    same_answers(transform(conn, "reviews", TEXTS), want1)  # a bare project name of the caller's
    deployed = conn.execute("SELECT * FROM pgml.deploy('reviews', %s::bigint)", (second,)).fetchone()
    assert deployed == {"project": "reviews", "rule": "model_id", "deployed_model_id": second}
    same_answers(transform(conn, "pgml:reviews", TEXTS), want2)  # the new deployment, at once
    assert conn.execute("SELECT * FROM pgml.deploy('reviews', 'rollback')").fetchone()["deployed_model_id"] == first
    same_answers(transform(conn, "pgml:reviews", TEXTS), want1)
    # inside a REPEATABLE READ transaction (whose snapshot cannot see the answer): through the loopback
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        same_answers(transform(conn, f"pgml:model:{first}", TEXTS), want1)
    # another user's project is not theirs to use, by name or by id
    with connect(as_login(conn.info.dsn, OTHER_USER)) as other:
        with pytest.raises(psycopg.Error, match="model"):
            transform(other, f"pgml:model:{first}", TEXTS)
        with pytest.raises(psycopg.errors.NoDataFound):
            other.execute("SELECT * FROM pgml.deploy('reviews', %s::bigint)", (first,))
    assert su.execute("SELECT count(*) AS n FROM pgml.requests").fetchone()["n"] == 0


def test_automatic_deploy_follows_the_key_metric(su: Conn, conn: Conn, tiny: dict[str, Path]) -> None:
    """PostgresML's rule: a new model is deployed when its key metric beats the deployed one's."""

    def finish(model_id: int, metrics: dict[str, float], automatic: bool = True) -> None:
        job = su.execute(
            "INSERT INTO pgml.jobs (project_id, model_id, task, model_name, test_size, test_sampling, status, "
            "submitted_by, automatic_deploy) SELECT project_id, id, task, 'm', 0.25, 'random', 'running', owner, %s "
            "FROM pgml.models WHERE id = %s RETURNING id",
            (automatic, model_id),
        ).fetchone()["id"]
        su.execute("UPDATE pgml.models SET metrics = %s WHERE id = %s", (json.dumps(metrics), model_id))
        su.execute("UPDATE pgml.jobs SET status = 'succeeded' WHERE id = %s", (job,))

    def deployed() -> int:
        return conn.execute("SELECT pgml.deployed_model(id) AS m FROM pgml.projects WHERE name = 'auto'").fetchone()[
            "m"
        ]

    models = [store_model(su, "pgml_test_user", "auto", "text-classification", tiny["classifier"]) for _ in range(4)]
    su.execute("UPDATE pgml.models SET status = 'in_progress' WHERE id = ANY(%s)", (models,))
    finish(models[0], {"eval_accuracy": 0.7})
    assert deployed() == models[0]  # nothing was deployed: the first one is
    finish(models[1], {"eval_accuracy": 0.6})
    assert deployed() == models[0]  # worse: not deployed
    finish(models[2], {"eval_accuracy": 0.9}, automatic=False)
    assert deployed() == models[0]  # better, but its job said automatic_deploy => false
    finish(models[3], {"eval_accuracy": 0.8})
    assert deployed() == models[3]
    assert conn.execute("SELECT * FROM pgml.deploy('auto', 'best_score')").fetchone()["deployed_model_id"] == models[2]


def test_predict_batch_writes_the_per_row_answers(serving: Any, conn: Conn, su: Conn, tiny: dict[str, Path]) -> None:
    model = store_model(su, "pgml_test_user", "batch", "text-classification", tiny["classifier"])
    conn.execute("CREATE TABLE public.to_score (review_id int PRIMARY KEY, body text)")
    bodies = [f"{TEXTS[i % 3]} ({i})" for i in range(45)]
    conn.execute(
        "INSERT INTO public.to_score SELECT i, b FROM unnest(%s::text[]) WITH ORDINALITY AS t (b, i)", (bodies,)
    )
    job = conn.execute(
        "SELECT * FROM pgml.predict_batch(%s, 'to_score', 'scored', text_column => 'body', key_column => 'review_id', "
        "batch_size => 16)",
        (f"pgml:model:{model}",),
    ).fetchone()
    assert job["status"] == "queued" and job["output"] == "pgml.scored"
    conn.execute("CALL pgml.wait(%s)", (job["job_id"],))
    done = wait_job(conn, job["job_id"], 10)
    assert done["status"] == "succeeded", done["error"]
    assert done["metrics"]["rows"] == 45 and done["progress"]["max_steps"] == 3
    got = conn.execute("SELECT key, label, score FROM pgml.scored ORDER BY key::int").fetchall()
    per_row = transform(conn, f"pgml:model:{model}", bodies)
    assert [g["key"] for g in got] == [str(i) for i in range(1, 46)]
    assert [g["label"] for g in got] == [p["label"] for p in per_row]
    assert [g["score"] for g in got] == pytest.approx([p["score"] for p in per_row], abs=1e-4)
    # the table is pgml's (no user's trigger runs as a worker), readable by its submitter only
    with connect(as_login(conn.info.dsn, OTHER_USER)) as other, pytest.raises(psycopg.errors.InsufficientPrivilege):
        other.execute("SELECT * FROM pgml.scored")
    with connect(as_login(conn.info.dsn, OTHER_USER)) as other, pytest.raises(psycopg.Error, match="another user"):
        other.execute("SELECT * FROM pgml.predict_batch('x/y', 'to_score', 'scored')")
    # bad requests are refused before anything is queued
    for sql, match in (
        ("SELECT * FROM pgml.predict_batch('m', 'to_score', 'imdb; drop')", "plain table name"),
        ("SELECT * FROM pgml.predict_batch('m', 'to_score', 'x', batch_size => 0)", "batch_size"),
        (
            "SELECT * FROM pgml.predict_batch('m', 'to_score', 'x', text_column => 'nope', key_column => 'review_id')",
            "nope",
        ),
    ):
        with pytest.raises(psycopg.Error, match=match):
            conn.execute(sql)


def test_transform_with_no_worker_says_so_and_a_caller_that_gives_up_leaves_nothing(conn: Conn, su: Conn) -> None:
    t0 = time.monotonic()
    waited = r"no pgml-tuned worker is serving: the request waited \d+\.\d s and nobody took it"
    with pytest.raises(psycopg.errors.LockNotAvailable, match=waited) as e:
        transform(conn, "org/some-model", ["a"], {"timeout": 1})
    assert time.monotonic() - t0 < 10
    assert "pgml-tuned serve" in e.value.diag.message_hint
    conn.execute("SET statement_timeout = '300ms'")
    with pytest.raises(psycopg.errors.QueryCanceled):
        transform(conn, "org/some-model", ["a"])
    conn.execute("RESET statement_timeout")
    assert su.execute("SELECT count(*) AS n FROM pgml.requests").fetchone()["n"] == 0
    # bad input: a clear error, nothing queued
    for task, inputs, match in (
        ({"task": "summarization", "model": "x/y"}, ["a"], "does not serve task"),
        ({"task": "text-classification"}, ["a"], "needs a model"),
        ({"task": "text-classification", "model": "x/y"}, [], "input"),
    ):
        with pytest.raises(psycopg.Error, match=match):
            conn.execute("SELECT pgml.transform(%s::jsonb, inputs => %s::text[])", (json.dumps(task), inputs))
    assert su.execute("SELECT count(*) AS n FROM pgml.requests").fetchone()["n"] == 0


def test_open_source_ai_as_in_the_guide(serving: Any, conn: Conn, su: Conn, tiny: dict[str, Path]) -> None:
    client = pgml_tuned.OpenSourceAI(conn.info.dsn)
    args = {
        "model": "tiny/llama",
        "token": "TOKEN",
        "load_in_8bit": "true",
        "temperature": 0,
        "repetition_penalty": 1.0,
    }
    ids, text, n = in_process_chat(tiny["llama"], None, CHAT, 12)
    results = client.chat_completions_create(args, CHAT, max_tokens=12)
    assert set(results) >= {"choices", "created", "id", "model", "object", "system_fingerprint", "usage"}
    assert results["object"] == "chat.completion" and results["model"] == "tiny/llama"
    assert results["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert results["usage"] == {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
    # streaming: OpenAI-shaped chunks whose pieces add up to the same answer
    chunks = list(client.chat_completions_create_stream(args, CHAT, max_tokens=12))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] is not None

    # asyncio users
    async def both() -> list[dict[str, Any]]:
        return [
            await client.chat_completions_create_async(args, CHAT, max_tokens=12),
            *[c async for c in client.chat_completions_create_stream_async(args, CHAT, max_tokens=12)],
        ]

    got = anyio.run(both)
    assert got[0]["choices"][0]["message"]["content"] == text
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in got[1:]) == text
    # the rest of the SQL API, thin
    model = store_model(su, "pgml_test_user", "client", "text-classification", tiny["classifier"])
    same_answers(
        client.transform({"task": "text-classification", "model": f"pgml:model:{model}"}, TEXTS),
        in_process_classify(tiny["classifier"]),
    )
    # a conversation model stored in pgml.files (a LoRA adapter on its recorded base), as pgml.tune leaves it
    lora = store_model(su, "pgml_test_user", "fingpt", "conversation", tiny["llama_lora"], base="tiny/llama")
    ids, text, n = in_process_chat(tiny["llama"], tiny["llama_lora"], CHAT, 12)
    for name in (f"pgml:model:{lora}", "pgml:fingpt"):
        got = client.chat_completions_create({**args, "model": name}, CHAT, max_tokens=12)
        assert got["choices"][0]["message"]["content"] == text and got["usage"]["completion_tokens"] == n
    with pytest.raises(ValueError, match="messages"):
        client.chat_completions_create("tiny/llama", [])
    # tune / cancel / wait / logs, thin over the SQL API
    conn.execute("CREATE TABLE public.client_rows (text text, class text)")
    conn.execute(
        "INSERT INTO public.client_rows SELECT 'review ' || i, CASE WHEN i % 2 = 0 THEN 'a' ELSE 'b' END "
        "FROM generate_series(1, 8) i"
    )
    queued = client.tune(
        "client_project",
        task="text-classification",
        relation_name="public.client_rows",
        model_name="tiny/classifier",
        hyperparams={"dataset_args": {"class_column": "class"}},
        priority=0,
    )
    assert queued["status"] == "queued"
    assert client.cancel(queued["job_id"]) in ("cancelled", "cancelling")
    with pytest.raises(pgml_tuned.client.RequestError, match="cancelled"):
        client.wait(queued["job_id"], timeout=30)
    assert isinstance(client.logs(queued["job_id"]), list)
    assert su.execute("SELECT count(*) AS n FROM pgml.requests").fetchone()["n"] == 0
    assert "TOKEN" not in json.dumps(su.execute("SELECT * FROM pgml.requests").fetchall(), default=str)


def test_a_caller_waits_on_the_serving_lock_instead_of_polling(
    serving: Any, conn: Conn, su: Conn, tiny: dict[str, Path]
) -> None:
    """While its request is being answered, the caller's backend sleeps on the advisory lock the serving process
    holds from its claim until its answer is committed (0025), and wakes with the answer."""
    pid = conn.execute("SELECT pg_backend_pid() AS p").fetchone()["p"]
    got: list[Any] = []

    def call_transform() -> None:
        try:
            got.append(
                conn.execute(
                    "SELECT pgml.transform(task => %s::jsonb, inputs => ARRAY['Shares rose'], args => %s::jsonb) AS t",
                    (
                        json.dumps({"task": "text-generation", "model": "tiny/llama"}),
                        json.dumps({"max_new_tokens": 40, "min_new_tokens": 40, "timeout": 120}),
                    ),
                ).fetchone()["t"]
            )
        except Exception as e:
            got.append(e)

    call = threading.Thread(target=call_transform)
    call.start()
    seen: set[tuple[str | None, str | None]] = set()
    while call.is_alive():
        row = su.execute("SELECT wait_event_type, wait_event FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
        seen.add((row["wait_event_type"], row["wait_event"]))
        time.sleep(0.005)
    call.join()
    assert len(got) == 1 and not isinstance(got[0], Exception), got
    assert ("Lock", "advisory") in seen, seen
    assert len(got[0]) == 1 and got[0][0]["finish_reason"] == "length"
    # nothing is left locked: the serving process released its lock, the caller its shared one (in this database:
    # advisory locks are per database, and other tests' are theirs)
    assert su.execute(
        "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    ).fetchone() == {"n": 0}
