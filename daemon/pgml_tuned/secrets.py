"""Secrets (Hugging Face tokens) are never stored in plain text.

Workers own an RSA key pair, kept in a JSON file on the worker (mode 0600). The public half is registered in
``pgml.worker_keys``; ``pgml._seal(jsonb)`` (sql/migrations/0002_secrets.sql) encrypts the secrets of a job
with the newest registered key in pure PL/pgSQL, and only a worker holding the private key can unseal them.

Sealed format (shared with the SQL implementation)::

    rsa1:<fingerprint>:<base64 block>[.<base64 block>...]

The compact JSON text of the secrets object, UTF-8 encoded, is cut into chunks of at most ``k - 11`` bytes
(``k`` = byte length of the modulus: 256 for RSA-2048, so 245 bytes a block). Each chunk ``M`` is padded
PKCS#1 v1.5 type 2, ``EM = 00 02 || PS || 00 || M`` with ``PS`` at least 8 random nonzero bytes, and
encrypted ``C = EM^e mod n``; every block is exactly ``k`` bytes, big-endian. The fingerprint is the first 16
hex characters of sha256 over the minimal big-endian bytes of ``n``.

Stdlib only. Nothing here logs, prints or puts a plaintext into an exception message.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from secrets import randbelow, randbits, token_bytes
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "KEY_FILE_ENV",
    "SECRET_KEYS",
    "SecretError",
    "WorkerKey",
    "generate_key",
    "load_or_create_key",
    "register_key",
    "seal",
    "unseal",
]

#: Hyperparameter keys whose values are secrets (at the top level and inside ``training_args``).
SECRET_KEYS = ("token", "hub_token", "use_auth_token")  # as pgml._secret_keys() in SQL

#: Environment variable naming the worker's key file.
KEY_FILE_ENV = "PGML_SECRET_KEY_FILE"

PUBLIC_EXPONENT = 65537
MIN_BITS = 512
MILLER_RABIN_ROUNDS = 40
FORMAT_PREFIX = "rsa1"
_MIN_PADDING = 8  # PKCS#1 v1.5: at least 8 random nonzero bytes
_OVERHEAD = 3 + _MIN_PADDING  # 00 02 PS 00

_SMALL_PRIMES = [p for p in range(3, 2000) if all(p % q for q in range(2, math.isqrt(p) + 1))]
_SMALL_PRIMES_PRODUCT = math.prod(_SMALL_PRIMES)


class SecretError(Exception):
    """Sealed secrets cannot be unsealed (wrong key, corrupt data). The message never contains a secret."""


@dataclass(frozen=True)
class WorkerKey:
    """An RSA key pair: modulus ``n``, public exponent ``e``, private exponent ``d``."""

    n: int
    e: int
    d: int = field(repr=False)

    @property
    def fingerprint(self) -> str:
        """First 16 hex characters of sha256 over the big-endian bytes of ``n``."""
        return fingerprint_of(self.n)

    def __repr__(self) -> str:  # never show d (nor a 600-digit n) in logs
        return f"WorkerKey(fingerprint={self.fingerprint!r}, bits={self.n.bit_length()})"


def _byte_length(n: int) -> int:
    return max(1, (n.bit_length() + 7) // 8)


def fingerprint_of(n: int) -> str:
    """The fingerprint of a public key with modulus ``n`` (as ``pgml._key_fingerprint(n)`` in SQL)."""
    return hashlib.sha256(n.to_bytes(_byte_length(n), "big")).hexdigest()[:16]


# -- key generation ------------------------------------------------------------------------------------------


def _is_probable_prime(n: int, rounds: int = MILLER_RABIN_ROUNDS) -> bool:
    if n < 2:
        return False
    for p in (2, *_SMALL_PRIMES):
        if n % p == 0:
            return n == p
    r, s = n - 1, 0
    while r % 2 == 0:
        r //= 2
        s += 1
    for _ in range(rounds):
        a = 2 + randbelow(n - 3)
        x = pow(a, r, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _random_prime(bits: int, e: int) -> int:
    """A random prime of exactly ``bits`` bits with its two top bits set (so p*q has 2*bits bits)."""
    top = (1 << (bits - 1)) | (1 << (bits - 2))
    while True:
        candidate = randbits(bits) | top | 1
        # cheap sieve first: one gcd against the product of the small primes
        if math.gcd(candidate, _SMALL_PRIMES_PRODUCT) != 1:
            continue
        if math.gcd(candidate - 1, e) != 1:
            continue
        if _is_probable_prime(candidate):
            return candidate


def generate_key(bits: int = 2048) -> WorkerKey:
    """A fresh RSA key with a modulus of exactly ``bits`` bits and e = 65537 (Miller–Rabin, 40 rounds)."""
    if bits < MIN_BITS or bits % 2:
        raise ValueError(f"RSA key size must be an even number of bits >= {MIN_BITS}, not {bits}")
    e = PUBLIC_EXPONENT
    half = bits // 2
    while True:
        p = _random_prime(half, e)
        q = _random_prime(half, e)
        if p == q:
            continue
        n = p * q
        if n.bit_length() != bits:  # cannot happen with both top bits set; kept as a guard
            continue
        d = pow(e, -1, math.lcm(p - 1, q - 1))
        return WorkerKey(n=n, e=e, d=d)


# -- the key file --------------------------------------------------------------------------------------------


def _check_key(key: WorkerKey) -> None:
    """Raises ValueError unless (n, e, d) is a working RSA key."""
    if key.n.bit_length() < MIN_BITS or key.e < 3 or key.e % 2 == 0 or not 1 < key.d < key.n:
        raise ValueError("not a valid RSA key")
    for m in (2, 0x5EA1ED, key.n - 2):
        if pow(pow(m, key.e, key.n), key.d, key.n) != m:
            raise ValueError("n, e and d do not form an RSA key pair")


def _load_key(path: Path) -> WorkerKey:
    fix = (
        f"restore the original key file, or delete {path} to create a new key (jobs already queued with "
        "secrets sealed by the old key must then be resubmitted)"
    )
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"worker key file {path} is unreadable ({type(exc).__name__}): {fix}") from None
    if os.name == "posix" and st.st_mode & 0o077:
        raise ValueError(
            f"worker key file {path} is accessible by other users (mode {st.st_mode & 0o777:o}); it holds "
            f"the private key that unseals Hugging Face tokens: run `chmod 600 {path}`"
        )
    # messages below never quote the file: it holds the private key
    try:
        raw = json.loads(text)
        key = WorkerKey(n=int(raw["n"], 16), e=int(raw["e"], 16), d=int(raw["d"], 16))
    except (ValueError, KeyError, TypeError):
        raise ValueError(
            f'worker key file {path} is corrupt (expected JSON {{"n": hex, "e": hex, "d": hex}}): {fix}'
        ) from None
    try:
        _check_key(key)
    except ValueError as exc:
        raise ValueError(f"worker key file {path} is corrupt ({exc}): {fix}") from None
    return key


def _write_new_key(path: Path, key: WorkerKey) -> WorkerKey:
    """Writes ``key`` to ``path`` (mode 0600) atomically unless it exists; returns the key in the file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    payload = json.dumps({"n": format(key.n, "x"), "e": format(key.e, "x"), "d": format(key.d, "x")}) + "\n"
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # mode 0600
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        try:
            # link(2) never replaces an existing file: two workers starting at once keep a single key.
            os.link(tmp, path)
        except FileExistsError:
            return _load_key(path)
        except OSError:
            # filesystems without hard links: atomic rename (last writer wins)
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return key


def load_or_create_key(path: Path) -> WorkerKey:
    """The worker key stored at ``path``; a new RSA-2048 key is generated and stored there if none exists.

    Raises ValueError (naming the path and the fix) if the file is accessible by group/others or corrupt.
    """
    path = Path(path)
    if path.exists():
        return _load_key(path)
    return _write_new_key(path, generate_key())


# -- seal / unseal -------------------------------------------------------------------------------------------


def _nonzero_random_bytes(count: int) -> bytes:
    out = bytearray()
    while len(out) < count:
        out.extend(b for b in token_bytes(count - len(out) + 8) if b)
    return bytes(out[:count])


def seal(secrets: Mapping[str, Any], n: int, e: int, fingerprint: str) -> str:
    """Seals a JSON-serialisable mapping with the public key (n, e): the format of ``pgml._seal``."""
    k = _byte_length(n)
    max_len = k - _OVERHEAD
    if max_len < 1:
        raise ValueError("RSA modulus too small to seal anything")
    message = json.dumps(dict(secrets), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    blocks = []
    for start in range(0, len(message), max_len):
        chunk = message[start : start + max_len]
        em = b"\x00\x02" + _nonzero_random_bytes(k - 3 - len(chunk)) + b"\x00" + chunk
        c = pow(int.from_bytes(em, "big"), e, n)
        blocks.append(base64.b64encode(c.to_bytes(k, "big")).decode("ascii"))
    return f"{FORMAT_PREFIX}:{fingerprint}:{'.'.join(blocks)}"


def unseal(sealed: str, key: WorkerKey) -> dict[str, Any]:
    """The secrets object sealed by ``pgml._seal`` (or :func:`seal`). Raises SecretError if it cannot."""
    parts = sealed.split(":", 2) if isinstance(sealed, str) else []
    if len(parts) != 3 or parts[0] != FORMAT_PREFIX or not parts[2]:
        raise SecretError(f"sealed secrets are malformed: expected '{FORMAT_PREFIX}:<fingerprint>:<blocks>'")
    _, fingerprint, body = parts
    if fingerprint != key.fingerprint:
        raise SecretError(
            f"the job's secrets were sealed with worker key {fingerprint}, but this worker's key is "
            f"{key.fingerprint}: every worker needs the same key file; copy the key file of the worker that "
            f"registered {fingerprint} to this worker and point {KEY_FILE_ENV} at it (or resubmit the job)"
        )
    k = _byte_length(key.n)
    message = bytearray()
    for i, block in enumerate(body.split("."), start=1):
        try:
            raw = base64.b64decode(block, validate=True)
        except (binascii.Error, ValueError):
            raise SecretError(f"sealed secrets are corrupt: block {i} is not base64") from None
        c = int.from_bytes(raw, "big")
        if len(raw) != k or c >= key.n:
            raise SecretError(f"sealed secrets are corrupt: block {i} is not a {k}-byte RSA ciphertext")
        em = pow(c, key.d, key.n).to_bytes(k, "big")
        sep = em.find(b"\x00", 2)
        if em[0] != 0 or em[1] != 2 or sep < 2 + _MIN_PADDING:
            raise SecretError(f"sealed secrets are corrupt: block {i} does not decrypt to a padded message")
        message += em[sep + 1 :]
    try:
        value = json.loads(message.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SecretError("sealed secrets are corrupt: they do not decrypt to JSON") from None
    if not isinstance(value, dict):
        raise SecretError("sealed secrets are corrupt: they do not decrypt to a JSON object")
    return value


# -- registration --------------------------------------------------------------------------------------------


async def register_key(conn: psycopg.AsyncConnection[Any], key: WorkerKey) -> None:
    """Registers the public half of ``key`` in ``pgml.worker_keys`` (a no-op if it is already there).

    Runs in its own transaction (a savepoint if ``conn`` is inside one) and commits it.
    """
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO pgml.worker_keys (fingerprint, n, e) VALUES (%s, %s::numeric, %s::numeric) "
            "ON CONFLICT DO NOTHING",
            (key.fingerprint, str(key.n), str(key.e)),
        )
