"""What a model_name may name: the rules every path that loads a model applies (tune in every recipe, the serving
lane's transform / chat / generate, predict_batch, every restart of a job).

A model reference is exactly one of
- `pgml:model:<id>` / `pgml:<project>`: a stored model the requester may read (models.resolve asks the database);
- a Hugging Face hub id (`org/name` or a legacy `name`): the administrators' allow-list and the private-model
  ledger are checked for the requester on every use, cached on the worker or not, warm in the serving cache or not;
- an absolute directory under one of the administrator's model directories (the `model_dirs` setting,
  PGML_MODEL_DIRS, empty by default): its real path (symlinks and `..` resolved) must lie inside a listed
  directory, and never inside the worker's own state (home, scratch, keyring, credentials, Hugging Face cache),
  even when a listed directory contains it. That state holds other users' models (the serving lane's cache, a
  job's downloaded start model, private hub downloads): naming it by path would go around the rules above.

Anything else (a relative path, `~`, a name that is neither) is refused with a message naming the fix.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from .errors import JobError

Kind = Literal["stored", "hub", "directory"]
STORED: Final = "stored"
HUB: Final = "hub"
DIRECTORY: Final = "directory"

# huggingface_hub's validate_repo_id: `name` or `namespace/name` of word characters, '-' and '.', no '--' or '..'
_HUB_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)?$")
_FIX = (
    "name a hub id (org/name), a stored model (pgml:<project> or pgml:model:<id>), or a directory under the "
    "workers' model directories"
)


def kind(model_name: str) -> Kind:
    """Which of the three a model_name is (a JobError when it is none of them)."""
    if model_name.startswith("pgml:"):
        return STORED
    if model_name.startswith(("/", ".", "~")) or "\\" in model_name:
        return DIRECTORY
    if _HUB_ID.match(model_name) and ".." not in model_name and "--" not in model_name and len(model_name) <= 96:
        return HUB
    raise JobError(f"model_name {model_name!r} is not a model reference: {_FIX}")


def identities(dirs: list[Path]) -> str:
    """PGML_STATE_IDS: the worker's state directories as `device:inode` pairs, for a child to recognise them
    without learning where they are (a child is told no path of the worker's keyring or credentials)."""
    ids = []
    for d in dirs:
        try:
            st = os.stat(d)
        except OSError:
            continue  # not there (yet): nothing can be inside it
        ids.append(f"{st.st_dev}:{st.st_ino}")
    return ",".join(ids)


def _parse_ids(value: str | None) -> frozenset[tuple[int, int]]:
    pairs = (item.split(":", 1) for item in (value or "").split(",") if ":" in item)
    return frozenset((int(dev), int(ino)) for dev, ino in pairs if dev.isdigit() and ino.isdigit())


def split_dirs(value: str | None) -> list[Path]:
    """A path-separated list (PGML_MODEL_DIRS) as paths; empty entries are ignored."""
    return [Path(p).expanduser() for p in (value or "").split(os.pathsep) if p.strip()]


@dataclass(frozen=True)
class Places:
    """The directories a worker may load models from, and its own state, which it never loads models from."""

    model_dirs: tuple[Path, ...]  # real paths
    state: tuple[tuple[Path, str], ...]  # (real path, what it is)
    state_ids: frozenset[tuple[int, int]] = frozenset()  # the worker's state directories, (st_dev, st_ino)

    @classmethod
    def of(
        cls, model_dirs: list[Path], state: list[tuple[Path, str]], state_ids: frozenset[tuple[int, int]] = frozenset()
    ) -> Places:
        return cls(
            tuple(Path(os.path.realpath(d)) for d in model_dirs),
            # the deepest first: a Hugging Face cache inside the worker's home is named as such
            tuple(sorted(((Path(os.path.realpath(p)), what) for p, what in state), key=lambda s: -len(s[0].parts))),
            state_ids,
        )

    def in_worker_state(self, real: Path) -> bool:
        """Whether `real` is, or lies inside, one of the worker's state directories known by identity."""
        if not self.state_ids:
            return False
        for p in (real, *real.parents):
            try:
                st = os.stat(p)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in self.state_ids:
                return True
        return False

    @classmethod
    def from_env(cls) -> Places:
        """This process's: PGML_MODEL_DIRS and PGML_STATE_IDS (set by the worker for its children and its serving
        process: its state directories by identity, not by path), its own scratch (PGML_WORK_DIR), the Hugging Face
        caches, and the default state directory."""
        from huggingface_hub import constants

        from .config import _default_home

        state: list[tuple[Path, str]] = []
        state.append((_default_home(), "the worker's state"))
        if os.environ.get("PGML_WORK_DIR"):
            state.append((Path(os.environ["PGML_WORK_DIR"]), "the worker's scratch space"))
        hf = [constants.HF_HOME, constants.HF_HUB_CACHE, os.environ.get("HF_DATASETS_CACHE")]
        state += [(Path(p), "the worker's Hugging Face cache") for p in hf if p]
        return cls.of(
            split_dirs(os.environ.get("PGML_MODEL_DIRS")), state, _parse_ids(os.environ.get("PGML_STATE_IDS"))
        )

    def listed(self) -> str:
        return ", ".join(str(d) for d in self.model_dirs)


def model_dir(model_name: str, places: Places) -> Path:
    """The real path of the directory `model_name` names, when the rules allow it (a JobError saying why not)."""
    if not model_name.startswith("/"):
        raise JobError(
            f"model_name {model_name!r} is not an absolute path (a path relative to the worker, or to a home "
            "directory, means something else on every worker): write the directory's absolute path under the "
            f"workers' model directories{_listed(places)}, or use a hub id or a stored model (pgml:<project> or "
            "pgml:model:<id>)"
        )
    real = Path(os.path.realpath(model_name))
    what = next((what for state, what in places.state if real == state or real.is_relative_to(state)), None)
    if what is None and places.in_worker_state(real):
        what = "the worker's state"
    if what is not None:
        raise JobError(
            f"model_name {model_name!r} lies in {what}: models are never loaded from there (it holds other "
            "users' models and the worker's files); name the model by its hub id or as a stored model "
            "(pgml:<project> or pgml:model:<id>)"
        )
    if not any(real == d or real.is_relative_to(d) for d in places.model_dirs):
        where = "resolves (through a symlink or '..') to a path that is" if str(real) != model_name else "is"
        raise JobError(
            f"model_name {model_name!r} {where} not in the workers' model directories (PGML_MODEL_DIRS"
            + (f": {places.listed()}" if places.model_dirs else ", which lists none on this worker")
            + "); an administrator can add its directory to PGML_MODEL_DIRS (`pgml-tuned serve --model-dirs DIR`), "
            "or load the model from the hub or as a stored model (pgml:<project> or pgml:model:<id>)"
        )
    if not real.is_dir():
        raise JobError(
            f"model_name {model_name!r} is not a directory on worker {os.uname().nodename}; "
            "pass a directory that exists on every worker"
        )
    return real


def _listed(places: Places) -> str:
    return f" ({places.listed()})" if places.model_dirs else " (PGML_MODEL_DIRS; none on this worker)"
