"""Private hub models in a worker's cache: who may use them.

A worker keeps what it downloads in its Hugging Face cache, and with HF_HUB_OFFLINE=1 (or the hub out of reach)
`from_pretrained` serves any cached copy to anyone. A private or gated model fetched for one job with its token
must not be served that way to a later job without a token that may read it. So:

- online, every job's access is checked with the hub itself, with the job's own token (or none):
  `huggingface_hub.auth_check` (a private model another token fetched is "not found" to this one);
- whenever a model is fetched with a token and the hub says it is private or gated, it is recorded in a small
  ledger in the worker's hub home, `$HF_HOME/pgml-private.json` (repo id → sha256 of each token that fetched it;
  never the tokens), written atomically under a lock;
- offline (or with the hub unreachable), a model in the ledger is served only to a job whose token's hash is
  recorded for it. A model never fetched with a token is public as far as this worker knows.

models.resolve applies this to every hub model a training job loads; the inference lane calls
`check_cached_access` the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import JobError

LEDGER_NAME = "pgml-private.json"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set: nothing is fetched, cached copies are served."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def ledger_path(hf_home: Path | None = None) -> Path:
    """$HF_HOME/pgml-private.json (HF_HOME as huggingface_hub reads it)."""
    if hf_home is None:
        from huggingface_hub import constants

        hf_home = Path(constants.HF_HOME)
    return Path(hf_home) / LEDGER_NAME


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def read_ledger(path: Path) -> dict[str, list[str]]:
    """repo id (lower case) → hashes of the tokens that fetched it; {} when there is none. A ledger that cannot
    be read refuses every cached private model rather than forgetting them: the error says where it is."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise JobError(
            f"the worker's ledger of private hub models ({path}) cannot be read ({e}); "
            "an operator should repair or remove it"
        ) from e
    if not isinstance(data, dict):
        raise JobError(f"the worker's ledger of private hub models ({path}) is not a JSON object; repair or remove it")
    return {str(k): [str(h) for h in v] for k, v in data.items() if isinstance(v, list)}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside the ledger (children of several jobs may record at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def record_private(repo_id: str, token: str, *, hf_home: Path | None = None) -> None:
    """Record that `token` fetched the private (or gated) model `repo_id` into this worker's cache. The ledger is
    replaced atomically (a temporary file, fsync, rename) under a lock: a reader sees the old or the new one."""
    path = ledger_path(hf_home)
    with _locked(path):
        ledger = read_ledger(path)
        hashes = ledger.setdefault(repo_id.lower(), [])
        if token_hash(token) in hashes:
            return
        hashes.append(token_hash(token))
        fd, tmp = tempfile.mkstemp(prefix=f".{LEDGER_NAME}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(ledger, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def _refused(repo_id: str, token: str | None, why: str) -> JobError:
    return JobError(
        f"model {repo_id!r} is private on this worker ({why}) and "
        + ("the job's token may not read it" if token else "the job has no Hugging Face token")
        + '; pass a token that may read it: "hub_token": "hf_..." in hyperparams.training_args '
        "(or a named credential)"
    )


def check_cached_access(repo_id: str, token: str | None, *, hf_home: Path | None = None) -> None:
    """Refuse (JobError) a hub model the job's token may not read. Online: the hub decides (auth_check with the
    job's token, never the worker's login); offline or unreachable: this worker's ledger decides."""
    token = token or None
    if not hub_offline():
        from huggingface_hub import auth_check
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

        try:
            auth_check(repo_id, token=token or False)
            return
        except (GatedRepoError, RepositoryNotFoundError) as e:
            raise _refused(repo_id, token, f"the hub says: {type(e).__name__}") from e
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status in (401, 403, 404):
                raise _refused(repo_id, token, f"the hub answered HTTP {status}") from e
        except Exception:  # the hub is out of reach: decide as offline
            pass
    hashes = read_ledger(ledger_path(hf_home)).get(repo_id.lower())
    if hashes is None or (token and token_hash(token) in hashes):
        return
    raise _refused(repo_id, token, "it was downloaded with another token")


def note_fetched(repo_id: str, token: str | None, *, hf_home: Path | None = None) -> None:
    """After a model was fetched online with a job's token: record it when the hub says it is private or gated
    (or cannot say: then it is treated as private)."""
    if not token or hub_offline():
        return
    from huggingface_hub import model_info

    try:
        info = model_info(repo_id, token=token)
        private = bool(info.private) or bool(info.gated)
    except Exception:
        private = True
    if private:
        record_private(repo_id, token, hf_home=hf_home)


# Exception classes (by name: huggingface_hub, httpx, httpcore and requests each have their own, some vendored)
# that mean the hub could not be reached, or that it was not asked because the worker is offline.
_UNREACHABLE = frozenset(
    {
        "ConnectError",
        "ConnectTimeout",
        "ConnectionError",
        "NetworkError",
        "TimeoutException",
        "LocalEntryNotFoundError",
        "OfflineModeIsEnabled",
        "gaierror",
    }
)


def unreachable(error: BaseException) -> bool:
    """Whether `error` (or an exception it was raised from) says the hub could not be reached."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if any(cls.__name__ in _UNREACHABLE for cls in type(e).__mro__):
            return True
        e = e.__cause__ or e.__context__
    return False


def unreachable_message(what: str) -> str:
    """Why `what` (e.g. "fetch model 'org/name'") failed, when unreachable() says the hub was out of reach."""
    if hub_offline():
        return (
            f"cannot {what}: the worker runs with HF_HUB_OFFLINE=1 and it is not in the worker's Hugging Face "
            "cache: use a cached or local model (a directory on the workers, or pgml:<project>), or give the "
            "worker network access and unset HF_HUB_OFFLINE"
        )
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return (
        f"cannot {what}: the worker cannot reach the Hugging Face Hub ({endpoint}): set HF_HUB_OFFLINE=1 and use "
        "a cached or local model, or give the worker network access"
    )
