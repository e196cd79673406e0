"""NOTIFY payloads on shared channels carry nothing another user may not read (issue 20, class 8).

In PostgreSQL any session may LISTEN on any channel, so a payload is as public as the channel's name. Another
ordinary user listens on every channel the schema notifies (found by reading the pg_notify calls out of the SQL
files, so a new channel is covered by this test) while bob queues, cancels and finishes jobs, has requests
answered (the Python client and pgml.transform's loopback) and deploys a model. Nothing it hears may name bob's
job, request, project or model ids, or his project's name; and bob's own waiters still wake at once.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgml_tuned
from tests.conftest import OTHER_USER, REPO, as_login, connect, wait_job, wait_serving
from tests.e2e.test_serving import TEXTS, build_classifier, store_model
from tests.support import models as testing

pytestmark = pytest.mark.slow

Conn = psycopg.Connection[dict[str, Any]]
PROJECT = "bobs_secret_reviews"  # a model of bob's, served and deployed
JOBS = "bobs_secret_jobs"  # bob's noop jobs
NOTIFY_CALL = re.compile(r"pg_notify\s*\(\s*'([A-Za-z_][A-Za-z0-9_]*)'", re.IGNORECASE)


def channels_notified() -> set[str]:
    """Every channel a pg_notify call of the SQL the project installs or sends names literally."""
    files = [*sorted((REPO / "sql" / "functions").glob("*.sql")), *sorted((REPO / "sql").glob("*.sql"))]
    found: set[str] = set()
    for path in files:
        if path.name == "schema.sql":  # a snapshot of the functions above
            continue
        found |= set(NOTIFY_CALL.findall(path.read_text()))
    return found


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("notify-models")
    return build_classifier(testing.build_tiny_classifier_base(root / "bert"), root / "classifier", 1)


def drain(conn: Conn, quiet: float = 1.0) -> list[psycopg.Notify]:
    """Every notification `conn` has received, until none came for `quiet` seconds."""
    got: list[psycopg.Notify] = []
    while True:
        batch = list(conn.notifies(timeout=quiet))
        if not batch:
            return got
        got += batch


def values(doc: Any) -> list[Any]:
    """Every key and scalar value in a parsed JSON document."""
    if isinstance(doc, dict):
        return [*doc.keys(), *(v for x in doc.values() for v in values(x))]
    if isinstance(doc, list):
        return [v for x in doc for v in values(x)]
    return [doc]


def tune_noop(conn: Conn, seconds: float) -> int:
    row = conn.execute(
        "SELECT job_id FROM pgml.tune(%s, task => 'noop', model_name => 'none', hyperparams => %s::jsonb)",
        (JOBS, json.dumps({"seconds": seconds})),
    ).fetchone()
    assert row is not None
    return int(row["job_id"])


def test_a_listener_learns_no_ids_of_another_users_work(
    conn: Conn, conn_dsn: str, su: Conn, su_dsn: str, daemon: Any, classifier: Path
) -> None:
    channels = channels_notified()
    assert {"pgml_jobs", "pgml_job_status", "pgml_control", "pgml_logs", "pgml_answers"} <= channels, channels
    su.execute("UPDATE pgml.tasks SET admin_only = false WHERE name = 'noop'")  # bob is an ordinary user
    model = store_model(su, "pgml_test_user", PROJECT, "text-classification", classifier)

    with connect(as_login(su_dsn, OTHER_USER)) as alice, connect(conn_dsn) as bob_waits:
        for channel in sorted(channels):
            alice.execute(f"LISTEN {channel}")
        bob_waits.execute("LISTEN pgml_job_status")

        # a queued job, cancelled before any worker runs: bob's waiter hears of it at once
        queued = tune_noop(conn, 0)
        drain(bob_waits, 0.3)
        t0 = time.monotonic()
        assert conn.execute("SELECT pgml.cancel(%s) AS s", (queued,)).fetchone()["s"] == "cancelled"
        assert list(bob_waits.notifies(timeout=5, stop_after=1)), "bob's LISTEN pgml_job_status heard nothing"
        assert time.monotonic() - t0 < 2.0
        assert conn.execute("SELECT status FROM pgml.jobs WHERE id = %s", (queued,)).fetchone()["status"] == "cancelled"

        # a running job, cancelled (pgml_control), then one that finishes, followed by bob's waiters
        daemon()
        wait_serving(su)
        running = tune_noop(conn, 60)
        wait_job(conn, running, 60, statuses=("running",))
        assert conn.execute("SELECT pgml.cancel(%s) AS s", (running,)).fetchone()["s"] == "cancelling"
        assert wait_job(conn, running, 30)["status"] == "cancelled"
        finished = tune_noop(conn, 0)
        client = pgml_tuned.OpenSourceAI(conn_dsn, timeout=60)
        assert client.wait(finished, timeout=60)["status"] == "succeeded"
        conn.execute("CALL pgml.wait(%s, timeout_seconds => 30)", (finished,))

        # requests answered: the Python client's, and pgml.transform's through the loopback
        spec = {"task": "text-classification", "model": f"pgml:model:{model}"}
        assert len(client.transform(spec, TEXTS)) == len(TEXTS)
        row = conn.execute(
            "SELECT pgml.transform(task => %s::jsonb, inputs => %s::text[]) AS t", (json.dumps(spec), TEXTS)
        ).fetchone()
        assert len(row["t"]) == len(TEXTS)
        # a deployment
        conn.execute("SELECT * FROM pgml.deploy(%s, %s::bigint)", (PROJECT, model))

        heard = drain(alice)

    jobs = [r["id"] for r in su.execute("SELECT id FROM pgml.jobs WHERE submitted_by = 'pgml_test_user'")]
    assert set(jobs) == {queued, running, finished}
    models = [r["id"] for r in su.execute("SELECT id FROM pgml.models WHERE owner = 'pgml_test_user'")]
    projects = [r["id"] for r in su.execute("SELECT id FROM pgml.projects WHERE owner = 'pgml_test_user'")]
    last_request = su.execute(
        "SELECT last_value FROM pg_catalog.pg_sequences WHERE schemaname = 'pgml' AND sequencename = 'requests_id_seq'"
    ).fetchone()["last_value"]
    assert last_request is not None and last_request >= 2
    requests = list(range(1, last_request + 1))
    secret_ids = {*jobs, *models, *projects, *requests}

    by_channel = {c: [n.payload for n in heard if n.channel == c] for c in channels}
    unheard = sorted(c for c, payloads in by_channel.items() if not payloads)
    assert not unheard, f"channels this test never made speak (extend the scenario): {unheard}"
    for note in heard:
        where = f"{note.channel} {note.payload!r}"
        for name in (PROJECT, JOBS, "pgml_test_user"):
            assert name not in note.payload, where
        try:
            doc = json.loads(note.payload) if note.payload else None
        except json.JSONDecodeError:
            doc = note.payload
        named = [v for v in values(doc) if isinstance(v, int) and not isinstance(v, bool) and v in secret_ids]
        assert not named, f"{where} names bob's ids {named}"
        for n in secret_ids:  # nor as a number anywhere in the text (an id as a string, a key, a list)
            assert not re.search(rf"(?<![0-9A-Za-z]){n}(?![0-9A-Za-z])", note.payload), f"{where} contains {n}"
