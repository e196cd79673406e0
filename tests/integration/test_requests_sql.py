"""The requests tables' SQL without a serving process: what _request_submit refuses (with a HINT, nothing
queued), whose models a request may use, who may submit and answer, and that nothing piles up."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import OTHER_USER, USER, as_login, connect
from tests.support.stored import add_model

CHAT = [{"role": "user", "content": "hi"}]


def submit(c: psycopg.Connection[dict[str, Any]], kind: Any, model: Any, inputs: Any, args: Any = None) -> int:
    row = c.execute(
        "SELECT pgml._request_submit(%s, %s, %s, %s, %s) AS id",
        (USER, kind, model, None if args is None else Jsonb(args), None if inputs is None else Jsonb(inputs)),
    ).fetchone()
    assert row is not None
    return int(row["id"])


@pytest.mark.parametrize(
    ("kind", "model", "inputs", "args", "message", "hint"),
    [
        ("predict", "m/x", ["a"], None, "unknown request kind 'predict'", "kinds are"),
        ("classify", "", ["a"], None, "a model is required", "pgml:<project>"),
        ("classify", "m/x", None, None, "inputs are empty or NULL", "at least one text"),
        ("classify", "m/x", [], None, "inputs are empty or NULL", "at least one text"),
        ("chat", "m/x", [], None, "inputs are empty or NULL", '"role": "user"'),
        ("classify", "m/x", ["a", None], None, "inputs must be texts", "ARRAY["),
        ("classify", "m/x", ["x" * 1100000], None, "over the limit of 1 MiB", "split them"),
        ("classify", "m/x", ["a"] * 1001, None, "1001 inputs, over the limit of 1000", "split them"),
        ("chat", "m/x", [{"role": "user"}], None, "message 1 is malformed", '"content": "text"'),
        ("chat", "m/x", ["hello"], None, "message 1 is malformed", '"role"'),
        ("chat", "m/x", [{"role": "robot", "content": "x"}], None, "unknown role 'robot'", "roles are"),
        ("classify", "m/x", ["a"], [1], "args must be a JSON object", "max_new_tokens"),
        ("classify", "m/x", ["a"], {"stream": True}, "stream is for generation", "leave"),
        ("chat", "m/x", CHAT, {"timeout": "soon"}, "args.timeout", '"timeout": 30'),
        ("classify", "pgml:model:x", ["a"], None, "numeric id", "pgml:model:42"),
        ("classify", "pgml:nothing", ["a"], None, "there is no successful model in such a project", "pgml.models"),
        ("classify", "pgml:model:999999", ["a"], None, "there is no such model", "pgml.models"),
    ],
)
def test_bad_requests_are_refused_with_a_hint(
    ops: psycopg.Connection[dict[str, Any]],
    kind: str,
    model: str,
    inputs: Any,
    args: Any,
    message: str,
    hint: str,
) -> None:
    with pytest.raises(psycopg.Error) as e:
        submit(ops, kind, model, inputs, args)
    assert message in str(e.value.diag.message_primary)
    assert hint in str(e.value.diag.message_hint)


def test_nothing_is_queued_on_error_and_a_request_wakes_the_lane(
    ops: psycopg.Connection[dict[str, Any]], su: psycopg.Connection[dict[str, Any]]
) -> None:
    with pytest.raises(psycopg.Error):
        submit(ops, "classify", "m/x", [])
    assert su.execute("SELECT count(*) AS n FROM pgml.requests").fetchone() == {"n": 0}
    su.execute("LISTEN pgml_requests")
    rid = submit(ops, "classify", "m/x", ["a"], {"token": "hf_secret", "top_k": 2})
    notes = list(su.notifies(timeout=2, stop_after=1))
    assert notes and notes[0].payload == '{"type": "request_queued"}'  # a wake-up, no data
    row = su.execute("SELECT submitted_by, args, status FROM pgml.requests WHERE id = %s", (rid,)).fetchone()
    assert row == {"submitted_by": USER, "args": {"top_k": 2}, "status": "queued"}  # the token is never stored


def test_a_request_may_use_only_models_its_submitter_may_read(
    ops: psycopg.Connection[dict[str, Any]], su: psycopg.Connection[dict[str, Any]]
) -> None:
    mine = add_model(su, USER, "mine", "text-classification")
    theirs = add_model(su, OTHER_USER, "theirs", "text-classification")
    failed = add_model(su, USER, "broken", "text-classification", status="failed")
    chat = add_model(su, USER, "chatty", "conversation")
    for model in (f"pgml:model:{mine}", "pgml:mine", "mine"):
        submit(ops, "classify", model, ["a"])
    assert su.execute("SELECT array_agg(model ORDER BY id) AS m FROM pgml.requests").fetchone() == {
        "m": [f"pgml:model:{mine}", "pgml:mine", "pgml:mine"]  # a bare project name of the submitter's
    }
    for model in (f"pgml:model:{theirs}", "pgml:theirs"):
        with pytest.raises(psycopg.errors.UndefinedObject, match="there is no"):
            submit(ops, "classify", model, ["a"])
    # "theirs" is not one of the submitter's projects: it is a hub id (served from the hub, if it exists)
    assert submit(ops, "classify", "theirs", ["a"]) > 0
    with pytest.raises(psycopg.Error, match="is failed, not successful"):
        submit(ops, "classify", f"pgml:model:{failed}", ["a"])
    with pytest.raises(psycopg.Error, match="conversation model: it cannot answer a classify"):
        submit(ops, "classify", f"pgml:model:{chat}", ["a"])
    submit(ops, "chat", "pgml:chatty", CHAT)


def test_who_may_submit_claim_and_answer(
    ops: psycopg.Connection[dict[str, Any]], conn: psycopg.Connection[dict[str, Any]], worker_dsn: str
) -> None:
    rid = submit(ops, "classify", "m/x", ["a"])
    # a user may not submit for anyone, nor claim or answer
    for statement in (
        "SELECT pgml._request_submit('pgml_test_user', 'classify', 'm/x', '{}', '[\"a\"]')",
        "SELECT * FROM pgml._requests_claim('me', 10, 5)",
        f"SELECT pgml._request_finish({rid}, 'me', '[]', NULL, NULL)",
        "SELECT * FROM pgml.requests",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(statement)
    with connect(worker_dsn) as worker:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            worker.execute("SELECT pgml._request_submit('pgml_test_user', 'classify', 'm/x', '{}', '[\"a\"]')")
        claimed = worker.execute("SELECT * FROM pgml._requests_claim('w/serving-1', 10, 5)").fetchall()
        assert [r["id"] for r in claimed] == [rid] and claimed[0]["submitted_by"] == USER
        # fenced: another serving process cannot answer it
        assert worker.execute(
            "SELECT pgml._request_finish(%s, 'w/serving-2', '[]', NULL, NULL) AS ok", (rid,)
        ).fetchone() == {"ok": False}
        assert ops.execute("SELECT status FROM pgml._request_answer(%s)", (rid,)).fetchone() == {"status": "running"}
        assert worker.execute(
            'SELECT pgml._request_finish(%s, \'w/serving-1\', \'[{"label": "x", "score": 1}]\', NULL, NULL) AS ok',
            (rid,),
        ).fetchone() == {"ok": True}
    got = ops.execute("SELECT * FROM pgml._request_answer(%s)", (rid,)).fetchone()
    assert got is not None and got["status"] == "done" and got["result"] == [{"label": "x", "score": 1}]
    assert ops.execute("SELECT * FROM pgml._request_answer(%s)", (rid,)).fetchone() is None  # consumed: deleted


def test_lost_requests_retry_once_then_fail_and_nothing_piles_up(
    ops: psycopg.Connection[dict[str, Any]], su: psycopg.Connection[dict[str, Any]], worker_dsn: str
) -> None:
    rid = submit(ops, "classify", "m/x", ["a"])
    with connect(worker_dsn) as worker:
        # a serving process claims it and dies: released by its daemon, queued again; dies again: failed
        for serving, then in (("w/s-1", "queued"), ("w/s-2", "failed")):
            claimed = worker.execute("SELECT id FROM pgml._requests_claim(%s, 1, 5)", (serving,)).fetchall()
            assert [r["id"] for r in claimed] == [rid]
            assert worker.execute("SELECT * FROM pgml._requests_release(%s)", (serving,)).fetchall() == [
                {"id": rid, "status": then}
            ]
        got = ops.execute("SELECT * FROM pgml._request_answer(%s)", (rid,)).fetchone()
        assert got is not None and got["status"] == "failed" and "stopped while answering" in got["error"]
        # a lease that runs out is released by any serving process's housekeeping
        again = submit(ops, "classify", "m/x", ["a"])
        worker.execute("SELECT id FROM pgml._requests_claim('w/s-3', 1, 0.1)")
        time.sleep(0.3)
        assert worker.execute("SELECT * FROM pgml._requests_release(NULL)").fetchall() == [
            {"id": again, "status": "queued"}
        ]
        # nobody picks `late` up by its deadline; an answer nobody consumes goes after a minute
        late = submit(ops, "classify", "m/x", ["a"], {"timeout": 0.2})
        time.sleep(0.3)
        assert worker.execute("SELECT id FROM pgml._requests_claim('w/s-4', 1, 5)").fetchall() == [{"id": again}]
        su.execute(
            "UPDATE pgml.requests SET status = 'done', answered_at = now() - interval '2 minutes' WHERE id = %s",
            (again,),
        )
        assert worker.execute("SELECT pgml._requests_expire() AS n").fetchone() == {"n": 2}
    assert su.execute("SELECT array_agg(id) AS ids FROM pgml.requests").fetchone() == {"ids": None}
    assert late > again


def test_a_user_reads_answers_and_chunks_of_its_own_requests_only(
    ops: psycopg.Connection[dict[str, Any]], su_dsn: str
) -> None:
    """Users submit (pgml.request, the Python client) and read answers themselves: another user's request is not
    there for them (no row, no chunks, nothing to abandon), their own is."""
    rid = submit(ops, "classify", "m/x", ["a"])  # pgml_test_user's, submitted by an administrator vouching for it
    with connect(as_login(su_dsn, OTHER_USER)) as other:
        assert other.execute("SELECT * FROM pgml._request_answer(%s)", (rid,)).fetchall() == []
        assert other.execute("SELECT * FROM pgml._request_chunks(%s)", (rid,)).fetchall() == []
        assert other.execute("SELECT pgml._request_abandon(%s) AS gone", (rid,)).fetchone()["gone"] is False
    with connect(as_login(su_dsn, USER)) as mine:
        assert mine.execute("SELECT status FROM pgml._request_answer(%s)", (rid,)).fetchone()["status"] == "queued"
        own = mine.execute("SELECT pgml.request('classify', 'm/x', '{}', '[\"b\"]') AS id").fetchone()["id"]
        assert mine.execute("SELECT pgml._request_abandon(%s) AS gone", (own,)).fetchone()["gone"] is True


def test_embed_answers_travel_as_binary_float4_arrays(
    ops: psycopg.Connection[dict[str, Any]], su: psycopg.Connection[dict[str, Any]], worker_dsn: str
) -> None:
    """0044: the serving process sends a batch of embed answers as one real[] in binary (answer_vectors, Float4s);
    each request keeps its own vectors bit for bit (the extreme float32 values too); a reader of JSON answers
    (pgml._request_answer: the Python client, a repeatable-read caller) gets the same floats as real[] literals; a
    batch whose sizes do not add up is refused, naming them, and answers nothing."""
    import numpy as np

    from pgml_tuned.db import q
    from pgml_tuned.serving.requests import Float4s

    a = submit(ops, "embed", "m/x", ["one", "two"])
    b = submit(ops, "embed", "m/x", ["three"])
    va = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    vb = np.array([[1e-45, -0.0, 3.4028235e38, -1.1754944e-38, 0.1]], dtype=np.float32)
    params = {"serving_id": "w/s-1", "ids": [a, b], "counts": [2, 1], "dim": 5}
    with connect(worker_dsn) as worker:
        assert len(worker.execute("SELECT id FROM pgml._requests_claim('w/s-1', 10, 5)").fetchall()) == 2
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="11 values are not 2 requests' vectors of 5"):
            worker.execute(q("answer_vectors"), {**params, "flat": Float4s(np.zeros(11, dtype=np.float32))})
        assert su.execute("SELECT count(*) AS n FROM pgml.requests WHERE status = 'running'").fetchone() == {"n": 2}
        # another serving process's answer is fenced off
        got = worker.execute(q("answer_vectors"), {**params, "serving_id": "w/s-2", "flat": Float4s(np.zeros(15))})
        assert got.fetchall() == []
        got = worker.execute(q("answer_vectors"), {**params, "flat": Float4s(np.concatenate([va, vb]))})
        assert sorted(r["id"] for r in got.fetchall()) == sorted([a, b])
    stored = su.execute("SELECT vectors FROM pgml.requests WHERE id = %s", (a,)).fetchone()
    assert stored is not None and np.array_equal(np.asarray(stored["vectors"], dtype=np.float32), va.ravel())
    answer = ops.execute("SELECT status, result FROM pgml._request_answer(%s)", (b,)).fetchone()
    assert answer is not None and answer["status"] == "done"
    (literal,) = answer["result"]
    parsed = np.array([float(x) for x in literal[1:-1].split(",")], dtype=np.float32)
    assert parsed.tobytes() == vb.ravel().tobytes()  # bit for bit, the sign of -0.0 included
