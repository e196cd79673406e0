"""The worker's side of secrets (pgml_tuned.secrets): key files, the keyring, OAEP opening with the one error,
and credential files. The SQL sealing side is tests/integration/test_secrets_sql.py."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from pgml_tuned import secrets as sec
from pgml_tuned.secrets import UNSEAL_ERROR, Keyring, SecretError


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return sec.generate_private_key(2048)


def seal(key: rsa.RSAPrivateKey, value: object, job_id: int, submitter: str, *, block: int = 190) -> str:
    """What pgml._seal writes, made with the library (the SQL side is compared against it elsewhere)."""
    msg = value if isinstance(value, bytes) else json.dumps(value).encode()
    chunks = [msg[i : i + block] for i in range(0, len(msg), block)] or [b""]
    blobs = []
    for i, chunk in enumerate(chunks, start=1):
        label = sec.seal_label(job_id, submitter, i, len(chunks))
        oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=label)
        blobs.append(base64.b64encode(key.public_key().encrypt(chunk, oaep)).decode())
    return f"v2:{sec.key_id_of(key)}:{'.'.join(blobs)}"


def test_round_trip(key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    ring = Keyring(tmp_path, {sec.key_id_of(key): key})
    value = {"hub_token": "hf_" + "x" * 500, "token": "ünïcødé"}
    assert ring.unseal(seal(key, value, 7, "alice"), 7, "alice") == value


def _error(ring: Keyring, blob: str, job_id: int = 7, submitter: str = "alice") -> str:
    with pytest.raises(SecretError) as info:
        ring.unseal(blob, job_id, submitter)
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)
    return str(info.value)


def test_every_failure_is_the_same_error(key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    other = sec.generate_private_key(2048)
    ring = Keyring(tmp_path, {sec.key_id_of(key): key, sec.key_id_of(other): other})
    good = seal(key, {"hub_token": "hf_" + "y" * 300}, 7, "alice")
    prefix, body = good.rsplit(":", 1)
    first, *rest = body.split(".")
    raw = bytearray(base64.b64decode(first))
    raw[100] ^= 1
    tampered = f"{prefix}:{'.'.join([base64.b64encode(bytes(raw)).decode(), *rest])}"
    cases = {
        "another job": _error(ring, good, job_id=8),
        "another submitter": _error(ring, good, submitter="mallory"),
        "tampered": _error(ring, tampered),
        "blocks swapped": _error(ring, f"{prefix}:{'.'.join(reversed(body.split('.')))}"),
        "a block dropped": _error(ring, f"{prefix}:{first}"),
        "unknown key id": _error(ring, good.replace(sec.key_id_of(key), "0123456789abcdef")),
        "another key's id": _error(ring, good.replace(sec.key_id_of(key), sec.key_id_of(other))),
        "not base64": _error(ring, f"{prefix}:!!!"),
        "not JSON": _error(ring, seal(key, b"hf_not json", 7, "alice")),
        "not UTF-8": _error(ring, seal(key, b"\xff\xfe", 7, "alice")),
        "JSON, not an object": _error(ring, seal(key, ["hf_x"], 7, "alice")),
        "an old rsa1 blob": _error(ring, "rsa1:0123456789abcdef:AAAA"),
        "garbage": _error(ring, "hf_plain_token"),
        "no keys at all": _error(Keyring(tmp_path), good),
    }
    assert set(cases.values()) == {UNSEAL_ERROR}, cases
    assert "hf_" not in UNSEAL_ERROR.replace('"hub_credential"', "")


def test_key_files(tmp_path: Path) -> None:
    key = sec.generate_private_key(2048)
    path = tmp_path / "k.pem"
    sec.write_private_key(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sec.key_id_of(sec.load_private_key(path)) == sec.key_id_of(key)
    with pytest.raises(ValueError, match="exists"):
        sec.write_private_key(key, path)  # never overwritten
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        sec.load_private_key(path)
    (tmp_path / "bad.pem").write_text("not a key")
    os.chmod(tmp_path / "bad.pem", 0o600)
    with pytest.raises(ValueError, match="not an unencrypted PEM private key") as info:
        sec.load_private_key(tmp_path / "bad.pem")
    assert "not a key" not in str(info.value)  # the file is never quoted
    with pytest.raises(ValueError, match="2048"):
        sec.generate_private_key(1024)


def test_keyring_loads_every_usable_key_by_its_id(tmp_path: Path) -> None:
    assert Keyring.load(tmp_path / "missing").keys == {}
    a, b = sec.generate_private_key(2048), sec.generate_private_key(2048)
    sec.write_private_key(a, tmp_path / "whatever-name.pem")
    sec.write_private_key(b, tmp_path / "b.pem")
    sec.write_private_key(sec.generate_private_key(2048), tmp_path / "loose.pem")
    os.chmod(tmp_path / "loose.pem", 0o640)
    ring = Keyring.load(tmp_path)
    assert set(ring.keys) == {sec.key_id_of(a), sec.key_id_of(b)}
    assert len(ring.problems) == 1 and "loose.pem" in ring.problems[0] and "chmod 600" in ring.problems[0]


def test_key_id_is_the_sql_fingerprint(key: rsa.RSAPrivateKey) -> None:
    import hashlib

    n = key.public_key().public_numbers().n
    assert sec.key_id_of(key) == hashlib.sha256(n.to_bytes(256, "big")).hexdigest()[:16]
    assert sec.key_id_of(key.public_key()) == sec.key_id_of(key)


def test_read_credential(tmp_path: Path) -> None:
    (tmp_path / "my-org.token").write_text("hf_abc\n")
    assert sec.read_credential(tmp_path, "my-org.token") == "hf_abc"
    for bad in ("..", ".", "../etc/passwd", "a/b", ".hidden", "", "x" * 129, "a\\b", "a\nb"):
        with pytest.raises(SecretError, match="not a plain file name"):
            sec.read_credential(tmp_path, bad)
    with pytest.raises(SecretError) as info:
        sec.read_credential(tmp_path, "missing")
    assert "'missing' is not on this worker" in str(info.value) and "LoadCredential=missing:" in str(info.value)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SecretError, match="'empty' on this worker is not a token"):
        sec.read_credential(tmp_path, "empty")
    (tmp_path / "dir").mkdir()
    with pytest.raises(SecretError, match="'dir'"):
        sec.read_credential(tmp_path, "dir")
