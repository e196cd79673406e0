"""Running the suite in parallel (pytest-xdist workers, each a process with its own databases and daemons).

- :func:`file_lock` -- one process at a time through a block (across workers and across test sessions): the
  embedded server's first start under .pgml-test/.
- :class:`Turns` -- a heavy test's turn to run (tests/conftest.py says which are heavy): side by side with the other
  workers' heavy tests (a shared lock), while a serial one runs alone among them (the lock exclusive: timing asserts,
  leases of a few seconds that CPU contention would stretch). Both pass a turnstile first, so that a serial test
  waiting for its turn is not overtaken by the heavy tests the other workers start meanwhile. Light tests take no
  turn.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Turns:
    """The turns of one worker: shared while it runs heavy tests, exclusive while it runs serial ones. `run_dir` is
    the directory every worker of this run shares (None: no other worker, nothing to lock)."""

    def __init__(self, run_dir: Path | None) -> None:
        self.run_dir = run_dir
        self._alone: IO[bytes] | None = None  # held while this worker runs a block of serial tests
        self._turnstile: IO[bytes] | None = None

    def _open(self, name: str) -> IO[bytes]:
        assert self.run_dir is not None
        return open(self.run_dir / name, "a+b")

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """A heavy test: runs beside the other workers' heavy tests, never beside a serial one."""
        if self.run_dir is None or self._alone is not None:
            yield
            return
        with self._open("turnstile") as turnstile, self._open("tests") as tests:
            fcntl.flock(turnstile, fcntl.LOCK_EX)  # waits while a serial test waits for its turn or runs
            fcntl.flock(tests, fcntl.LOCK_SH)
            fcntl.flock(turnstile, fcntl.LOCK_UN)
            try:
                yield
            finally:
                fcntl.flock(tests, fcntl.LOCK_UN)

    def begin_alone(self) -> None:
        """From now on this worker runs alone: no new test starts elsewhere, the running ones end first."""
        if self.run_dir is None or self._alone is not None:
            return
        self._turnstile = self._open("turnstile")
        fcntl.flock(self._turnstile, fcntl.LOCK_EX)
        self._alone = self._open("tests")
        fcntl.flock(self._alone, fcntl.LOCK_EX)

    def end_alone(self) -> None:
        """The other workers may run again."""
        for f in (self._alone, self._turnstile):
            if f is not None:
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()
        self._alone = self._turnstile = None
