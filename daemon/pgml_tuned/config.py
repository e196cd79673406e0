"""One typed Settings object: command-line flags > environment (PGML_*) > defaults."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


def _default_home() -> Path:
    return Path(os.environ.get("PGML_HOME") or Path.home() / ".local" / "share" / "pgml-tuned")


def _default_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Settings:
    """Everything the daemon and the CLI can be configured with.

    Each field can be set from the environment as PGML_<FIELD> (upper case) and most from a flag of the
    same name (``--lease-seconds 30``).
    """

    dsn: str | None = None  # None: the embedded PostgreSQL under `home`
    home: Path = field(default_factory=_default_home)
    worker_id: str = field(default_factory=_default_worker)
    concurrency: int = 1  # jobs one daemon runs at once (one child process each)
    gpus: str | None = None  # "0,1": job slot i gets CUDA_VISIBLE_DEVICES=gpus[i]
    lease_seconds: float = 30.0  # a job whose lease is older than this is taken over
    heartbeat_seconds: float = 5.0  # how often a running job's lease is renewed
    poll_seconds: float = 2.0  # fallback poll (a lost NOTIFY never stalls the queue)
    grace_seconds: float = 60.0  # SIGTERM: time children get to checkpoint before SIGKILL
    log_format: str = "auto"  # auto | json | console
    log_level: str = "info"
    secret_key_file: Path | None = None  # default: <home>/worker.key
    work_dir: Path | None = None  # scratch space for children; default: <home>/work

    @property
    def key_file(self) -> Path:
        return self.secret_key_file or self.home / "worker.key"

    @property
    def scratch(self) -> Path:
        return self.work_dir or self.home / "work"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from PGML_* variables, then `overrides` (flags; None means "not given")."""
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"PGML_{f.name.upper()}")
            if raw is not None and raw != "":
                values[f.name] = _coerce(f.name, f.type, raw)
        settings = cls(**values)
        given = {k: _coerce(k, _type_of(k), v) if isinstance(v, str) else v
                 for k, v in overrides.items() if v is not None}
        settings = replace(settings, **given)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.heartbeat_seconds <= 0 or self.lease_seconds <= self.heartbeat_seconds * 2:
            raise ValueError(
                f"lease_seconds ({self.lease_seconds}) must be more than twice heartbeat_seconds "
                f"({self.heartbeat_seconds}): a lease must survive one missed heartbeat"
            )
        if self.log_format not in ("auto", "json", "console"):
            raise ValueError(f"log_format must be auto, json or console, got {self.log_format!r}")
        if self.gpus is not None and len(self.gpu_list) < self.concurrency:
            raise ValueError(f"--gpus {self.gpus!r} names fewer GPUs than --concurrency {self.concurrency}")

    @property
    def gpu_list(self) -> list[str]:
        return [g.strip() for g in (self.gpus or "").split(",") if g.strip()]


def _type_of(name: str) -> str:
    return next(str(f.type) for f in fields(Settings) if f.name == name)


def _coerce(name: str, typ: Any, raw: str) -> Any:
    t = str(typ)
    try:
        if t.startswith("int"):
            return int(raw)
        if t.startswith("float"):
            return float(raw)
        if "Path" in t:
            return Path(raw).expanduser()
    except ValueError as e:
        raise ValueError(f"PGML_{name.upper()}={raw!r} is not a valid {t.split(' ')[0]}") from e
    return raw
