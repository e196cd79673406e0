"""A job's Hugging Face token, on the worker: named credentials, and inline tokens sealed at submit.

Named credentials (the recommended way): the workers hold a directory with one file per credential name (its
content is the token), e.g. systemd ``LoadCredential=``. SQL only ever sees the name (pgml.credentials); the
worker asks ``pgml.job_credential`` whether the submitter still may use it, then reads the file here.

Inline tokens are sealed by ``pgml._seal`` (sql/migrations/0009_secrets.sql) with RSA-OAEP (SHA-256, MGF1-SHA-256)
to the active key of the keyring ``pgml.sealing_keys``, bound to the job and the submitter by the OAEP label::

    v2:<key_id>:<base64 block>[.<base64 block>...]
    label of block i of n: pgml-tuned:v2:<job_id>:<submitter>:<i>/<n>

The workers hold the private keys: a keyring directory of PEM files (mode 0600), any number of keys, each found
by its key id (computed from the key, never from the file name). An administrator creates them
(``pgml-tuned keys generate``) and registers their public half (``pgml-tuned keys register``); a worker never
creates or registers a key. Decryption is the ``cryptography`` library's; every failure to open sealed secrets
(unknown key, bad padding, another job's blob, not JSON, an old ``rsa1:`` blob, ...) raises SecretError with
the one text UNSEAL_ERROR: nothing tells one failure from another (no padding oracle).

Nothing here logs, prints or puts a token into an exception message.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "CREDENTIAL_NAME",
    "SECRET_KEYS",
    "UNSEAL_ERROR",
    "Keyring",
    "SecretError",
    "generate_private_key",
    "key_id_of",
    "load_private_key",
    "read_credential",
    "register_key",
    "seal_label",
    "write_private_key",
]

#: Hyperparameter keys whose values are secrets (at the top level and inside ``training_args``).
SECRET_KEYS = ("token", "hub_token", "use_auth_token")  # as pgml._secret_keys() in SQL

#: A credential name: a plain file name (as the CHECK of pgml.credentials.name).
CREDENTIAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

#: The one error of every failure to open sealed secrets; all that lands in pgml.jobs.error.
UNSEAL_ERROR = (
    "the job's sealed token cannot be opened on this worker: resubmit the job with the token, or use a named "
    'credential ("hub_credential": "<name>")'
)

FORMAT = "v2"
KEY_BITS = 3072
MAX_CREDENTIAL_BYTES = 65536
_OAEP_OVERHEAD = 2 * 32 + 2


class SecretError(Exception):
    """A job's token cannot be had. ``str()`` is what the job's error says (never a secret); ``detail`` is for
    the operator's log (also never a secret)."""

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail


def seal_label(job_id: int, submitter: str, index: int, count: int) -> bytes:
    """The OAEP label of block ``index`` (1-based) of ``count`` (as ``pgml._seal_label`` in SQL)."""
    return f"pgml-tuned:{FORMAT}:{job_id}:{submitter}:{index}/{count}".encode()


def key_id_of(key: rsa.RSAPrivateKey | rsa.RSAPublicKey) -> str:
    """First 16 hex characters of sha256 over the minimal big-endian bytes of n (``pgml._key_fingerprint``)."""
    n = (key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key).public_numbers().n
    return hashlib.sha256(n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big")).hexdigest()[:16]


# -- private key files ---------------------------------------------------------------------------------------


def generate_private_key(bits: int = KEY_BITS) -> rsa.RSAPrivateKey:
    if bits < 2048:
        raise ValueError(f"a sealing key needs at least 2048 bits, not {bits}")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def write_private_key(key: rsa.RSAPrivateKey, path: Path) -> None:
    """Writes ``key`` as unencrypted PKCS#8 PEM, mode 0600; never replaces an existing file."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ValueError(f"{path} exists: choose another file name (a key file is never overwritten)") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())


def load_private_key(path: Path) -> rsa.RSAPrivateKey:
    """The RSA private key in ``path``; ValueError naming the file and the fix (never quoting it)."""
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"key file {path} is unreadable ({type(e).__name__})") from None
    if os.name == "posix" and st.st_mode & 0o077:
        raise ValueError(
            f"key file {path} is accessible by other users (mode {st.st_mode & 0o777:o}); it opens every sealed "
            f"token: run `chmod 600 {path}`"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ValueError(
            f"key file {path} is not an unencrypted PEM private key (see `pgml-tuned keys generate`)"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"key file {path} does not hold an RSA key (`pgml-tuned keys generate` writes one)")
    return key


async def register_key(conn: psycopg.AsyncConnection[Any], key: rsa.RSAPrivateKey, *, activate: bool = True) -> str:
    """Registers the public half of ``key`` in pgml.sealing_keys (an administrator's connection); with
    ``activate`` it becomes the key that seals. Returns its key id. Commits."""
    numbers = key.public_key().public_numbers()
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT pgml.register_sealing_key(%s::numeric, %s::numeric, %s) AS key_id",
            (str(numbers.n), str(numbers.e), activate),
        )
        row = await cur.fetchone()
    assert row is not None
    return str(row["key_id"])  # a db.connect() connection: dict rows


# -- the worker's keyring ------------------------------------------------------------------------------------


@dataclass
class Keyring:
    """The private keys in a directory (``*.pem``, mode 0600), by key id."""

    directory: Path
    keys: dict[str, rsa.RSAPrivateKey] = field(default_factory=dict, repr=False)
    problems: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, directory: Path) -> Keyring:
        """Every key in ``directory`` (none if it does not exist); a file that cannot be used is a problem,
        not an error: the worker logs it and serves jobs that do not need it."""
        ring = cls(Path(directory))
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for path in sorted(ring.directory.glob("*.pem")):
                try:
                    key = load_private_key(path)
                except ValueError as e:
                    ring.problems.append(str(e))
                    continue
                ring.keys[key_id_of(key)] = key
        return ring

    def unseal(self, sealed: str, job_id: int, submitter: str) -> dict[str, Any]:
        """The secrets sealed by ``pgml._seal`` for this job and submitter; SecretError(UNSEAL_ERROR) otherwise."""
        parts = sealed.split(":", 2) if isinstance(sealed, str) else []
        key = self.keys.get(parts[1]) if len(parts) == 3 and parts[0] == FORMAT else None
        if key is None:
            detail = (
                f"sealed with key {parts[1]!r}, which is not in the keyring {self.directory}: copy that key's "
                "file there (mode 0600) on every worker"
                if len(parts) == 3 and parts[0] == FORMAT and re.fullmatch(r"[0-9a-f]{16}", parts[1])
                else "not a v2 sealed blob (an rsa1: blob of before 0009_secrets cannot be opened: resubmit)"
            )
            raise SecretError(UNSEAL_ERROR, detail)
        blocks = parts[2].split(".")
        message = bytearray()
        try:
            for i, block in enumerate(blocks, start=1):
                oaep = padding.OAEP(
                    mgf=padding.MGF1(hashes.SHA256()),
                    algorithm=hashes.SHA256(),
                    label=seal_label(job_id, submitter, i, len(blocks)),
                )
                message += key.decrypt(base64.b64decode(block, validate=True), oaep)
            value = json.loads(message.decode("utf-8"))
        except Exception:  # whatever it was (padding, label, base64, UTF-8, JSON): the one error
            raise SecretError(UNSEAL_ERROR, "the sealed blob does not open for this job and submitter") from None
        if not isinstance(value, dict):
            raise SecretError(UNSEAL_ERROR, "the sealed blob does not open for this job and submitter")
        return value


# -- named credentials ---------------------------------------------------------------------------------------


def read_credential(directory: Path, name: str) -> str:
    """The token in credential file ``directory/name``; SecretError naming the credential and the fix."""
    if not isinstance(name, str) or not CREDENTIAL_NAME.fullmatch(name):
        raise SecretError(f"credential name {name!r} is not a plain file name")
    path = Path(directory) / name
    fix = (
        f"put its token in {path} on every worker (systemd: LoadCredential={name}:/etc/pgml-tuned/credentials/{name}), "
        "then resubmit the job"
    )
    try:
        fd = os.open(path, os.O_RDONLY)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise SecretError(f"credential {name!r} is not a file on this worker: {fix}")
            data = f.read(MAX_CREDENTIAL_BYTES + 1)
    except FileNotFoundError:
        raise SecretError(f"credential {name!r} is not on this worker: {fix}") from None
    except OSError as e:
        raise SecretError(f"credential {name!r} is unreadable on this worker ({type(e).__name__}): {fix}") from None
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        token = ""
    if not token or len(data) > MAX_CREDENTIAL_BYTES:
        raise SecretError(f"credential {name!r} on this worker is not a token (empty, binary or over 64 KiB): {fix}")
    return token
