"""The administrators' allow-list of hub models (pgml.hub_allowlist), enforced at submit and again by the worker
at claim; and private models in a worker's hub cache, served only to a job whose token may read them."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgml_tuned import hub_access, hub_cache, models
from pgml_tuned.child.events import Events
from pgml_tuned.child.store import JobStore
from pgml_tuned.errors import JobError
from tests.conftest import CHILD, USER, as_login, job_row, wait_job
from tests.support import models as testing

Conn = psycopg.Connection[dict[str, Any]]
CLASSIFY = 'hyperparams => \'{"dataset_args": {"text_column": "text", "class_column": "class"}}\''


def reviews(conn: Conn) -> None:
    conn.execute("CREATE TABLE reviews (text text, class text)")
    conn.execute("INSERT INTO reviews SELECT 'review ' || i, (i % 2)::text FROM generate_series(1, 20) i")


def tune(conn: Conn, model_name: str, project: str = "hub", hyperparams: dict[str, Any] | None = None) -> int:
    hp = hyperparams or {"dataset_args": {"text_column": "text", "class_column": "class"}}
    row = conn.execute(
        "SELECT job_id FROM pgml.tune(%s, task => 'text-classification', relation_name => 'public.reviews', "
        "model_name => %s, hyperparams => %s::jsonb)",
        (project, model_name, json.dumps(hp)),
    ).fetchone()
    assert row is not None
    return int(row["job_id"])


def allow(ops: Conn, *patterns: str) -> None:
    for p in patterns:
        ops.execute("SELECT pgml.hub_allow(%s)", (p,))


def test_an_empty_list_allows_every_hub_model(conn: Conn, ops: Conn) -> None:
    reviews(conn)
    assert ops.execute("SELECT count(*) AS n FROM pgml.hub_allowlist").fetchone() == {"n": 0}
    assert conn.execute("SELECT pgml.hub_model_allowed('anyone/anything') AS ok").fetchone() == {"ok": True}
    conn.execute("SELECT pgml.check_hub_model('anyone/anything')")
    assert job_row(conn, tune(conn, "anyone/anything"))["status"] == "queued"


def test_a_hub_model_off_the_list_is_refused_at_submit(conn: Conn, ops: Conn, su: Conn) -> None:
    reviews(conn)
    allow(ops, "pgml-test/*", "distilbert-base-uncased")
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
        tune(conn, "mallory/evil-bert")
    assert "'mallory/evil-bert' is not on the allow-list of hub models" in str(e.value)
    hint = e.value.diag.message_hint or ""
    assert "'distilbert-base-uncased', 'pgml-test/*'" in hint and "pgml.hub_allow('mallory/evil-bert')" in hint
    # refused before anything was kept: no job, no model, no copied rows
    assert su.execute("SELECT count(*) AS n FROM pgml.jobs").fetchone() == {"n": 0}
    assert su.execute("SELECT count(*) AS n FROM pgml.job_rows").fetchone() == {"n": 0}
    assert su.execute("SELECT count(*) AS n FROM pg_tables WHERE schemaname = 'pgml_rows'").fetchone() == {"n": 0}
    # the insertable view goes through the same check
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="mallory/evil-bert"):
        conn.execute(
            "INSERT INTO pgml.tune_requests (project_name, task, relation_name, model_name, hyperparams) "
            "VALUES ('hub', 'text-classification', 'public.reviews', 'mallory/evil-bert', "
            '\'{"dataset_args": {"text_column": "text", "class_column": "class"}}\')'
        )
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not on the allow-list"):
        conn.execute("SELECT pgml.check_hub_model('mallory/evil-bert')")
    # matching entries (compared case-insensitively, as the hub resolves ids) are accepted
    for name in ("pgml-test/tiny-bert", "PGML-Test/Other", "distilbert-base-uncased"):
        assert job_row(conn, tune(conn, name))["status"] == "queued"
    # worker directories and stored models are not hub ids
    assert job_row(conn, tune(conn, "/models/on/the/worker"))["status"] == "queued"
    assert job_row(conn, tune(conn, "pgml:no-such-project"))["status"] == "queued"  # the worker says what is wrong


@pytest.mark.parametrize(
    ("pattern", "name", "allowed"),
    [
        ("org/*", "org/model", True),
        ("org/*", "ORG/Model", True),
        ("org/*", "org2/model", False),
        ("org/*", "org", False),
        ("org/bert-*", "org/bert-base", True),
        ("org/bert-*", "org/roberta-base", False),
        ("Exact/Model", "exact/model", True),
        ("exact/model", "exact/model-2", False),
        ("gpt2", "gpt2", True),
        ("gpt2", "openai-community/gpt2", False),
        ("org/*", "pgml:model:1", True),  # not hub ids: never subject to the list
        ("org/*", "/srv/models/x", True),
        ("org/*", "./x", True),
        ("org/*", "~/x", True),
    ],
)
def test_pattern_semantics(ops: Conn, pattern: str, name: str, allowed: bool) -> None:
    allow(ops, pattern)
    assert ops.execute("SELECT pgml.hub_model_allowed(%s) AS ok", (name,)).fetchone() == {"ok": allowed}


@pytest.mark.parametrize("pattern", ["*", "a/b/c", "", "/srv/models", "org/*x", "pgml:model:1", "org/ model", None])
def test_a_bad_pattern_is_refused(ops: Conn, pattern: str | None) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        ops.execute("SELECT pgml.hub_allow(%s)", (pattern,))
    assert "allow every hub model" in str(e.value) or "is not a hub model id or pattern" in str(e.value)
    assert e.value.diag.message_hint
    assert ops.execute("SELECT count(*) AS n FROM pgml.hub_allowlist").fetchone() == {"n": 0}


def test_only_administrators_manage_the_list(conn: Conn, ops: Conn, su: Conn) -> None:
    for statement in (
        "SELECT pgml.hub_allow('mallory/*')",
        "SELECT pgml.hub_disallow('org/*')",
        "INSERT INTO pgml.hub_allowlist (pattern) VALUES ('mallory/*')",
        "DELETE FROM pgml.hub_allowlist",
        "UPDATE pgml.hub_allowlist SET pattern = 'mallory/*'",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(statement)
    row = ops.execute("SELECT * FROM pgml.hub_allow('Org/*', 'our models')").fetchone()
    assert row is not None and row["pattern"] == "org/*" and row["note"] == "our models"
    assert row["added_by"] == "pgml_test_admin"
    # users (and workers) read it
    assert conn.execute("SELECT pattern, note FROM pgml.hub_allowlist").fetchall() == [
        {"pattern": "org/*", "note": "our models"}
    ]
    assert ops.execute("SELECT (pgml.hub_disallow('ORG/*')).pattern AS p").fetchone() == {"p": "org/*"}
    with pytest.raises(psycopg.errors.NoDataFound, match="no allow-list entry"):
        ops.execute("SELECT pgml.hub_disallow('org/*')")
    # every function of the policy pins its search_path and is owned by pgml_owner
    rows = su.execute(
        "SELECT p.proname, p.proconfig, pg_get_userbyid(p.proowner) AS owner FROM pg_proc p "
        "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'pgml' AND p.proname = ANY (%s)",
        (
            [
                "hub_allow",
                "hub_disallow",
                "hub_model_allowed",
                "check_hub_model",
                "_hub_refusal",
                "_refuse_hub_model",
                "_job_hub_check",
            ],
        ),
    ).fetchall()
    assert len(rows) == 7
    for r in rows:
        assert r["owner"] == "pgml_owner" and "search_path=pg_catalog, pg_temp" in r["proconfig"], r


def stored_model(su: Conn, project: str, base_model: str | None, owner: str = USER) -> int:
    """A successful model of `owner` as a finished job leaves it (base_model: what a LoRA adapter loads onto)."""
    p = su.execute(
        "INSERT INTO pgml.projects (name, task, owner) VALUES (%s, 'conversation', %s) "
        "ON CONFLICT (owner, name) DO UPDATE SET name = EXCLUDED.name RETURNING id",
        (project, owner),
    ).fetchone()
    assert p is not None
    m = su.execute(
        "INSERT INTO pgml.models (project_id, task, model_name, relation_name, hyperparams, owner, status, "
        "base_model) VALUES (%s, 'conversation', 'x', 'x', '{}', %s, 'successful', %s) RETURNING id",
        (p["id"], owner, base_model),
    ).fetchone()
    assert m is not None
    return int(m["id"])


def test_a_stored_adapters_base_model_is_checked(conn: Conn, ops: Conn, su: Conn) -> None:
    reviews(conn)
    allow(ops, "pgml-test/*")
    evil = stored_model(su, "evil_adapter", "mallory/evil-base")
    good = stored_model(su, "good_adapter", "pgml-test/tiny-llama")
    chained = stored_model(su, "chained", f"pgml:model:{evil}")  # an adapter trained on top of a stored one
    full = stored_model(su, "full", None)  # a full model: nothing loads from the hub
    for name in (f"pgml:model:{evil}", "pgml:evil_adapter", f"pgml:model:{chained}"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            tune(conn, name)
        assert f"'mallory/evil-base', the base model of '{name}', is not on the allow-list" in str(e.value)
    for name in (f"pgml:model:{good}", "pgml:good_adapter", f"pgml:model:{full}"):
        assert job_row(conn, tune(conn, name))["status"] == "queued"
    # another user's model is not followed (it is "no such model" to this user: the worker says so)
    theirs = stored_model(su, "theirs", "mallory/evil-base", owner="pgml_test_user2")
    assert job_row(conn, tune(conn, f"pgml:model:{theirs}"))["status"] == "queued"


def test_a_task_that_loads_no_model_is_not_subject(ops: Conn) -> None:
    allow(ops, "pgml-test/*")
    row = ops.execute(
        "SELECT job_id FROM pgml.tune('diag', task => 'noop', model_name => 'none', hyperparams => '{\"seconds\": 0}')"
    ).fetchone()
    assert row is not None and job_row(ops, row["job_id"])["status"] == "queued"


def test_the_worker_checks_again_when_it_claims(conn: Conn, ops: Conn, daemon: Any) -> None:
    """Allowed when submitted, removed from the list before a worker claimed it: the job fails with the same
    message and no child starts."""
    reviews(conn)
    allow(ops, "pgml-test/*", "distilbert-base-uncased")
    job_id = tune(conn, "distilbert-base-uncased")
    ops.execute("SELECT pgml.hub_disallow('distilbert-base-uncased')")
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as submit_error:
        tune(conn, "distilbert-base-uncased")
    d = daemon("--drain")
    assert d.wait(60) == 0
    job = wait_job(conn, job_id, 10)
    assert job["status"] == "failed" and job["attempt"] == 1
    message = submit_error.value.diag.message_primary
    assert message and job["error"] == f"{message} ({submit_error.value.diag.message_hint})"
    assert "pgml.hub_allow('distilbert-base-uncased')" in job["error"]
    assert "job.failed" in d.output() and "read 20 rows" not in d.output()  # no child read the rows


def test_the_child_checks_every_hub_model_it_resolves(ops: Conn, su_dsn: str, tmp_path: Path) -> None:
    """The child's own check (models.resolve) covers hub ids SQL cannot see, e.g. the base model named in the
    adapter_config.json of an adapter in a worker directory."""
    allow(ops, "pgml-test/*")

    store = JobStore(
        as_login(su_dsn, CHILD), "no-ticket", 0, 0, 0, Events(io.StringIO()), tmp_path
    )  # the child's login
    with pytest.raises(JobError, match="'mallory/evil-base' is not on the allow-list"):
        models.resolve("mallory/evil-base", store, tmp_path, lambda *a, **k: None, owner=USER)
    assert store.hub_refusal("pgml-test/tiny", USER) is None


# ---- private models in a worker's cache ---------------------------------------------------------------------

PRIVATE = "acme/private-bert"
TOKEN = "hf_acme_reader_0123456789"


def test_a_private_cached_model_is_served_only_with_a_token_that_fetched_it(
    conn: Conn, daemon: Any, tmp_path: Path
) -> None:
    hf_home = tmp_path / "hf"
    model = testing.build_tiny_classifier_base(tmp_path / "private-bert", hidden=32, layers=1)
    hub_cache.add(model, PRIVATE, hf_home)
    # what the worker records when a job fetches a private model with its token (online)
    hub_access.record_private(PRIVATE, TOKEN, hf_home=hf_home)
    reviews(conn)
    args = {"dataset_args": {"text_column": "text", "class_column": "class"}, "training_args": {"max_steps": 1}}
    without = tune(conn, PRIVATE, "no_token", args)
    other = tune(conn, PRIVATE, "other_token", {**args, "hub_token": "hf_someone_else_000"})
    right = tune(conn, PRIVATE, "right_token", {**args, "training_args": {"max_steps": 1, "hub_token": TOKEN}})
    d = daemon("--drain", env={"HF_HOME": str(hf_home)})
    assert d.wait(180) == 0, d.output()[-3000:]
    a, b, c = (wait_job(conn, j, 10) for j in (without, other, right))
    assert a["status"] == "failed" and b["status"] == "failed", (a["error"], b["error"])
    assert f"model '{PRIVATE}' is private on this worker" in a["error"]
    assert "the job has no Hugging Face token" in a["error"] and '"hub_token": "hf_..."' in a["error"]
    assert "the job's token may not read it" in b["error"]
    assert c["status"] == "succeeded", c["error"]
    # the ledger holds hashes, never a token
    ledger = (hf_home / hub_access.LEDGER_NAME).read_text()
    assert TOKEN not in ledger and hub_access.token_hash(TOKEN) in ledger


def _record_many(hf_home: str, worker: int, n: int) -> None:
    for i in range(n):
        hub_access.record_private(f"org/model-{i % 5}", f"hf_token_{worker}_{i}", hf_home=Path(hf_home))


def test_the_ledger_is_written_atomically_under_a_lock(tmp_path: Path) -> None:
    """Writers in separate processes at once: every record kept (no lost update), the file valid JSON, private
    to the worker, and no temporary file left behind."""
    code = (
        "import sys; from tests.security.test_hub_policy import _record_many; "
        "_record_many(sys.argv[1], int(sys.argv[2]), 40)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(w)], cwd=Path(__file__).parents[2])
        for w in range(4)
    ]
    assert [p.wait(120) for p in procs] == [0, 0, 0, 0]
    path = tmp_path / hub_access.LEDGER_NAME
    ledger = hub_access.read_ledger(path)
    expected = {hub_access.token_hash(f"hf_token_{w}_{i}") for w in range(4) for i in range(40)}
    assert {h for hashes in ledger.values() for h in hashes} == expected
    assert sorted(ledger) == [f"org/model-{i}" for i in range(5)]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [hub_access.LEDGER_NAME, hub_access.LEDGER_NAME + ".lock"]


def test_offline_the_ledger_decides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_access.check_cached_access("public/model", None, hf_home=tmp_path)  # never fetched with a token
    hub_access.record_private("Acme/Secret", TOKEN, hf_home=tmp_path)
    hub_access.check_cached_access("acme/secret", TOKEN, hf_home=tmp_path)
    for token in (None, "", "hf_wrong"):
        with pytest.raises(JobError, match="is private on this worker"):
            hub_access.check_cached_access("ACME/secret", token, hf_home=tmp_path)
    (tmp_path / hub_access.LEDGER_NAME).write_text("{not json")
    with pytest.raises(JobError, match=r"cannot be read.*repair or remove it"):
        hub_access.check_cached_access("public/model", None, hf_home=tmp_path)


class StandInHub(BaseHTTPRequestHandler):
    """The hub's auth-check endpoint as huggingface.co answers it: 200 for a repository the token may read, 404
    with X-Error-Code RepoNotFound for a private one it may not (the hub does not say that it exists)."""

    def do_GET(self) -> None:
        readable = self.path == "/api/models/acme/open/auth-check" or (
            self.path == "/api/models/acme/secret/auth-check" and self.headers.get("authorization") == f"Bearer {TOKEN}"
        )
        self.send_response(200 if readable else 404)
        if not readable:
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("X-Error-Message", "Repository not found")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stand_in_hub() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), StandInHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_online_the_hub_decides_with_the_jobs_own_token(stand_in_hub: str, tmp_path: Path) -> None:
    """The online branch through huggingface_hub's real auth_check (HF_ENDPOINT is read when it is imported, so
    in a fresh interpreter), against a local stand-in for the hub: nothing leaves this machine."""
    script = f"""
import sys
from pathlib import Path
from pgml_tuned import hub_access
from pgml_tuned.errors import JobError
home = Path(sys.argv[1])
def outcome(repo, token):
    try:
        hub_access.check_cached_access(repo, token, hf_home=home)
        return "ok"
    except JobError as e:
        return str(e)
print(outcome("acme/open", None))
print(outcome("acme/secret", {TOKEN!r}))
print(outcome("acme/secret", None))
print(outcome("acme/secret", "hf_wrong"))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN") and "proxy" not in k.lower()}
    env.update(HF_ENDPOINT=stand_in_hub, HF_HUB_DISABLE_IMPLICIT_TOKEN="1", HF_HOME=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[:2] == ["ok", "ok"], out.stdout
    assert "private on this worker (the hub says: RepositoryNotFoundError)" in lines[2]
    assert "no Hugging Face token" in lines[2]
    assert "the job's token may not read it" in lines[3]
