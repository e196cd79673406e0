"""One typed Settings object: command-line flags > environment (PGML_<FIELD>) > defaults.

Each field's type (from its annotation) parses its value, wherever it comes from; each field's help text
is its `--flag`'s help (cli/parser.py builds the flags from these fields).
"""

from __future__ import annotations

import os
import socket
import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any


def _default_home() -> Path:
    return Path(os.environ.get("PGML_HOME") or Path.home() / ".local" / "share" / "pgml-tuned")


def _default_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def setting(
    default: Any = MISSING,
    *,
    help: str,
    factory: Any = MISSING,
    choices: tuple[str, ...] | None = None,
    flag: bool = True,
) -> Any:
    """A Settings field with its help text (and choices); `flag=False`: environment only, no --flag."""
    metadata = {"help": help, "choices": choices, "flag": flag}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    """Everything the daemon and the CLI can be configured with."""

    dsn: str | None = setting(
        None, help="PostgreSQL connection string (default: $PGML_DSN, else the embedded server under --home)"
    )
    listen_dsn: str | None = setting(
        None,
        help="a direct connection to PostgreSQL (not through a transaction pooler such as PgBouncer) for LISTEN and "
        "the serving lane's session advisory locks (default: the DSN; without it behind a pooler the worker polls "
        "every poll_seconds and does not serve pgml.transform)",
    )
    home: Path = setting(
        factory=_default_home,
        help="state directory: embedded server, keyring, credentials, scratch space "
        "(default: $PGML_HOME or ~/.local/share/pgml-tuned)",
    )
    worker_id: str = setting(factory=_default_worker, help="this worker's name in pgml.jobs.worker (default: host:pid)")
    concurrency: int = setting(1, help="jobs this daemon runs at once, one child process each")
    gpus: str | None = setting(
        None,
        help="comma-separated GPU ids, one per job slot (CUDA_VISIBLE_DEVICES); a job asking for N GPUs "
        "(hyperparams.resources.gpus) takes N slots",
    )
    lease_seconds: float = setting(
        30.0, help="a running job whose lease is older than this is taken over by another worker"
    )
    heartbeat_seconds: float = setting(5.0, help="how often the leases of running jobs are renewed")
    poll_seconds: float = setting(
        2.0,
        help="how often to look for work without a NOTIFY (a lost NOTIFY never "
        "stalls the queue) and reap expired leases",
    )
    claim_spread: int = setting(
        8,
        help="herd control for large fleets: a job_queued NOTIFY makes about this many of the idle workers claim "
        "(each with probability claim_spread / idle workers in pgml.worker_status, re-read about once a minute), "
        "and the fleet's polls are spread so that about this many poll per poll_seconds; 0: every notified "
        "worker claims and each polls every poll_seconds",
    )
    grace_seconds: float = setting(60.0, help="on SIGTERM: how long children get to checkpoint before SIGKILL")
    gang_seconds: float = setting(
        60.0,
        help="a job across several workers (hyperparams.resources.nodes): how long its leader waits for the other "
        "workers to join before it gives the job back to the queue, and how long their ranks wait for each other "
        "at the rendezvous",
    )
    gang_address: str | None = setting(
        None,
        help="the address the other workers of a gang reach this worker's rank 0 at, when it leads a job across "
        "several workers (default: this host's name resolved; 127.0.0.1 when it does not resolve)",
    )
    log_format: str = setting(
        "auto",
        help="log lines as JSON (services) or pretty (a terminal); auto: JSON unless stderr is a terminal",
        choices=("auto", "json", "console"),
    )
    log_level: str = setting(
        "info", help="the least important log lines shown", choices=("debug", "info", "warning", "error")
    )
    serving: bool = setting(
        True,
        help="answer inference requests (pgml.transform, chat) in a serving process beside the training children "
        "(true/false)",
    )
    model_cache_mb: int = setting(
        4096, help="memory the serving process keeps warm models in (least recently used out first)"
    )
    lora_serving: str = setting(
        "multi",
        help="how the serving process serves LoRA adapters: multi (one copy of each base model, adapters loaded "
        "onto it unmerged, requests for different adapters in one batch) or merged (each adapter merged into a "
        "copy of its base of its own)",
        choices=("multi", "merged"),
    )
    adapter_cache_count: int = setting(
        64, help="LoRA adapters the serving process keeps loaded on their base models (least recently used out first)"
    )
    adapter_cache_mb: int = setting(
        1024, help="memory the serving process keeps loaded LoRA adapters in, besides their base models"
    )
    metrics_port: int | None = setting(
        None,
        help="serve Prometheus metrics at http://<metrics-host>:PORT/metrics (default: off; 0 picks a free port)",
    )
    metrics_host: str = setting(
        "127.0.0.1", help="the address /metrics listens on (default 127.0.0.1; 0.0.0.0 for a remote Prometheus)"
    )
    keyring_dir: Path | None = setting(
        None,
        help="the workers' private sealing keys, *.pem files of mode 0600 (default: <home>/keyring)",
        flag=False,
    )
    credentials_dir: Path | None = setting(
        None,
        help="named credentials, one file per name holding its token (default: $CREDENTIALS_DIRECTORY, "
        "systemd LoadCredential=, else <home>/credentials)",
        flag=False,
    )
    work_dir: Path | None = setting(None, help="scratch space for children (default: <home>/work)", flag=False)
    datasets_dir: Path | None = setting(
        None,
        help="the directory (and below) whose csv / json / jsonl / parquet files pgml.load_dataset may read on "
        "this worker (default: none; hub datasets only)",
    )
    model_dirs: str | None = setting(
        None,
        help="directories (absolute, separated by ':') whose models pgml.tune, pgml.transform and predict_batch may "
        "load by path (model_name '/srv/models/x'); never the worker's own state (home, scratch, keyring, "
        "credentials, Hugging Face cache), even below a listed directory (default: none: models come from the hub "
        "or pgml.models only)",
    )
    child_dsn: str | None = setting(
        None,
        help="the training children's login (a member of pgml_child only); default: the embedded server's child "
        "login, else the worker's own DSN (children then still use only their ticketed functions)",
    )
    serving_dsn: str | None = setting(
        None,
        help="the serving process's login (a member of pgml_serving only: the inference lane's functions, no "
        "table), a direct connection; default: the embedded server's serving login, else the worker's own DSN "
        "as role pgml_serving (SET ROLE: the process then still holds the worker's credentials)",
    )
    child_user: str | None = setting(
        None,
        help="run children as this system user (the daemon must run as root): they cannot read the worker key "
        "or anything else of the daemon's",
    )

    @property
    def keyring(self) -> Path:
        return self.keyring_dir or self.home / "keyring"

    @property
    def credentials(self) -> Path:
        systemd = os.environ.get("CREDENTIALS_DIRECTORY")
        return self.credentials_dir or (Path(systemd) if systemd else self.home / "credentials")

    @property
    def scratch(self) -> Path:
        return self.work_dir or self.home / "work"

    @property
    def model_dir_list(self) -> list[Path]:
        """The model_dirs setting as paths."""
        return [Path(p).expanduser() for p in (self.model_dirs or "").split(os.pathsep) if p.strip()]

    @property
    def state_dirs(self) -> list[Path]:
        """The worker's own files, never loaded as models (model_refs): home, scratch, keyring, credentials."""
        return [self.home, self.scratch, self.keyring, self.credentials]

    @property
    def gpu_list(self) -> list[str]:
        return [g.strip() for g in (self.gpus or "").split(",") if g.strip()]

    @classmethod
    def from_env(cls, env: typing.Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from PGML_* variables, then `overrides` (flags; None means "not given")."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"PGML_{f.name.upper()}")
            if raw:
                values[f.name] = parse(f, raw, f"PGML_{f.name.upper()}")
        for name, value in overrides.items():
            if value is not None:
                f = next(x for x in fields(cls) if x.name == name)
                values[name] = parse(f, value, "--" + name.replace("_", "-")) if isinstance(value, str) else value
        settings = replace(cls(), **values) if values else cls()
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
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be a TCP port (0 to 65535), got {self.metrics_port}")
        if self.model_cache_mb < 0:
            raise ValueError(f"model_cache_mb must be 0 or more, got {self.model_cache_mb}")
        if self.adapter_cache_count < 1:
            raise ValueError(f"adapter_cache_count must be 1 or more, got {self.adapter_cache_count}")
        if self.adapter_cache_mb < 0:
            raise ValueError(f"adapter_cache_mb must be 0 or more, got {self.adapter_cache_mb}")
        for d in self.model_dir_list:
            if not d.is_absolute():
                raise ValueError(
                    f"model_dirs: {str(d)!r} is not an absolute path; list absolute directories separated by "
                    f"{os.pathsep!r}, e.g. /srv/models"
                )
            for state in self.state_dirs:
                if d.resolve() == state.resolve() or d.resolve().is_relative_to(state.resolve()):
                    raise ValueError(
                        f"model_dirs: {str(d)!r} lies in the worker's own state ({state}), which models are never "
                        "loaded from; list a directory of its own, e.g. /srv/models"
                    )
        if self.gpus is not None and len(self.gpu_list) < self.concurrency:
            raise ValueError(f"--gpus {self.gpus!r} names fewer GPUs than --concurrency {self.concurrency}")


def field_type(f: Field[Any]) -> type:
    """The field's value type, without `| None`."""
    hint = typing.get_type_hints(Settings)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.cast(type, hint)


def parse(f: Field[Any], raw: str, where: str) -> Any:
    """`raw` as the field's type; a clear error naming where the value came from."""
    kind = field_type(f)
    try:
        if kind is bool:
            if raw.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if raw.strip().lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is Path:
            return Path(raw).expanduser()
        return kind(raw)
    except ValueError:
        raise ValueError(f"{where}={raw!r} is not a valid {kind.__name__}") from None
