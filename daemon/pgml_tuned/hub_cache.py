"""A local model directory put into a Hugging Face hub cache under a hub id (`pgml-tuned hub add DIR --as ORG/NAME`),
so that workers with no access to the hub load it by that name, exactly as if they had downloaded it:
`from_pretrained("ORG/NAME")` with HF_HUB_OFFLINE=1 resolves it through huggingface_hub's own cache code.

The layout is the one huggingface_hub writes when it downloads a repository::

    {cache}/models--{org}--{name}/
        blobs/{sha256 of each file}
        snapshots/{revision}/{files}   # relative symbolic links into blobs/ (copies where links fail)
        refs/main                      # the revision: 40 hex digits, no newline

The revision is derived from the files' names and contents: adding the same files again changes nothing, changed
files make a new snapshot that refs/main then points to. Each step is atomic (a blob is written under a temporary
name then renamed; a snapshot is built in a temporary folder then renamed into place; refs/main is replaced last),
so a worker reading the cache meanwhile sees the old model or the new one, never a half.

The directory passes the checks of model_files (safetensors only, no code) first.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import model_refs
from .errors import JobError
from .model_files import ModelFileError, inspect


@dataclass(frozen=True)
class Added:
    repo_id: str
    snapshot: Path
    revision: str
    changed: bool  # False: the cache held these very files under this id already


def hub_cache_dir(hf_home: Path | None = None) -> Path:
    """The hub cache under `hf_home` ({hf_home}/hub), else this process's, as huggingface_hub finds it (HF_HUB_CACHE,
    else $HF_HOME/hub, else ~/.cache/huggingface/hub): run on a worker, the worker's own."""
    if hf_home is not None:
        return Path(hf_home) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def check_repo_id(repo_id: str) -> None:
    """A hub id a model_name may name (org/name, or a legacy name): the rules of model_refs."""
    try:
        ok = model_refs.kind(repo_id) == model_refs.HUB
    except JobError:
        ok = False
    if not ok:
        raise ModelFileError(
            f"{repo_id!r} is not a hub id",
            "write ORG/NAME (or a single NAME, like distilbert-base-uncased): letters, digits, '_', '-' and '.', "
            "no '--' or '..', at most 96 characters",
        )


def _revision(files: list[tuple[str, str]]) -> str:
    digest = hashlib.sha1(usedforsecurity=False)
    for rel, sha in files:
        for part in (rel.encode(), sha.encode()):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def add(directory: Path, repo_id: str, hf_home: Path | None = None) -> Added:
    """Put the model in `directory` into the hub cache (of `hf_home`, default this process's) as `repo_id`, once it
    passed the checks of model_files."""
    check_repo_id(repo_id)
    model = inspect(Path(directory))
    return store([(rel, path) for rel, path, _ in model.files], repo_id, hf_home)


def store(files: list[tuple[str, Path]], repo_id: str, hf_home: Path | None = None) -> Added:
    """Write `files` ((relative posix path, path) pairs) into the hub cache as `repo_id`'s snapshot, as a download
    would have: the layout alone, no checks (what a model from the hub is before the loaders check it)."""
    digests = [(rel, path, _sha256(path)) for rel, path in files]
    revision = _revision([(rel, sha) for rel, _, sha in digests])
    repo = hub_cache_dir(hf_home) / f"models--{repo_id.replace('/', '--')}"
    blobs, snapshots, refs = repo / "blobs", repo / "snapshots", repo / "refs"
    for d in (blobs, snapshots, refs):
        d.mkdir(parents=True, exist_ok=True)
    for _, path, sha in digests:
        blob = blobs / sha
        if not blob.exists():
            tmp = blobs / f".{sha}.{os.getpid()}.incomplete"
            shutil.copyfile(path, tmp)
            os.replace(tmp, blob)
    snapshot = snapshots / revision
    changed = not snapshot.is_dir()
    if changed:
        staging = Path(tempfile.mkdtemp(prefix=f".{revision}.", dir=snapshots))
        try:
            for rel, _, sha in digests:
                dest = staging / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    # relative to where the link will be once the snapshot is in place (same depth as staging)
                    dest.symlink_to(os.path.relpath(blobs / sha, (snapshot / rel).parent))
                except OSError:
                    shutil.copyfile(blobs / sha, dest)
            try:
                os.rename(staging, snapshot)
            except OSError:
                if not snapshot.is_dir():  # not another `hub add` of the same files that got there first
                    raise
                changed = False
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    main = refs / "main"
    if not main.is_file() or main.read_text(encoding="ascii").strip() != revision:
        tmp = refs / f".main.{os.getpid()}"
        tmp.write_text(revision, encoding="ascii")
        os.replace(tmp, main)
        changed = True
    return Added(repo_id, snapshot, revision, changed)
