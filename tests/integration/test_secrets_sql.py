"""Secrets at submit time, in SQL (sql/migrations/0009_secrets.sql): inline tokens sealed in PL/pgSQL with
RSA-OAEP to the administrator's active key and opened by the workers' library code (pgml_tuned.secrets);
named credentials checked against the administrators' grants. Real PostgreSQL, real roles."""

from __future__ import annotations

import json
import os
import secrets as pyrandom
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from pgml_tuned import secrets as sec
from pgml_tuned.secrets import UNSEAL_ERROR, Keyring, SecretError
from tests.conftest import OTHER_USER, USER, WORKER, as_login, connect
from tests.integration.test_tune_validation import OK_ARGS, assert_rejected, tune

Conn = psycopg.Connection[dict[str, Any]]


@pytest.fixture
def reviews(conn: Conn) -> str:
    conn.execute("CREATE TABLE public.reviews (text text, class text)")
    conn.execute("INSERT INTO public.reviews SELECT 'text ' || i, (i % 2)::text FROM generate_series(1, 10) i")
    return "public.reviews"


@pytest.fixture(scope="module")
def keyring() -> Keyring:
    """The workers' keyring of this test session (tests/conftest.py registered its key as the active one)."""
    ring = Keyring.load(Path(os.environ["PGML_KEYRING_DIR"]))
    assert len(ring.keys) == 1 and not ring.problems
    return ring


def test_a_token_sealed_in_sql_opens_with_the_library(conn: Conn, reviews: str, keyring: Keyring) -> None:
    token = "hf_" + pyrandom.token_urlsafe(30)
    row = tune(conn, hyperparams={"dataset_args": OK_ARGS, "hub_token": token, "training_args": {"hub_token": "x"}})
    job = conn.execute("SELECT * FROM pgml.jobs WHERE id = %s", (row["job_id"],)).fetchone()
    assert job is not None and job["secrets"].startswith(f"v2:{next(iter(keyring.keys))}:")
    assert token not in json.dumps(job, default=str)
    assert keyring.unseal(job["secrets"], row["job_id"], USER) == {"hub_token": token, "training_args.hub_token": "x"}
    # bound to the job and the submitter: the same blob for another job or submitter is the one error
    for job_id, submitter in ((row["job_id"] + 1, USER), (row["job_id"], OTHER_USER)):
        with pytest.raises(SecretError) as info:
            keyring.unseal(job["secrets"], job_id, submitter)
        assert str(info.value) == UNSEAL_ERROR


@pytest.mark.parametrize("bits", [2048, 3072, 4096])
def test_seal_round_trips_at_every_key_size(su: Conn, bits: int) -> None:
    key = sec.generate_private_key(bits)
    ring = Keyring(Path("-"), {sec.key_id_of(key): key})
    values = [
        {"token": "hf_" + pyrandom.token_urlsafe(30)},
        {"token": "hf_" + "t" * 997},  # several blocks
        {"hub_token": 'hf_ünïcødé ✓ 日本語 🤗 "quoted" \\ back\nslash', "training_args.hub_token": "x"},
        {"token": "é" * 700},  # block boundaries inside multi-byte characters
        {"use_auth_token": True, "n": 42},
    ]
    n = key.public_key().public_numbers()
    with su.transaction(force_rollback=True):
        key_id = su.execute(
            "SELECT pgml.register_sealing_key(%s::numeric, %s::numeric) AS id", (str(n.n), str(n.e))
        ).fetchone()
        assert key_id == {"id": sec.key_id_of(key)}
        for i, value in enumerate(values):
            sealed = su.execute("SELECT pgml._seal(%s, %s, 'alice') AS s", (Jsonb(value), 100 + i)).fetchone()
            assert sealed is not None and sealed["s"].startswith(f"v2:{key_id['id']}:")
            assert ring.unseal(sealed["s"], 100 + i, "alice") == value
        a, b = (su.execute("SELECT pgml._seal(%s, 1, 'a') AS s", (Jsonb(values[0]),)).fetchone() for _ in range(2))
        assert a != b  # randomized (OAEP seed from gen_random_uuid)
        assert su.execute("SELECT pgml._seal(NULL, 1, 'a') AS s, pgml._seal('{}', 1, 'a') AS t").fetchone() == {
            "s": None,
            "t": None,
        }


def test_oaep_helpers_match_the_rfc(su: Conn) -> None:
    import hashlib

    seed = bytes(range(32))
    expected = b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(4))[:100]
    row = su.execute(
        "SELECT pgml._mgf1_sha256(%s, 100) AS m, pgml._xor('\\x0ff0'::bytea, '\\xffff'::bytea) AS x, "
        "length(pgml._random_bytes(1000)) AS n",
        (seed,),
    ).fetchone()
    assert row == {"m": expected, "x": b"\xf0\x0f", "n": 1000}
    (random,) = su.execute("SELECT pgml._random_bytes(4000) AS r").fetchone().values()
    assert len(set(random)) == 256  # every byte value, zero included


def test_no_active_key_names_the_fix(conn: Conn, su: Conn, reviews: str) -> None:
    su.execute("UPDATE pgml.sealing_keys SET active = false")
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as info:
        tune(conn, hyperparams={"dataset_args": OK_ARGS, "hub_token": "hf_never_shown"})
    diag = info.value.diag
    assert diag.message_primary == "cannot seal the Hugging Face token: no sealing key is active"
    assert "hub_credential" in (diag.message_hint or "") and "pgml-tuned keys register" in (diag.message_hint or "")
    assert "hf_never_shown" not in str(info.value) + (diag.context or "")
    assert su.execute("SELECT count(*) AS n FROM pgml.jobs").fetchone() == {"n": 0}
    tune(conn)  # nothing to seal: no key needed


def test_the_keyring_is_an_administrators(ops: Conn, conn: Conn, su: Conn, worker_dsn: str) -> None:
    key, other = sec.generate_private_key(2048), sec.generate_private_key(2048)
    nums = [(str(k.public_key().public_numbers().n), str(k.public_key().public_numbers().e)) for k in (key, other)]
    for who in (conn, connect(worker_dsn)):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            who.execute("SELECT pgml.register_sealing_key(%s::numeric, %s::numeric)", nums[0])
    first = ops.execute("SELECT pgml.register_sealing_key(%s::numeric, %s::numeric) AS id", nums[0]).fetchone()
    second = ops.execute("SELECT pgml.register_sealing_key(%s::numeric, %s::numeric, false) AS id", nums[1]).fetchone()
    assert first == {"id": sec.key_id_of(key)} and second == {"id": sec.key_id_of(other)}
    active = "SELECT key_id FROM pgml.sealing_keys WHERE active"
    assert ops.execute(active).fetchall() == [{"key_id": sec.key_id_of(key)}]  # one active key
    ops.execute("SELECT pgml.activate_sealing_key(%s)", (sec.key_id_of(other),))
    assert ops.execute(active).fetchall() == [{"key_id": sec.key_id_of(other)}]
    ops.execute("SELECT pgml.retire_sealing_key(%s)", (sec.key_id_of(other),))
    assert ops.execute(active).fetchall() == []
    with pytest.raises(psycopg.errors.NoDataFound, match="unknown or retired"):
        ops.execute("SELECT pgml.activate_sealing_key(%s)", (sec.key_id_of(other),))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="at least 2048 bits"):
        ops.execute("SELECT pgml.register_sealing_key(%s::numeric, 65537)", (str(2**1023 + 1),))
    with pytest.raises(psycopg.errors.CheckViolation):  # a key id is its key's fingerprint
        su.execute(
            "INSERT INTO pgml.sealing_keys (key_id, n, e) VALUES ('0123456789abcdef', %s::numeric, 65537)", nums[0][:1]
        )
    uses = ops.execute("SELECT key_id, pending_jobs FROM pgml.sealing_key_use ORDER BY key_id").fetchall()
    assert {u["key_id"] for u in uses} >= {sec.key_id_of(key), sec.key_id_of(other)}


# ---- named credentials ----


def test_a_credential_is_checked_at_submit_and_recorded_by_name(
    conn: Conn, ops: Conn, su_dsn: str, reviews: str
) -> None:
    hp = {"dataset_args": OK_ARGS, "hub_credential": "org-token"}
    assert_rejected(conn, "unknown credential 'org-token'", "pgml.allow_credential('org-token'", hyperparams=hp)
    ops.execute("SELECT pgml.allow_credential('org-token', %s)", (OTHER_USER,))
    assert_rejected(
        conn,
        f"permission denied: {USER} may not use credential 'org-token'",
        f"SELECT pgml.allow_credential('org-token', '{USER}')",
        hyperparams=hp,
    )
    ops.execute("SELECT pgml.allow_credential('org-token', 'pgml_user')")  # a group role: its members may
    row = tune(conn, hyperparams=hp)
    job = conn.execute("SELECT * FROM pgml.jobs WHERE id = %s", (row["job_id"],)).fetchone()
    assert job is not None and job["credential"] == "org-token" and job["secrets"] is None
    assert "hub_credential" not in job["hyperparams"]
    # users see the credentials they may use
    assert conn.execute("SELECT name FROM pgml.credentials").fetchall() == [{"name": "org-token"}]
    assert ops.execute("SELECT pgml.revoke_credential('org-token', 'pgml_user') AS had").fetchone() == {"had": True}
    assert_rejected(conn, "may not use credential", "allow_credential", hyperparams=hp)
    assert conn.execute("SELECT name FROM pgml.credentials").fetchall() == []
    with connect(as_login(su_dsn, OTHER_USER)) as other:
        other.execute("CREATE TABLE public.r2 (text text, class text)")
        other.execute("INSERT INTO public.r2 SELECT 't' || i, (i % 2)::text FROM generate_series(1, 4) i")
        assert tune(other, relation_name="public.r2", hyperparams=hp)["status"] == "queued"


@pytest.mark.parametrize(
    ("hyperparams", "message", "hint"),
    [
        ({"hub_credential": 5}, "hub_credential must be a credential name", '"hub_credential": "my-org-token"'),
        ({"hub_credential": "c", "hub_token": "hf_x"}, "both hub_credential and an inline token", "pass one"),
        ({"hub_credential": "../../etc/passwd"}, "unknown credential", "allow_credential"),
    ],
)
def test_credential_misuse_is_refused(
    conn: Conn, ops: Conn, reviews: str, hyperparams: dict[str, Any], message: str, hint: str
) -> None:
    ops.execute("SELECT pgml.allow_credential('c', 'pgml_user')")
    assert_rejected(conn, message, hint, hyperparams={"dataset_args": OK_ARGS, **hyperparams})


def test_credential_administration(conn: Conn, ops: Conn) -> None:
    for bad in ("..", ".", "a/b", ".hidden", "", "x" * 129):
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="not a valid credential name"):
            ops.execute("SELECT pgml.allow_credential(%s, 'pgml_user')", (bad,))
    with pytest.raises(psycopg.errors.UndefinedObject, match="role nobody_at_all does not exist"):
        ops.execute("SELECT pgml.allow_credential('c', 'nobody_at_all')")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT pgml.allow_credential('c', %s)", (USER,))
    ops.execute("SELECT pgml.allow_credential('c', %s)", (USER,))
    assert ops.execute("SELECT pgml.revoke_credential('c', 'pgml_user') AS had").fetchone() == {"had": False}
    assert ops.execute("SELECT pgml.drop_credential('c') AS had").fetchone() == {"had": True}
    assert ops.execute("SELECT count(*) AS n FROM pgml.credential_grants").fetchone() == {"n": 0}


def test_the_worker_asks_again_at_every_attempt(conn: Conn, ops: Conn, worker_dsn: str, reviews: str) -> None:
    ops.execute("SELECT pgml.allow_credential('org-token', %s)", (USER,))
    job_id = tune(conn, hyperparams={"dataset_args": OK_ARGS, "hub_credential": "org-token"})["job_id"]
    with connect(worker_dsn) as worker:
        with pytest.raises(psycopg.errors.NoDataFound, match="is not running attempt 1"):
            worker.execute("SELECT pgml.job_credential(%s, 1)", (job_id,))
        worker.execute("UPDATE pgml.jobs SET status = 'running', attempt = 1 WHERE id = %s", (job_id,))
        assert worker.execute("SELECT pgml.job_credential(%s, 1) AS c", (job_id,)).fetchone() == {"c": "org-token"}
        ops.execute("SELECT pgml.revoke_credential('org-token', %s)", (USER,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=f"{USER} may no longer use credential"):
            worker.execute("SELECT pgml.job_credential(%s, 1)", (job_id,))
        ops.execute("SELECT pgml.drop_credential('org-token')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no longer exists"):
            worker.execute("SELECT pgml.job_credential(%s, 1)", (job_id,))
    assert WORKER


def test_a_finished_jobs_secrets_are_deleted(conn: Conn, su: Conn, reviews: str) -> None:
    job_id = tune(conn, hyperparams={"dataset_args": OK_ARGS, "token": "hf_gone"})["job_id"]
    assert su.execute("SELECT secrets IS NOT NULL AS s FROM pgml.jobs WHERE id = %s", (job_id,)).fetchone() == {
        "s": True
    }
    conn.execute("SELECT pgml.cancel(%s)", (job_id,))
    assert su.execute("SELECT secrets FROM pgml.jobs WHERE id = %s", (job_id,)).fetchone() == {"secrets": None}
