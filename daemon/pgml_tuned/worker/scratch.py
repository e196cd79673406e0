"""The scratch space of job attempts under the worker's work directory (settings.scratch, default <home>/work).

Every attempt gets a directory of its own, made by the worker before its child starts:

    <work>/job<ID>-a<ATTEMPT>-<random>/

The child works only inside it (PGML_WORK_DIR): the model it downloads, the resumed checkpoint, the Trainer's
checkpoints, the saved model. The worker removes it when the child has exited, however it ended (succeeded,
failed, cancelled, killed by the worker or the kernel): nothing of a job is left on the worker's disk.

Who holds a directory is an flock: the worker holds a shared lock on it from before its name is visible until it
has removed it, and the child takes one too (child/__main__.py); the kernel drops a lock when its holder dies. A
daemon killed with SIGKILL cannot remove its attempts' directories, so every daemon, when it starts, sweeps its
work directory (sweep()): an attempt directory that nobody holds a lock on is a leftover and is removed — never
one another daemon sharing the work directory runs a job in (it holds the lock), never anything but a direct
subdirectory (not a symlink) with an attempt directory's name.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import anyio

from .. import logconfig

log = logconfig.get("pgml_tuned.daemon")

# an attempt's directory; ".job…" is one being created (made, locked, then renamed to its visible name), and
# "child-…" the name an attempt directory had before (a leftover of an older version)
ATTEMPT_DIR = re.compile(r"^(?:\.?job\d+-a\d+-[A-Za-z0-9_]+|child-[A-Za-z0-9_]+)$")
# a directory still being created is left alone this long (its creator locks it microseconds after making it)
CREATING_GRACE_SECONDS = 60.0


class AttemptDir:
    """An attempt's scratch directory, locked (shared) by this process until remove()."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def create(cls, scratch: Path, job_id: int, attempt: int, owner: tuple[int, int] | None = None) -> AttemptDir:
        """A new directory job<id>-a<attempt>-XXXX under `scratch` (mode 0700; chowned to `owner` (uid, gid)
        when given), locked before its name is visible to a sweep."""
        scratch.mkdir(parents=True, exist_ok=True)
        hidden = Path(tempfile.mkdtemp(prefix=f".job{job_id}-a{attempt}-", dir=scratch))
        fd = os.open(hidden, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            if owner is not None:
                os.chown(hidden, *owner)
            path = hidden.with_name(hidden.name[1:])
            os.rename(hidden, path)
        except BaseException:
            os.close(fd)
            shutil.rmtree(hidden, ignore_errors=True)
            raise
        return cls(path, fd)

    def remove(self) -> None:
        """Remove the directory and everything in it, then let go of the lock. Idempotent."""
        if self._fd is None:
            return
        try:
            shutil.rmtree(self.path, ignore_errors=True)
        finally:
            os.close(self._fd)
            self._fd = None


def sweep(scratch: Path) -> list[tuple[str, int]]:
    """Remove the attempt directories under `scratch` nobody holds (leftovers of a killed daemon or child).

    Returns (name, bytes) of each directory removed."""
    removed: list[tuple[str, int]] = []
    try:
        entries = list(os.scandir(scratch))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not ATTEMPT_DIR.match(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        if entry.name.startswith("."):
            with contextlib.suppress(OSError):
                if time.time() - entry.stat(follow_symlinks=False).st_mtime < CREATING_GRACE_SECONDS:
                    continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a running attempt's (this host's other daemon, or its child still exiting)
            size = tree_bytes(Path(entry.path))
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append((entry.name, size))
        finally:
            os.close(fd)
    return removed


async def sweep_leftovers(scratch: Path) -> None:
    """sweep() when a daemon starts (in a thread), saying what it removed: the scratch directories of attempts of
    a killed daemon (or child) that no living process holds."""
    removed = await anyio.to_thread.run_sync(sweep, scratch)
    if removed:
        log.info(
            "daemon.scratch_removed",
            message=f"removed {len(removed)} scratch director{'y' if len(removed) == 1 else 'ies'} of jobs "
            f"no process runs any more ({sum(b for _, b in removed) / 1e6:.1f} MB) from {scratch}",
            directories=[name for name, _ in removed],
            bytes=sum(b for _, b in removed),
        )


def tree_bytes(root: Path) -> int:
    """The bytes of the regular files under root (not following symlinks)."""
    total = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                total += st.st_size
    return total
