"""Secrets sealing in pure Python: key generation, the key file, seal/unseal (pgml_tuned.secrets)."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from pgml_tuned import secrets as sec
from pgml_tuned.secrets import SecretError, WorkerKey, generate_key, load_or_create_key, seal, unseal


@pytest.fixture(scope="session")
def key() -> WorkerKey:
    return generate_key(1024)


@pytest.fixture(scope="session")
def other_key() -> WorkerKey:
    return generate_key(1024)


def _seal(secrets: dict, key: WorkerKey) -> str:
    return seal(secrets, key.n, key.e, key.fingerprint)


def test_generate_key_is_a_valid_rsa_key(key: WorkerKey) -> None:
    assert key.n.bit_length() == 1024
    assert key.e == 65537
    for m in (2, 12345, key.n - 1):
        assert pow(pow(m, key.e, key.n), key.d, key.n) == m
    assert not sec._is_probable_prime(key.n)


def test_miller_rabin() -> None:
    assert sec._is_probable_prime(2**127 - 1)
    assert sec._is_probable_prime(2**521 - 1)
    assert not sec._is_probable_prime(2**128 + 1)
    assert not sec._is_probable_prime(561)  # Carmichael number
    assert not sec._is_probable_prime((2**61 - 1) * (2**89 - 1))
    assert [p for p in range(60) if sec._is_probable_prime(p)] == [
        2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59
    ]  # fmt: skip


def test_generate_key_rejects_tiny_sizes() -> None:
    with pytest.raises(ValueError, match="bits"):
        generate_key(256)


def test_fingerprint_is_sha256_of_modulus(key: WorkerKey) -> None:
    import hashlib

    expected = hashlib.sha256(key.n.to_bytes(128, "big")).hexdigest()[:16]
    assert key.fingerprint == expected
    assert len(key.fingerprint) == 16


def test_repr_does_not_show_the_private_exponent(key: WorkerKey) -> None:
    text = repr(key)
    assert str(key.d) not in text and format(key.d, "x") not in text
    assert key.fingerprint in text


def test_roundtrip(key: WorkerKey) -> None:
    secrets = {"token": "hf_abcdefghijklmnopqrstuvwxyz0123456789", "training_args.hub_token": "hf_x"}
    sealed = _seal(secrets, key)
    assert sealed.startswith(f"rsa1:{key.fingerprint}:")
    assert "hf_" not in sealed
    assert "\n" not in sealed
    assert unseal(sealed, key) == secrets


def test_roundtrip_multi_block_and_unicode(key: WorkerKey) -> None:
    secrets = {"token": "hf_" + "x" * 1000, "note": "naïve ✓ 日本語 🤗" * 20}
    sealed = _seal(secrets, key)
    blocks = sealed.split(":", 2)[2].split(".")
    assert len(blocks) > 1
    for block in blocks:
        assert len(base64.b64decode(block)) == 128
    assert unseal(sealed, key) == secrets


def test_message_of_exactly_one_block(key: WorkerKey) -> None:
    max_len = 128 - 11
    for size in (max_len - 1, max_len, max_len + 1):
        value = "y" * (size - len('{"token":""}'))
        secrets = {"token": value}
        assert len(json.dumps(secrets, separators=(",", ":"))) == size
        sealed = _seal(secrets, key)
        assert len(sealed.split(":", 2)[2].split(".")) == (1 if size <= max_len else 2)
        assert unseal(sealed, key) == secrets


def test_padding_is_random(key: WorkerKey) -> None:
    secrets = {"token": "hf_same"}
    assert _seal(secrets, key) != _seal(secrets, key)


def test_wrong_key(key: WorkerKey, other_key: WorkerKey) -> None:
    sealed = _seal({"token": "hf_secret"}, key)
    with pytest.raises(SecretError) as info:
        unseal(sealed, other_key)
    message = str(info.value)
    assert key.fingerprint in message
    assert other_key.fingerprint in message
    assert "PGML_SECRET_KEY_FILE" in message
    assert "hf_secret" not in message


def test_wrong_private_key_with_forged_fingerprint(key: WorkerKey, other_key: WorkerKey) -> None:
    sealed = seal({"token": "hf_secret"}, key.n, key.e, other_key.fingerprint)
    with pytest.raises(SecretError, match="corrupt"):
        unseal(sealed, other_key)


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda s: s.replace("rsa1:", "rsa2:"), id="prefix"),
        pytest.param(lambda s: s.split(":", 1)[1], id="no-prefix"),
        pytest.param(lambda s: s[:-8], id="truncated"),
        pytest.param(lambda s: s + ".", id="empty-block"),
        pytest.param(lambda s: s[:-6] + "!!!!==", id="not-base64"),
        pytest.param(lambda s: s.rsplit(":", 1)[0] + ":", id="no-blocks"),
        pytest.param(lambda s: s.rsplit(":", 1)[0] + ":" + base64.b64encode(b"\xff" * 128).decode(), id="too-large"),
        pytest.param(lambda s: s.rsplit(":", 1)[0] + ":" + base64.b64encode(b"\x01" * 128).decode(), id="bad-padding"),
    ],
)
def test_corrupted_ciphertext(key: WorkerKey, mutate) -> None:
    sealed = _seal({"token": "hf_secret"}, key)
    with pytest.raises(SecretError) as info:
        unseal(mutate(sealed), key)
    assert "hf_secret" not in str(info.value)


def test_flipped_byte_is_detected(key: WorkerKey) -> None:
    sealed = _seal({"token": "hf_secret"}, key)
    head, body = sealed.rsplit(":", 1)
    raw = bytearray(base64.b64decode(body))
    raw[60] ^= 0x40
    with pytest.raises(SecretError, match="corrupt"):
        unseal(f"{head}:{base64.b64encode(bytes(raw)).decode()}", key)


def test_seal_of_non_object_is_rejected_on_unseal(key: WorkerKey) -> None:
    # what a manual UPDATE could store: a sealed JSON array is not a secrets object
    k = 128
    em = b"\x00\x02" + b"\x11" * (k - 3 - 2) + b"\x00" + b"[]"
    c = pow(int.from_bytes(em, "big"), key.e, key.n).to_bytes(k, "big")
    with pytest.raises(SecretError, match="object"):
        unseal(f"rsa1:{key.fingerprint}:{base64.b64encode(c).decode()}", key)


# -- the key file -------------------------------------------------------------------------------------------


@pytest.fixture
def fast_keygen(monkeypatch: pytest.MonkeyPatch, key: WorkerKey) -> None:
    """load_or_create_key generates RSA-2048 (about a second); the unit tests reuse the cached key."""
    monkeypatch.setattr(sec, "generate_key", lambda bits=2048: key)


@pytest.mark.usefixtures("fast_keygen")
def test_load_or_create_key_creates_0600_file_and_dir(tmp_path: Path, key: WorkerKey) -> None:
    path = tmp_path / "config" / "pgml-tuned" / "worker_key.json"
    created = load_or_create_key(path)
    assert created == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text())
    assert set(data) == {"n", "e", "d"}
    assert int(data["n"], 16) == key.n and int(data["d"], 16) == key.d
    assert [p.name for p in path.parent.iterdir()] == ["worker_key.json"]  # no temp file left behind
    # loads the same key next time
    assert load_or_create_key(path) == created


def test_load_or_create_key_real_generation(tmp_path: Path) -> None:
    path = tmp_path / "worker_key.json"
    created = load_or_create_key(path)
    assert created.n.bit_length() == 2048
    assert load_or_create_key(path) == created
    assert unseal(_seal({"token": "t"}, created), load_or_create_key(path)) == {"token": "t"}


@pytest.mark.usefixtures("fast_keygen")
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_refuses_group_or_world_readable(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "worker_key.json"
    load_or_create_key(path)
    os.chmod(path, mode)
    with pytest.raises(ValueError) as info:
        load_or_create_key(path)
    message = str(info.value)
    assert str(path) in message
    assert f"chmod 600 {path}" in message


@pytest.mark.parametrize(
    "content",
    [
        "",
        "not json",
        "[]",
        '{"n": "ff"}',
        '{"n": "zz", "e": "10001", "d": "ff"}',
        '{"n": 1, "e": 2, "d": 3}',
    ],
)
def test_load_refuses_corrupt_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "worker_key.json"
    path.write_text(content)
    os.chmod(path, 0o600)
    with pytest.raises(ValueError) as info:
        load_or_create_key(path)
    message = str(info.value)
    assert str(path) in message and "corrupt" in message
    assert f"delete {path}" in message


def test_load_refuses_mismatched_key_pair(tmp_path: Path, key: WorkerKey, other_key: WorkerKey) -> None:
    path = tmp_path / "worker_key.json"
    path.write_text(json.dumps({"n": format(key.n, "x"), "e": "10001", "d": format(other_key.d, "x")}))
    os.chmod(path, 0o600)
    with pytest.raises(ValueError, match="corrupt") as info:
        load_or_create_key(path)
    assert format(other_key.d, "x") not in str(info.value)


def test_key_file_setting(tmp_path: Path) -> None:
    from pgml_tuned.config import Settings

    assert Settings.from_env({"PGML_SECRET_KEY_FILE": str(tmp_path / "k.json")}).key_file == tmp_path / "k.json"
    assert Settings.from_env({"PGML_HOME": str(tmp_path)}, home=str(tmp_path)).key_file == tmp_path / "worker.key"


def test_secret_keys() -> None:
    assert set(sec.SECRET_KEYS) == {"token", "hub_token", "use_auth_token"}
