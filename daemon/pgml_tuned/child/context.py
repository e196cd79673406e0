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
from .events import Events
from .store import JobStore
from .uploader import CheckpointUploader


class JobContext:
    def __init__(self, spec: dict[str, Any], secrets: dict[str, Any], dsn: str, ticket: str, events: Events) -> None:
        self.spec = spec
        self.secrets = secrets
        self.events = events
        self.job_id: int = spec["id"]
        self.attempt: int = spec["attempt"]
        self.model_id: int = spec["model_id"]
        self.hyperparams: dict[str, Any] = spec.get("hyperparams") or {}
        self.stop_requested = False
        self.workdir = Path(
            tempfile.mkdtemp(prefix=f"job{self.job_id}-a{self.attempt}-", dir=os.environ.get("PGML_WORK_DIR") or None)
        )
        self.store = JobStore(dsn, ticket, self.job_id, self.attempt, self.model_id, events, self.workdir)
        self._upload_store: JobStore | None = None  # the uploader thread's own connection
        self.uploads = CheckpointUploader(self._upload_checkpoint, self.workdir / "uploads")
        self._resume: Path | None = None
        self._resume_looked_up = False

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
        """This job's latest stored checkpoint (any earlier attempt), downloaded once; None if there is none."""
        if not self._resume_looked_up:
            self._resume_looked_up = True
            self._resume = self.store.latest_checkpoint(self.workdir / "resume")
        return self._resume

    # ---- outputs ----
    def info(self, message: str, level: str = "info", **fields: Any) -> None:
        self.events.info(message, level, **fields)

    def log(self, entry: dict[str, Any]) -> None:
        """One log row in pgml.logs (a Trainer log event, or a warning the user should see with the curve)."""
        self.store.log(entry)

    def store_checkpoint(self, step: int, src: Path, keep: int, *, move: bool = True) -> None:
        """Store checkpoint directory `src` in PostgreSQL in the background (uploader.py: waits for the previous
        upload first); `src` is moved away unless move=False (then hard-linked)."""
        self.uploads.submit(step, src, keep, move=move)

    def wait_checkpoints(self) -> None:
        """Wait until the last checkpoint is stored (raising the error of an upload that failed)."""
        self.uploads.wait()

    def _upload_checkpoint(self, step: int, src: Path, keep: int) -> None:
        if self._upload_store is None:
            self._upload_store = self.store.sibling()
        self._upload_store.store_checkpoint(step, src, keep)

    def save_results(self, model_dir: Path, metrics: dict[str, Any], base_model: str | None = None) -> None:
        """Commit the job: every file under model_dir into pgml.files, metrics, status — atomically."""
        self.wait_checkpoints()
        self.store.succeed(model_dir, metrics, base_model)

    def staging_table(self, columns: list[tuple[str, str]]) -> str:
        """load_dataset: this attempt's empty staging table of `columns` ((name, PostgreSQL type)), in pgml."""
        return self.store.begin_dataset([n for n, _ in columns], [t for _, t in columns])

    def copy_rows(self, table: str, names: list[str], chunks: Callable[[], Iterable[tuple[bytes, int]]]) -> int:
        """COPY the CSV chunks() — (bytes, rows) — into pgml.<table>, one statement; chunks() is called again
        from the start if the database connection is lost. Returns the rows copied."""
        return self.store.copy_csv(table, names, chunks)

    def save_dataset(self, rows: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Commit a load_dataset job: the staging table becomes pgml."<source>" with the job's success, atomically.
        Returns the job's metrics (table_name, rows, columns and `metrics`)."""
        return self.store.finish_dataset(rows, metrics)

    def check_stop(self) -> None:
        if self.stop_requested:
            raise Interrupted("stopped by SIGTERM before training started")
