"""Checkpoints stream into PostgreSQL while training goes on.

The Trainer is synchronous: storing a checkpoint inside its on_save callback stopped training for the whole upload
(273 MB: ~1.5 s per save). Now on_save only hands the checkpoint directory over (a rename out of the Trainer's
output directory: instant) and returns; ONE dedicated thread of the child uploads it, over a database connection of
its own (a psycopg connection is never shared between threads), in one transaction (jobs.store_checkpoint):

- at most one checkpoint is in flight: the next save waits until the previous upload has committed (back-pressure;
  the disk never holds more than one staged checkpoint besides the Trainer's, memory never more than one 8 MB part);
- a checkpoint row becomes visible — for a resume to pick — only when its transaction commits with all its files;
  a child killed mid-upload leaves nothing behind (its transaction is rolled back when its connection closes);
- an upload's error (a lost lease, the role's checkpoint budget) is raised in the training thread at the next save
  or at wait(), so the job fails (or stops) the way a synchronous store would have made it;
- the job waits for the last upload before it ends: before its results are committed, and before an attempt
  stopped by SIGTERM exits to be resumed.

The thread does nothing but I/O (file reads, COPY), which releases the GIL: the training thread keeps running.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

UPLOAD_NICENESS = 10  # added to the upload thread's nice value

Upload = Callable[[int, Path, int], None]  # (step, directory, keep): store it, in one transaction


class CheckpointUploader:
    def __init__(self, upload: Upload, staging: Path) -> None:
        self._upload = upload
        self.staging = staging
        self._queue: queue.Queue[tuple[int, Path, int]] = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def submit(self, step: int, src: Path, keep: int, *, move: bool = True) -> None:
        """Upload checkpoint directory `src` of `step` in the background, keeping the newest `keep` stored.

        Waits first for the upload before it (raising its error). `src` is moved away (move=True: the Trainer
        forgets it) or hard-linked (move=False: the Trainer still needs it, e.g. load_best_model_at_end)."""
        self.wait()
        self.staging.mkdir(parents=True, exist_ok=True)
        staged = self.staging / src.name
        shutil.rmtree(staged, ignore_errors=True)
        if move:
            os.rename(src, staged)
        else:
            shutil.copytree(src, staged, copy_function=os.link)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pgml-checkpoint-upload", daemon=True)
            self._thread.start()
        self._queue.put((step, staged, keep))

    def wait(self) -> None:
        """Block until no upload is in flight; raise the error of one that failed."""
        self._queue.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        # the upload can wait, training cannot: where CPUs are scarce, this thread yields to the training thread
        # (Linux: a thread's own nice value; the upload still has until the next save to finish)
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), UPLOAD_NICENESS)
        while True:
            step, staged, keep = self._queue.get()
            try:
                self._upload(step, staged, keep)
            except BaseException as e:  # handed to the training thread (wait/submit)
                self._error = e
            finally:
                shutil.rmtree(staged, ignore_errors=True)
                self._queue.task_done()
