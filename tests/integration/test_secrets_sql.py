"""pgml._seal (pure PL/pgSQL RSA, sql/migrations/0002_secrets.sql) against the Python unseal.

Needs the `su_dsn` fixture (tests/conftest.py): a superuser's DSN (these are internals) of a migrated database.
Every test runs in a transaction that is rolled back, with pgml.worker_keys emptied first, so the keys
registered here never become the sealing key of other tests sharing the database.
"""

from __future__ import annotations

import asyncio
import base64
import secrets as pyrandom
import statistics
import time
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from pgml_tuned.secrets import WorkerKey, generate_key, register_key, seal, unseal

NO_KEY_MESSAGE = "cannot store the Hugging Face token: no worker key is registered"
NO_KEY_HINT = (
    "run `pgml-tuned migrate` (or start `pgml-tuned serve`) once on a worker: "
    "it registers the public key that seals tokens"
)


@pytest.fixture(scope="module")
def key() -> WorkerKey:
    return generate_key(2048)


@pytest.fixture(scope="module")
def small_key() -> WorkerKey:
    return generate_key(1024)


def _seal_in_sql(dsn: str, key: WorkerKey | None, values: list[Any]) -> list[tuple[str | None, float]]:
    """Registers `key` (alone) with register_key and seals each value with pgml._seal, all rolled back.

    Returns (sealed, seconds the SELECT took) per value.
    """

    async def run() -> list[tuple[str | None, float]]:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            async with conn.transaction(force_rollback=True):
                await conn.execute("DELETE FROM pgml.worker_keys")
                if key is not None:
                    await register_key(conn, key)
                    await register_key(conn, key)  # idempotent
                out = []
                for value in values:
                    started = time.perf_counter()
                    cur = await conn.execute("SELECT pgml._seal(%s)", (value,))
                    row = await cur.fetchone()
                    out.append((row[0], time.perf_counter() - started))
                return out

    return asyncio.run(run())


def test_sql_seal_unseals_in_python(su_dsn: str, key: WorkerKey) -> None:
    values = [
        {"token": "hf_" + pyrandom.token_urlsafe(30)},
        {"token": "hf_" + "t" * 597},  # a 600-char token: three RSA blocks
        {"hub_token": 'hf_ünïcødé ✓ 日本語 🤗 "quoted" \\ back\nslash', "training_args.hub_token": "x"},
        {"use_auth_token": True, "token": None, "n": 42},
        {"token": "é" * 700},  # block boundaries fall inside multi-byte characters
    ]
    results = _seal_in_sql(su_dsn, key, [Jsonb(v) for v in values])
    for value, (sealed, _) in zip(values, results, strict=True):
        assert sealed is not None
        assert sealed.startswith(f"rsa1:{key.fingerprint}:")
        blocks = sealed.split(":", 2)[2].split(".")
        assert all(len(base64.b64decode(b, validate=True)) == 256 for b in blocks)
        assert unseal(sealed, key) == value
        for secret in value.values():
            if isinstance(secret, str) and len(secret) > 3:
                assert secret not in sealed
    assert len(results[1][0].split(":", 2)[2].split(".")) == 3


def test_sql_seal_works_with_other_key_sizes(su_dsn: str, small_key: WorkerKey) -> None:
    value = {"token": "hf_" + "k" * 300}
    ((sealed, _),) = _seal_in_sql(su_dsn, small_key, [Jsonb(value)])
    assert sealed is not None
    assert all(len(base64.b64decode(b)) == 128 for b in sealed.split(":", 2)[2].split("."))
    assert unseal(sealed, small_key) == value


def test_seals_of_the_same_input_differ(su_dsn: str, key: WorkerKey) -> None:
    value = Jsonb({"token": "hf_same_token"})
    (a, _), (b, _) = _seal_in_sql(su_dsn, key, [value, value])
    assert a != b
    assert unseal(a, key) == unseal(b, key) == {"token": "hf_same_token"}


def test_empty_secrets_seal_to_null(su_dsn: str, key: WorkerKey) -> None:
    results = _seal_in_sql(su_dsn, key, [None, Jsonb({})])
    assert [sealed for sealed, _ in results] == [None, None]
    # no key needed for nothing to seal
    results = _seal_in_sql(su_dsn, None, [None, Jsonb({})])
    assert [sealed for sealed, _ in results] == [None, None]


def test_python_seal_matches_sql_format(su_dsn: str, key: WorkerKey) -> None:
    value = {"token": "hf_" + "p" * 400}
    ((sql_sealed, _),) = _seal_in_sql(su_dsn, key, [Jsonb(value)])
    py_sealed = seal(value, key.n, key.e, key.fingerprint)
    assert sql_sealed is not None
    assert sql_sealed.rsplit(":", 1)[0] == py_sealed.rsplit(":", 1)[0]
    assert unseal(py_sealed, key) == unseal(sql_sealed, key) == value


def test_no_key_registered(su_dsn: str) -> None:
    with psycopg.connect(su_dsn) as conn:
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as info:
            with conn.transaction(force_rollback=True):
                conn.execute("DELETE FROM pgml.worker_keys")
                conn.execute("SELECT pgml._seal(%s)", (Jsonb({"token": "hf_never_shown"}),))
    diag = info.value.diag
    assert diag.sqlstate == "55000"
    assert diag.message_primary == NO_KEY_MESSAGE
    assert diag.message_hint == NO_KEY_HINT
    assert "hf_never_shown" not in str(info.value)
    assert "hf_never_shown" not in (diag.context or "")


def test_non_object_is_rejected(su_dsn: str, key: WorkerKey) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue) as info:
        _seal_in_sql(su_dsn, key, [Jsonb(["hf_in_an_array"])])
    assert "hf_in_an_array" not in str(info.value)


def test_sealing_is_fast(su_dsn: str, key: WorkerKey) -> None:
    values = [Jsonb({"token": "hf_" + "t" * 597})] * 7 + [Jsonb({"token": "hf_" + "s" * 34})] * 7
    results = _seal_in_sql(su_dsn, key, values)
    long_times = [t for _, t in results[:7]]
    short_times = [t for _, t in results[7:]]
    assert statistics.median(long_times) < 0.2, long_times
    assert statistics.median(short_times) < 0.2, short_times
    assert long_times[0] < 0.5, long_times  # the first call also compiles the PL/pgSQL functions


def test_helpers_match_python(su_dsn: str, key: WorkerKey) -> None:
    cases = [0, 1, 255, 256, 2**56 - 1, 2**56, 2**64 + 5, key.n - 1, pyrandom.randbits(2048)]
    with psycopg.connect(su_dsn) as conn:
        for v in cases:
            length = max(1, (v.bit_length() + 7) // 8)
            row = conn.execute(
                "SELECT pgml._numeric_to_bytea(%s::numeric), pgml._numeric_to_bytea(%s::numeric, %s),"
                " pgml._bytea_to_numeric(%s)::text",
                (str(v), str(v), length + 3, v.to_bytes(length + 3, "big")),
            ).fetchone()
            assert row == (v.to_bytes(length, "big"), v.to_bytes(length + 3, "big"), str(v))
        for base, exp in [(pyrandom.randbits(2040), 65537), (12345, 0), (0, 5), (key.n - 1, 3)]:
            (got,) = conn.execute(
                "SELECT pgml._modpow(%s::numeric, %s::numeric, %s::numeric)::text",
                (str(base), str(exp), str(key.n)),
            ).fetchone()
            assert int(got) == pow(base, exp, key.n)
        (fp,) = conn.execute("SELECT pgml._key_fingerprint(%s::numeric)", (str(key.n),)).fetchone()
        assert fp == key.fingerprint
        with pytest.raises(psycopg.errors.NumericValueOutOfRange):
            conn.execute("SELECT pgml._numeric_to_bytea(65536, 2)")
        conn.rollback()
        (padding,) = conn.execute("SELECT pgml._random_nonzero_bytes(4000)").fetchone()
        assert len(padding) == 4000 and 0 not in padding
        assert len(set(padding)) == 255


def test_worker_keys_rejects_a_wrong_fingerprint(su_dsn: str, key: WorkerKey) -> None:
    with psycopg.connect(su_dsn) as conn:
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                "INSERT INTO pgml.worker_keys (fingerprint, n, e) VALUES ('0123456789abcdef', %s::numeric, 65537)",
                (str(key.n),),
            )
