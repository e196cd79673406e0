"""JobContext: everything a recipe needs from the outside world — the job spec, the data, the starting model,
logging, checkpoints and the final commit. Recipes see only this (and pgml_tuned.models for loading)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .. import models
from ..errors import Interrupted
from .dist import Rank
from .events import Events
from .store import JobStore
from .uploader import CheckpointUploader


class JobContext:
    def __init__(
        self,
        spec: dict[str, Any],
        secrets: dict[str, Any],
        dsn: str,
        ticket: str,
        events: Events,
        rank: Rank | None = None,
    ) -> None:
        self.spec = spec
        # one of several ranks (dist.py): only rank 0 writes the job's logs, checkpoints and results
        self.rank = rank or Rank()
        self.secrets = secrets
        self.events = events
        self.job_id: int = spec["id"]
        self.attempt: int = spec["attempt"]
        self.model_id: int = spec["model_id"]
        self.hyperparams: dict[str, Any] = spec.get("hyperparams") or {}
        self.stop_requested = False
        self.stop_signal = "SIGTERM"  # the signal that asked it to stop (the worker forwards the daemon's)
        self.workdir = Path(
            tempfile.mkdtemp(prefix=f"job{self.job_id}-a{self.attempt}-", dir=os.environ.get("PGML_WORK_DIR") or None)
        )
        self.store = JobStore(
            dsn, ticket, self.job_id, self.attempt, self.model_id, events, self.workdir, writer=self.rank.main
        )
        self._upload_store: JobStore | None = None  # the uploader thread's own connection
        self.uploads = CheckpointUploader(self._upload_checkpoint, self.workdir / "uploads")
        self._resume: Path | None = None
        self._resume_looked_up = False

    @property
    def output_root(self) -> Path:
        """Where the Trainer writes checkpoints and the final model: the directory every rank shares."""
        return self.rank.shared or self.workdir

    # ---- inputs ----
    @property
    def training_args(self) -> dict[str, Any]:
        return dict(self.hyperparams.get("training_args") or {})

    @property
    def dataset_args(self) -> dict[str, Any]:
        return dict(self.hyperparams.get("dataset_args") or {})

    @property
    def relation(self) -> str:
        return f"{self.spec['relation_schema']}.{self.spec['relation_table']}"

    def secret(self, *names: str) -> str | None:
        for n in names:
            if self.secrets.get(n):
                return str(self.secrets[n])
        return None

    def read_relation(self, columns: list[str]) -> list[tuple[str | None, ...]]:
        """The named columns of the rows pgml.tune() copied from the job's relation when it was submitted
        (with the submitter's rights): every attempt of the job reads the same rows."""
        return self.store.read_rows(self.spec.get("snapshot_columns") or [], columns)

    def resolve_model(self, model_name: str, token: str | None = None) -> models.Resolved:
        return models.resolve(
            model_name, self.store, self.workdir, self.info, token=token, owner=self.spec.get("submitted_by") or ""
        )

    def resume_checkpoint(self) -> Path | None:
        """This job's latest stored checkpoint (any earlier attempt), downloaded once; None if there is none.

        Either way the start is recorded: earlier attempts' log rows past the checkpoint's step (all of them when
        a later attempt starts over) move to pgml.superseded_logs, so pgml.logs reports each step once."""
        if not self._resume_looked_up:
            self._resume_looked_up = True
            root = self.output_root / "resume"
            if self.rank.main:
                self._resume = self.store.latest_checkpoint(root)
                if self._resume is None:
                    self.start_over("no earlier attempt of this job stored a checkpoint")
            elif self.rank.local_main:
                # a gang's other host: its first rank fetches the same checkpoint (reads only) for its ranks
                self._resume = self.store.latest_checkpoint(root, record=False)
            self.rank.barrier()  # every rank resumes from the checkpoint its host's first rank downloaded
            if not self.rank.local_main:
                found = sorted(root.glob("checkpoint-*")) if root.is_dir() else []
                self._resume = found[0] if found else None
        return self._resume

    def start_over(self, why: str = "this task starts every attempt from the beginning") -> None:
        """A later attempt that starts from step 0 says so, and the steps earlier attempts logged move to
        pgml.superseded_logs (the first attempt has nothing to say)."""
        if self.attempt > 1 and self.rank.main:
            self.store.resume(0, f"starting over from step 0: {why}")

    # ---- outputs ----
    def info(self, message: str, level: str = "info", **fields: Any) -> None:
        """A line about the job: in the worker's log and in pgml.logs ({"message": ..., **fields}, kind info or
        warning), where CALL pgml.wait and `pgml-tuned logs` show it. Rank 0's only: the other ranks' lines would
        say the same."""
        if self.rank.main:
            self.store.note(message, level, **fields)

    def log(self, entry: dict[str, Any]) -> None:
        """One log row in pgml.logs (a Trainer log event, or a warning the user should see with the curve);
        rank 0's only."""
        if self.rank.main:
            self.store.log(entry)

    def store_checkpoint(self, step: int, src: Path, keep: int, *, move: bool = True) -> None:
        """Rank 0 stores the checkpoint every rank has written (call it on every rank: it waits for them all), in
        the background (uploader.py: waits for the previous upload first); `src` is moved away unless move=False
        (then hard-linked)."""
        self.rank.barrier()
        if self.rank.main and src.is_dir():
            self.uploads.submit(step, src, keep, move=move)
        self.rank.barrier()

    def wait_checkpoints(self) -> None:
        """Wait until the last checkpoint is stored (raising the error of an upload that failed); rank 0's."""
        if self.rank.main:
            self.uploads.wait()

    def _upload_checkpoint(self, step: int, src: Path, keep: int) -> None:
        if self._upload_store is None:
            self._upload_store = self.store.sibling()
        self._upload_store.store_checkpoint(step, src, keep)

    def save_results(self, model_dir: Path, metrics: dict[str, Any], base_model: str | None = None) -> None:
        """Commit the job: every file under model_dir into pgml.files, metrics, status — atomically (rank 0, once
        every rank has written its part of model_dir and the last checkpoint is stored)."""
        self.rank.barrier()
        if self.rank.main:
            self.wait_checkpoints()
            self.store.succeed(model_dir, metrics, base_model)

    def staging_table(self, columns: list[tuple[str, str]]) -> str:
        """load_dataset: this attempt's empty staging table of `columns` ((name, PostgreSQL type)), as schema.name."""
        return self.store.begin_dataset([n for n, _ in columns], [t for _, t in columns])

    def copy_rows(self, table: str, names: list[str], chunks: Callable[[], Iterable[tuple[bytes, int]]]) -> int:
        """COPY the CSV chunks() — (bytes, rows) — into that table, one statement; chunks() is called again
        from the start if the database connection is lost. Returns the rows copied."""
        return self.store.copy_csv(table, names, chunks)

    def save_dataset(self, rows: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Commit a load_dataset job: the staging table becomes pgml."<source>" with the job's success, atomically.
        Returns the job's metrics (table_name, rows, columns and `metrics`)."""
        return self.store.finish_dataset(rows, metrics)

    def interrupted(self, where: str) -> Interrupted:
        """The Interrupted to raise when a stop was asked for, naming its signal: "stopped by SIGINT at step 26"."""
        return Interrupted(f"stopped by {self.stop_signal} {where}")

    def check_stop(self) -> None:
        if self.stop_requested:
            raise self.interrupted("before training started")
