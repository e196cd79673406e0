"""A job's token on the real worker (`pgml-tuned serve`): a named credential or an inline token reaches the
child (checked by noop's expect_token_sha256), and nothing else does: every failure to open sealed secrets is
one identical error, a worker without a key never makes one, a missing credential file fails its job clearly,
and after the job the token is in no table, log row or file."""

from __future__ import annotations

import hashlib
import json
import os
import secrets as pyrandom
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgml_tuned.secrets import UNSEAL_ERROR
from tests.conftest import ADMIN, USER, wait_job
from tests.integration.test_migrate_cli import cli

Conn = psycopg.Connection[dict[str, Any]]


def noop(conn: Conn, **hyperparams: Any) -> int:
    row = conn.execute(
        "SELECT job_id FROM pgml.tune('secrets', task => 'noop', model_name => 'none', hyperparams => %s::jsonb)",
        (json.dumps(hyperparams),),
    ).fetchone()
    assert row is not None
    return int(row["job_id"])


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def assert_nowhere(token: str, su: Conn, *directories: Path, daemon_output: str = "") -> None:
    """The token is in no table of schema pgml (bytea as hex too) and in no file under `directories`."""
    tables = [r["t"] for r in su.execute("SELECT tablename AS t FROM pg_tables WHERE schemaname = 'pgml'")]
    assert "jobs" in tables and "logs" in tables and "file_parts" in tables
    for t in tables:
        dump = su.execute(f"SELECT coalesce(string_agg(x::text, ' '), '') AS d FROM pgml.\"{t}\" x").fetchone()
        assert dump is not None and token not in dump["d"] and token.encode().hex() not in dump["d"], t
    assert token not in daemon_output
    for d in directories:
        for path in d.rglob("*"):
            if path.is_file():
                assert token.encode() not in path.read_bytes(), path


@pytest.fixture
def credential(ops: Conn, session_env: Path) -> tuple[str, str]:
    """A credential allowed to the administrator's login, its file on the workers: (name, token)."""
    name, token = f"org-{uuid.uuid4().hex[:8]}", "hf_" + pyrandom.token_urlsafe(24)
    directory = Path(os.environ["PGML_CREDENTIALS_DIR"])
    directory.mkdir(mode=0o700, exist_ok=True)
    (directory / name).write_text(token + "\n")
    ops.execute("SELECT pgml.allow_credential(%s, %s)", (name, ADMIN))
    return name, token


def test_a_named_credential_reaches_the_child_and_nothing_keeps_it(
    ops: Conn, su: Conn, daemon: Any, credential: tuple[str, str], tmp_path: Path, session_env: Path
) -> None:
    name, token = credential
    good = noop(ops, hub_credential=name, expect_token_sha256=sha(token))
    wrong = noop(ops, hub_credential=name, expect_token_sha256=sha("hf_another"))  # the check can fail
    d = daemon("--drain")
    assert d.wait(120) == 0
    assert wait_job(ops, good, 10)["status"] == "succeeded", wait_job(ops, good, 10)["error"]
    failed = wait_job(ops, wrong, 10)
    assert failed["status"] == "failed" and "not the expected one" in failed["error"]
    assert su.execute("SELECT credential FROM pgml.jobs WHERE id = %s", (good,)).fetchone() == {"credential": name}
    assert_nowhere(token, su, tmp_path, session_env / "keyring", daemon_output=d.output())


def test_a_missing_credential_file_or_a_revoked_grant_fails_the_job_clearly(
    ops: Conn, daemon: Any, credential: tuple[str, str]
) -> None:
    ops.execute("SELECT pgml.allow_credential('absent-token', %s)", (ADMIN,))
    missing = noop(ops, hub_credential="absent-token")
    revoked = noop(ops, hub_credential=credential[0])
    ops.execute("SELECT pgml.revoke_credential(%s, %s)", (credential[0], ADMIN))
    daemon("--drain").wait(120)
    job = wait_job(ops, missing, 10)
    assert job["status"] == "failed"
    assert "credential 'absent-token' is not on this worker" in job["error"]
    assert "LoadCredential=absent-token:" in job["error"] and "resubmit" in job["error"]
    job = wait_job(ops, revoked, 10)
    assert job["status"] == "failed" and f"{ADMIN} may no longer use credential '{credential[0]}'" in job["error"]


def test_an_inline_token_reaches_the_child_and_is_gone_after(
    ops: Conn, su: Conn, daemon: Any, tmp_path: Path, session_env: Path
) -> None:
    token = "hf_" + pyrandom.token_urlsafe(24)
    job_id = noop(ops, hub_token=token, expect_token_sha256=sha(token))
    assert su.execute("SELECT secrets LIKE 'v2:%%' AS v2 FROM pgml.jobs WHERE id = %s", (job_id,)).fetchone()["v2"]
    d = daemon("--drain")
    d.wait(120)
    job = wait_job(ops, job_id, 10)
    assert job["status"] == "succeeded", job["error"]
    assert job["secrets"] is None  # deleted when the job ended
    assert_nowhere(token, su, tmp_path, daemon_output=d.output())


def test_every_sealed_secret_that_does_not_belong_is_the_one_error(
    ops: Conn, conn: Conn, su: Conn, daemon: Any
) -> None:
    victim = noop(ops, hub_token="hf_victims_token", expect_token_sha256=sha("hf_victims_token"))
    conn.execute("CREATE TABLE reviews (text text, class text)")
    conn.execute("INSERT INTO reviews SELECT 'review ' || i, (i % 2)::text FROM generate_series(1, 8) i")

    def users_job() -> int:
        row = conn.execute(
            "SELECT job_id FROM pgml.tune('stolen', task => 'text-classification', relation_name => 'reviews', "
            "model_name => 'some/model', hyperparams => "
            '\'{"hub_token": "hf_mine", "dataset_args": {"text_column": "text", "class_column": "class"}}\')'
        ).fetchone()
        assert row is not None
        return int(row["job_id"])

    blob = su.execute("SELECT secrets FROM pgml.jobs WHERE id = %s", (victim,)).fetchone()["secrets"]
    prefix, body = blob.rsplit(":", 1)
    key_id = prefix.split(":")[1]
    attacks = {
        "copied to another user's job": blob,  # the old attack, as a superuser could still do it
        "tampered": f"{prefix}:{'A' * 4}{body[4:]}",
        "unknown key id": blob.replace(key_id, "0123456789abcdef"),
        "an old rsa1 blob": f"rsa1:{key_id}:{body}",
    }
    jobs = {what: users_job() for what in attacks}
    for what, sealed in attacks.items():
        su.execute("UPDATE pgml.jobs SET secrets = %s WHERE id = %s", (sealed, jobs[what]))
    jobs["another submitter"] = users_job()
    su.execute("UPDATE pgml.jobs SET submitted_by = %s WHERE id = %s", (ADMIN, jobs["another submitter"]))
    d = daemon("--drain")
    d.wait(120)
    errors = {what: wait_job(su, job_id, 10)["error"] for what, job_id in jobs.items()}
    assert errors == dict.fromkeys(jobs, UNSEAL_ERROR)
    assert wait_job(ops, victim, 10)["status"] == "succeeded"  # its own job still opens it
    assert d.output().count("job.secrets_unopened") == len(jobs)  # the operator's log line, one per job
    assert "hf_victims_token" not in d.output() and "hf_mine" not in d.output()
    assert USER


def test_a_worker_without_a_key_never_makes_one(ops: Conn, su: Conn, daemon: Any, tmp_path: Path) -> None:
    job_id = noop(ops, hub_token="hf_sealed_for_a_key_this_worker_lacks")
    su.execute("DELETE FROM pgml.sealing_keys")  # no key registered at all
    empty = tmp_path / "no-keys-here"
    d = daemon("--drain", env={"PGML_KEYRING_DIR": str(empty)})
    assert d.wait(120) == 0
    assert wait_job(ops, job_id, 10)["error"] == UNSEAL_ERROR
    assert "job.secrets_unopened" in d.output() and "not in the keyring" in d.output()
    assert su.execute("SELECT count(*) AS n FROM pgml.sealing_keys").fetchone() == {"n": 0}
    assert not empty.exists()
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".pem", ".key")]
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="no sealing key is active"):
        noop(ops, hub_token="hf_x")


def test_keys_cli_generates_and_registers(su_dsn: str, ops: Conn, tmp_path: Path) -> None:
    key_file = tmp_path / "pgml-key.pem"
    out = cli("keys", "generate", "--out", str(key_file), "--bits", "2048")
    assert out.returncode == 0, out.stderr
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert cli("keys", "generate", "--out", str(key_file)).returncode == 2  # never overwritten
    reg = cli("keys", "register", str(key_file), "--dsn", su_dsn)
    assert reg.returncode == 0 and "registered and active" in reg.stdout, reg.stderr
    key_id = reg.stdout.split()[1]
    assert ops.execute("SELECT key_id FROM pgml.sealing_keys WHERE active").fetchone() == {"key_id": key_id}
    listed = cli("keys", "list", "--dsn", su_dsn)
    assert f"key_id={key_id}  active=True" in listed.stdout
    assert cli("keys", "retire", key_id, "--dsn", su_dsn).returncode == 0
    assert ops.execute("SELECT count(*) AS n FROM pgml.sealing_keys WHERE active").fetchone() == {"n": 0}
