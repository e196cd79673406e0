"""Shared lanes are fair and bounded (issue 20, class 4), as ordinary pgml_user logins meet them:

- one user's flood of pgml.request calls (40 x 1000 texts) does not starve another user's pgml.transform: the lane
  claims fairly across submitters (weighted by texts), so the other call is answered while the flood still waits;
- each login may have only so many requests and texts pending (pgml.role_limits), the next one refused saying which
  limit and how to change it;
- request args pass an allow-list per kind (num_workers, device_map, trust_remote_code, ... refused at submit, naming
  them and what is allowed), and the serving process checks the same list again;
- hyperparams.resources is bounded by the submitter's caps (pgml.role_limits) and by what the live fleet can give.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import OTHER_USER, USER, as_login, connect, wait_for
from tests.integration.test_tune_validation import OK_ARGS, tune
from tests.support import models as testing
from tests.support.stored import add_model

Conn = psycopg.Connection[dict[str, Any]]


def limits(su: Conn, role: str, **caps: int | None) -> None:
    """A row of pgml.role_limits for `role`: pgml_user's, with `caps` where this schema has such columns."""
    have = {
        r["column_name"]
        for r in su.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = 'pgml' AND table_name = 'role_limits'"
        ).fetchall()
    }
    su.execute("DELETE FROM pgml.role_limits WHERE role = %s", (role,))
    su.execute(
        "INSERT INTO pgml.role_limits SELECT (jsonb_populate_record(NULL::pgml.role_limits, "
        "to_jsonb(l) || jsonb_build_object('role', %s::text))).* FROM pgml.role_limits l WHERE l.role = 'pgml_user'",
        (role,),
    )
    for column, value in caps.items():
        if column in have:
            su.execute(f"UPDATE pgml.role_limits SET {column} = %s WHERE role = %s", (value, role))


def request(conn: Conn, kind: str, model: str, inputs: Any, args: Any = None) -> int:
    row = conn.execute(
        "SELECT pgml.request(%s, %s, %s, %s) AS id", (kind, model, Jsonb(args or {}), Jsonb(inputs))
    ).fetchone()
    assert row is not None
    return int(row["id"])


def answered(su: Conn, request_id: int, timeout: float = 120) -> None:
    def done() -> bool:
        row = su.execute("SELECT status FROM pgml.requests WHERE id = %s", (request_id,)).fetchone()
        return row is not None and row["status"] in ("done", "failed")

    wait_for(done, timeout, what=f"request {request_id} to be answered")


def refused(conn: Conn, sql: str, params: Any = None) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as info:
        conn.execute(sql, params)
    return info.value


# ---- fairness ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("fair-lanes")
    base = testing.build_tiny_classifier_base(root / "bert")
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    model.save_pretrained(root / "classifier")
    AutoTokenizer.from_pretrained(base).save_pretrained(root / "classifier")
    return root / "classifier"


@pytest.mark.slow
@pytest.mark.serial  # a bound on how long the other user waits
def test_one_users_flood_does_not_starve_another_users_transform(
    su: Conn, conn: Conn, daemon: Any, classifier: Path
) -> None:
    limits(su, USER, max_pending_requests=40, max_pending_inputs=40 * 1000)  # room for the whole flood
    add_model(su, USER, "flood", "text-classification", path=classifier)
    add_model(su, OTHER_USER, "mine", "text-classification", path=classifier)
    daemon()
    transform = "SELECT pgml.transform(%s::jsonb, args => %s::jsonb, inputs => %s::text[]) AS t"
    with connect(as_login(su.info.dsn, OTHER_USER)) as other:
        task = json.dumps({"task": "text-classification", "model": "pgml:mine"})
        # both models warm (the first call waits for the serving process to start and load them)
        assert other.execute(transform, (task, json.dumps({"timeout": 120}), ["warm"])).fetchone()
        answered(su, request(conn, "classify", "pgml:flood", ["warm"]))
        texts = [f"great film {i}" for i in range(1000)]
        flood = [request(conn, "classify", "pgml:flood", texts) for _ in range(40)]
        t0 = time.monotonic()
        got = other.execute(transform, (task, json.dumps({"timeout": 120}), ["Shares rose"])).fetchone()
        waited = time.monotonic() - t0
    assert got is not None and len(got["t"]) == 1
    still = su.execute(
        "SELECT count(*) AS n FROM pgml.requests WHERE id = ANY(%s) AND status = 'queued'", (flood,)
    ).fetchone()["n"]
    # FIFO over everyone answered the whole flood first (40,000 texts); the fair claim takes the one text next
    assert still >= 20, f"the other user's call was answered only after {40 - still} of the 40 flood requests"
    assert waited < 30, f"the other user's transform waited {waited:.1f} s behind the flood"


def test_the_claim_alternates_between_submitters_weighted_by_texts(su: Conn, conn: Conn) -> None:
    limits(su, USER, max_pending_requests=None, max_pending_inputs=None)
    with connect(as_login(su.info.dsn, OTHER_USER)) as other:
        big = [request(conn, "classify", "m/x", ["a text"] * 500) for _ in range(5)]
        small = [request(other, "classify", "m/x", ["one"]) for _ in range(3)]
    worker = su  # the serving process's call, as its owner runs it
    first = [r["id"] for r in worker.execute("SELECT id FROM pgml._requests_claim('w/s-1', 64, 5, 256)").fetchall()]
    # the other user's short requests go before the flood's first, whoever came first; one big one fills the rest
    assert first == [*small, big[0]], (first, small, big)
    rest = [r["id"] for r in worker.execute("SELECT id FROM pgml._requests_claim('w/s-1', 64, 5, 256)").fetchall()]
    assert rest == [big[1]]


def test_the_claim_stays_cheap_with_many_pending_requests(su: Conn) -> None:
    """50 submitters x 100 queued requests: a claim walks each submitter's first few, not all 5000 rows."""
    su.execute(
        "INSERT INTO pgml.requests (submitted_by, kind, model, inputs, deadline, n_inputs) "
        "SELECT 'user' || (i % 50), 'classify', 'm/x', '[\"t\"]', clock_timestamp() + interval '1 hour', 1 "
        "FROM generate_series(1, 5000) i"
    )
    su.execute("ANALYZE pgml.requests")
    times = []
    for _ in range(5):
        with su.transaction(force_rollback=True):
            t0 = time.perf_counter()
            got = su.execute("SELECT * FROM pgml._requests_claim('w/s-1', 64, 5, 512)").fetchall()
            times.append(time.perf_counter() - t0)
            assert len(got) == 64 and len({r["submitted_by"] for r in got}) == 50  # every submitter, one first
    best = min(times)
    assert best < 0.25, f"a claim over 5000 pending requests took {best * 1000:.0f} ms"


# ---- per-login caps on the lane ------------------------------------------------------------------------------------
def test_pending_requests_and_texts_are_capped_per_login(su: Conn, conn: Conn) -> None:
    limits(su, USER, max_pending_requests=40, max_pending_inputs=100)
    ids = [request(conn, "classify", "m/x", ["a", "b"]) for _ in range(40)]
    e = refused(conn, "SELECT pgml.request('classify', 'm/x', '{}', '[\"one more\"]')")
    assert isinstance(e, psycopg.errors.ProgramLimitExceeded), e
    assert f"{USER} has 40 requests pending in the inference lane; the limit for {USER} is 40" in str(
        e.diag.message_primary
    )
    assert "pgml.role_limits.max_pending_requests" in str(e.diag.message_hint)
    # pgml.transform says the same, and queues nothing
    e = refused(
        conn,
        'SELECT pgml.transform(\'{"task": "text-classification", "model": "m/x"}\'::jsonb, inputs => ARRAY[\'x\'])',
    )
    assert "requests pending in the inference lane" in str(e.diag.message_primary)
    # another login is not held by this one's cap
    with connect(as_login(su.info.dsn, OTHER_USER)) as other:
        assert request(other, "classify", "m/x", ["mine"]) > 0
    # texts: 78 pending once one request is abandoned; 23 more are over 100
    conn.execute("SELECT pgml._request_abandon(%s)", (ids[0],))
    e = refused(conn, "SELECT pgml.request('classify', 'm/x', '{}', %s)", (Jsonb(["t"] * 23),))
    assert "has 78 texts pending in the inference lane and this request adds 23; the limit for" in str(
        e.diag.message_primary
    )
    assert "max_pending_inputs" in str(e.diag.message_hint)
    assert request(conn, "classify", "m/x", ["t"] * 22) > 0  # up to the cap is fine
    # an administrator raises them
    su.execute(
        "UPDATE pgml.role_limits SET max_pending_requests = 100, max_pending_inputs = 1000 WHERE role = %s", (USER,)
    )
    assert request(conn, "classify", "m/x", ["t"]) > 0


def test_the_default_caps_refuse_the_flood_of_the_issue(conn: Conn) -> None:
    texts = ["x"] * 1000
    for _ in range(10):
        request(conn, "classify", "m/x", texts)
    e = refused(conn, "SELECT pgml.request('classify', 'm/x', '{}', %s)", (Jsonb(texts),))
    assert "texts pending in the inference lane" in str(e.diag.message_primary), e


# ---- the args allow-list -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "args", "message", "hint"),
    [
        ("classify", {"num_workers": 64}, "args num_workers is not allowed in a classify request", "batch_size"),
        (
            "classify",
            {"device_map": "auto", "trust_remote_code": True},
            "args device_map, trust_remote_code are not allowed in a classify request",
            "top_k (integer 1..1000)",
        ),
        ("generate", {"model_kwargs": {"x": 1}}, "args model_kwargs is not allowed in a generate request", "num_beams"),
        ("chat", {"torch_dtype": "float8"}, "args torch_dtype is not allowed in a chat request", "max_new_tokens"),
        ("chat", {"device": "cuda:7"}, "args device is not allowed in a chat request", "temperature"),
        ("classify", {"batch_size": 100000}, "args.batch_size = 100000: a classify request takes a whole number", "64"),
        ("generate", {"max_new_tokens": 100000}, "from 1 to 4096", '"max_new_tokens": 4096'),
        ("generate", {"num_beams": 64}, "args.num_beams = 64", '"num_beams": 8'),
        ("classify", {"top_k": "all"}, 'args.top_k = "all"', ""),
        ("classify", {"function_to_apply": "exec"}, "one of sigmoid, softmax, none", ""),
    ],
)
def test_request_args_outside_the_allow_list_are_refused(
    su: Conn, conn: Conn, kind: str, args: dict[str, Any], message: str, hint: str
) -> None:
    inputs: Any = [{"role": "user", "content": "hi"}] if kind == "chat" else ["hi"]
    e = refused(conn, "SELECT pgml.request(%s, 'm/x', %s, %s)", (kind, Jsonb(args), Jsonb(inputs)))
    assert isinstance(e, psycopg.errors.InvalidParameterValue), e
    assert message in str(e.diag.message_primary), e.diag.message_primary
    assert hint in str(e.diag.message_hint), e.diag.message_hint
    assert su.execute("SELECT count(*) AS n FROM pgml.requests").fetchone()["n"] == 0


def test_transform_task_options_pass_the_same_allow_list(su: Conn, conn: Conn) -> None:
    e = refused(
        conn,
        "SELECT pgml.transform(%s::jsonb, inputs => ARRAY['x'])",
        (json.dumps({"task": "text-classification", "model": "m/x", "num_workers": 8}),),
    )
    assert "args num_workers is not allowed in a classify request" in str(e.diag.message_primary)
    assert su.execute("SELECT count(*) AS n FROM pgml.requests").fetchone()["n"] == 0
    # what the guide and PostgresML's clients send is accepted (options the worker decides are ignored)
    ok = {"token": "hf_x", "load_in_8bit": "true", "load_in_4bit": False, "temperature": 0, "max_tokens": 12}
    assert request(conn, "chat", "m/x", [{"role": "user", "content": "hi"}], ok) > 0
    assert request(conn, "classify", "m/x", ["x"], {"top_k": 2, "truncation": True, "timeout": 5}) > 0


def test_the_serving_process_checks_the_same_allow_list(su: Conn) -> None:
    from pgml_tuned.errors import JobError
    from pgml_tuned.serving import inference

    rows = su.execute("SELECT * FROM pgml._request_args()").fetchall()
    sql = {
        (r["kind"], r["key"]): (
            r["type"],
            r["use"],
            None if r["min"] is None else float(r["min"]),
            None if r["max"] is None else float(r["max"]),
            r["choices"],
        )
        for r in rows
    }
    py = {
        (kind, key): (
            a.type,
            a.use,
            None if a.min is None else float(a.min),
            None if a.max is None else float(a.max),
            None if a.choices is None else list(a.choices),
        )
        for kind, keys in inference.ARGS.items()
        for key, a in keys.items()
    }
    assert sql == py
    with pytest.raises(JobError, match="num_workers is not allowed"):
        inference.check_args("classify", {"num_workers": 4, "top_k": 2})
    with pytest.raises(JobError, match="batch_size"):
        inference.check_args("classify", {"batch_size": 4096})
    assert inference.pipeline_args({"top_k": 2, "timeout": 3, "load_in_8bit": True}) == {"top_k": 2}
    assert "device_map" not in inference.generation_kwargs({"max_tokens": 3, "device_map": "auto", "stream": True})


# ---- resources -----------------------------------------------------------------------------------------------------
def register(su: Conn, worker: str, gpus: int, cpus: int) -> None:
    su.execute(
        "SELECT pgml._worker_register(%s, 'token-0123456789abcdef', 'h', 1, 'v', %s, %s, 1, 60, 120)",
        (worker, Jsonb([{"index": str(i)} for i in range(gpus)]), gpus),
    )
    if su.execute(
        "SELECT 1 FROM information_schema.columns WHERE table_schema = 'pgml' AND table_name = 'workers' "
        "AND column_name = 'cpus'"
    ).fetchone():
        su.execute("UPDATE pgml.workers SET cpus = %s WHERE id = %s", (cpus, worker))


def resources(conn: Conn, res: dict[str, int]) -> dict[str, Any]:
    return tune(conn, hyperparams={"dataset_args": OK_ARGS, "resources": res})


def test_resources_past_the_role_caps_are_refused_even_with_no_fleet(
    su: Conn,
    conn: Conn,
    reviews: str,
) -> None:
    before = su.execute("SELECT count(*) AS n FROM pgml.jobs").fetchone()["n"]
    for res, key in (({"procs": 64}, "procs"), ({"nodes": 16}, "nodes"), ({"gpus": 64}, "gpus")):
        e = refused(
            conn,
            "SELECT * FROM pgml.tune('p', 'text-classification', 'public.reviews', model_name => 'some/model', "
            "hyperparams => %s::jsonb)",
            (json.dumps({"dataset_args": OK_ARGS, "resources": res}),),
        )
        assert isinstance(e, psycopg.errors.ProgramLimitExceeded), e
        assert (
            f"hyperparams.resources.{key} = {res[key]} is more than {USER} may ask for: the limit for pgml_user"
            in str(e.diag.message_primary)
        )
        assert f"pgml.role_limits.max_{key}" in str(e.diag.message_hint)
    assert su.execute("SELECT count(*) AS n FROM pgml.jobs").fetchone()["n"] == before
    # within the caps, with no live worker at all (a fresh install): queued, as before
    assert resources(conn, {"procs": 2})["status"] == "queued"
    # an administrator's row for the login raises them
    limits(su, USER, max_procs=64)
    assert resources(conn, {"procs": 16})["status"] == "queued"


def test_resources_past_the_live_fleet_are_refused(su: Conn, conn: Conn, ops: Conn, reviews: str) -> None:
    register(su, "fleet-1", gpus=2, cpus=4)
    register(su, "fleet-2", gpus=1, cpus=4)
    cases = [
        (
            {"gpus": 4},
            "hyperparams.resources.gpus = 4 is more than the fleet can give: the most GPUs on one live "
            "worker is 2 (2 live workers)",
        ),
        (
            {"procs": 6},
            "hyperparams.resources.procs = 6 is more than the fleet can give: the most CPUs on one live worker is 4",
        ),
    ]
    for res, message in cases:
        e = refused(
            conn,
            "SELECT * FROM pgml.tune('p', 'text-classification', 'public.reviews', model_name => 'some/model', "
            "hyperparams => %s::jsonb)",
            (json.dumps({"dataset_args": OK_ARGS, "resources": res}),),
        )
        assert isinstance(e, psycopg.errors.InsufficientResources), (res, e)
        assert message in str(e.diag.message_primary), e.diag.message_primary
        assert "pgml.worker_status" in str(e.diag.message_hint)
    for res in ({"gpus": 2}, {"procs": 4}, {"nodes": 2, "gpus": 1}, {"nodes": 2, "procs": 2}):
        assert resources(conn, res)["status"] == "queued", res
    # a gang of more workers than are live waits for them to join (pgml.tune says so; it fails clearly if they do
    # not come), up to the role's max_nodes
    seen_user: list[str] = []
    conn.add_notice_handler(lambda d: seen_user.append(d.message_primary or ""))
    assert resources(conn, {"nodes": 3})["status"] == "queued"
    assert any("asks for 3 workers at once" in m for m in seen_user), seen_user
    # an administrator (no limits of their own) may queue for a worker about to start: warned, not refused
    ops.execute(
        "CREATE TABLE public.admin_rows AS SELECT 'text ' || i AS text, CASE WHEN i % 2 = 0 THEN 'a' ELSE 'b' END "
        "AS class FROM generate_series(1, 10) i"
    )
    seen: list[str] = []
    ops.add_notice_handler(lambda d: seen.append(d.message_primary or ""))
    row = ops.execute(
        "SELECT status FROM pgml.tune('a', 'text-classification', 'public.admin_rows', model_name => 'some/model', "
        "hyperparams => %s::jsonb)",
        (json.dumps({"dataset_args": OK_ARGS, "resources": {"gpus": 4}}),),
    ).fetchone()
    assert row is not None and row["status"] == "queued"
    assert any("asks for 4 GPUs" in m for m in seen), seen


def test_a_claim_is_bounded_in_texts(su: Conn, conn: Conn) -> None:
    """Two 1000-text requests are not claimed together: what waits behind a batch waits for one of them at most."""
    limits(su, USER, max_pending_requests=None, max_pending_inputs=None)
    a = request(conn, "classify", "m/x", ["t"] * 1000)
    b = request(conn, "classify", "m/x", ["t"] * 1000)
    got = [r["id"] for r in su.execute("SELECT id FROM pgml._requests_claim('w/s-1', 64, 5, 512)").fetchall()]
    assert got == [a] and b > a
