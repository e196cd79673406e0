"""`serve --metrics-port N`: Prometheus metrics, served by a small HTTP responder on the daemon's own task group
(prometheus_client's start_http_server would start a thread of its own).

Counted as they happen: pickup latency (submitted → claimed, first attempts), attempt durations by outcome, lease
takeovers (expired leases this daemon reaped), checkpoint bytes stored by its children, and its serving process's
loads of base models and LoRA adapters (from their log lines): how many are loaded, loads and their seconds,
evictions and when the last one happened. Read at each scrape: jobs by
status (pgml.queue_summary), the age of this daemon's last registry heartbeat, and per-GPU memory and utilisation
(NVML, when nvidia-ml-py is installed).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from anyio.abc import SocketStream, TaskStatus
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .. import logconfig
from .fleet import device_readings
from .serving import Load

log = logconfig.get("pgml_tuned.worker.metrics")

MAX_REQUEST = 8192  # bytes of request head read before answering (a scrape's is a few hundred)


class Metrics:
    """The daemon's metrics, in a registry of their own (nothing global: tests run several daemons)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Gauge("pgml_jobs", "jobs in the queue by status (pgml.queue_summary)", ["status"], registry=r)
        self.pickup = Histogram(
            "pgml_job_pickup_seconds",
            "from a job's submission to its first claim, by this daemon",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600),
            registry=r,
        )
        self.duration = Histogram(
            "pgml_job_duration_seconds",
            "wall time of the attempts this daemon ran, by how they ended",
            ["outcome"],
            buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600, 72 * 3600),
            registry=r,
        )
        self.heartbeat_age = Gauge(
            "pgml_worker_heartbeat_age_seconds", "since this daemon's last heartbeat in pgml.workers", registry=r
        )
        self.takeovers = Counter(
            "pgml_lease_takeovers", "expired leases this daemon reaped (their jobs requeued or failed)", registry=r
        )
        self.checkpoint_bytes = Counter(
            "pgml_checkpoint_bytes", "bytes of checkpoints this daemon's children stored in PostgreSQL", registry=r
        )
        self.running = Gauge("pgml_worker_running_jobs", "attempts this daemon runs now", registry=r)
        gpu = ["gpu", "name"]
        self.gpu_memory_total = Gauge("pgml_gpu_memory_total_bytes", "GPU memory (NVML)", gpu, registry=r)
        self.gpu_memory_used = Gauge("pgml_gpu_memory_used_bytes", "GPU memory in use (NVML)", gpu, registry=r)
        self.gpu_utilization = Gauge(
            "pgml_gpu_utilization_ratio", "GPU utilisation over the last sample period (NVML)", gpu, registry=r
        )
        kind = ["kind"]  # base (a whole model) | adapter (a LoRA adapter loaded onto a base, unmerged)
        self.serving_loaded = Gauge(
            "pgml_serving_models_loaded", "models the serving process keeps loaded, by kind", kind, registry=r
        )
        self.serving_adapter_bytes = Gauge(
            "pgml_serving_adapter_bytes", "memory the serving process's loaded LoRA adapters take", registry=r
        )
        self.serving_loads = Counter("pgml_serving_loads", "loads by the serving process, by kind", kind, registry=r)
        self.serving_load_seconds = Histogram(
            "pgml_serving_load_seconds",
            "from PostgreSQL (or the hub cache) to loaded, by kind",
            kind,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.serving_evictions = Counter(
            "pgml_serving_evictions", "models the serving process evicted from its caches, by kind", kind, registry=r
        )
        self.serving_last_eviction = Gauge(
            "pgml_serving_last_eviction_timestamp_seconds",
            "when the serving process last evicted, by kind",
            kind,
            registry=r,
        )
        self.last_heartbeat: float | None = None

    def on_child_event(self, event: dict[str, Any]) -> None:
        """Count what a child reports: a stored checkpoint's bytes."""
        if event.get("event") == "info" and str(event.get("message", "")).startswith("checkpoint at step"):
            size = event.get("bytes")
            if isinstance(size, int | float) and size > 0:
                self.checkpoint_bytes.inc(size)

    def on_serving_load(self, load: Load) -> None:
        """A load of the serving process (one of its serving.model_loaded, serving.adapter_loaded lines)."""
        self.serving_loads.labels(load.kind).inc()
        if load.seconds is not None:
            self.serving_load_seconds.labels(load.kind).observe(load.seconds)
        for kind, n in load.loaded.items():
            self.serving_loaded.labels(kind).set(n)
        for kind, n in load.evicted.items():
            if n:
                self.serving_evictions.labels(kind).inc(n)
                self.serving_last_eviction.labels(kind).set(load.at)
        if load.adapter_mb is not None:
            self.serving_adapter_bytes.set(load.adapter_mb * 2**20)

    async def refresh(self, jobs_by_status: Callable[[], Awaitable[list[dict[str, Any]]]], gpus: list[str]) -> None:
        """The values read at scrape time; a database that does not answer leaves the last values."""
        try:
            with anyio.fail_after(5):
                for row in await jobs_by_status():
                    self.jobs.labels(row["status"]).set(row["jobs"])
        except Exception as e:  # a scrape never fails because the database is away
            log.warning("metrics.jobs_unavailable", error=str(e).strip())
        if self.last_heartbeat is not None:
            self.heartbeat_age.set(time.monotonic() - self.last_heartbeat)
        for d in await anyio.to_thread.run_sync(device_readings, gpus or None):
            labels = (d["index"], d["name"])
            self.gpu_memory_total.labels(*labels).set(d["memory_mb"] * 2**20)
            self.gpu_memory_used.labels(*labels).set(d["memory_used_mb"] * 2**20)
            if "utilization_pct" in d:
                self.gpu_utilization.labels(*labels).set(d["utilization_pct"] / 100)


async def serve_metrics(
    host: str,
    port: int,
    metrics: Metrics,
    refresh: Callable[[], Awaitable[None]],
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Answer GET /metrics with generate_latest() (anything else: 404), one request per connection. Reports the
    port it listens on to task_status (port 0 picks a free one)."""
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port, reuse_port=False)
    bound = int(listener.extra(anyio.abc.SocketAttribute.local_port))
    log.info("metrics.listening", host=host, port=bound, path="/metrics")
    task_status.started(bound)

    async def handle(stream: SocketStream) -> None:
        try:
            await answer(stream)
        except Exception as e:  # a bad request or a failed reading never stops the daemon
            log.warning("metrics.request_failed", error=f"{type(e).__name__}: {e}")

    async def answer(stream: SocketStream) -> None:
        async with stream:
            head = b""
            with anyio.move_on_after(10):
                while b"\r\n\r\n" not in head and len(head) < MAX_REQUEST:
                    try:
                        head += await stream.receive(4096)
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        return
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
                status, body, kind = "405 Method Not Allowed", b"GET /metrics\n", "text/plain"
            elif parts[1].split(b"?", 1)[0] != b"/metrics":
                status, body, kind = "404 Not Found", b"metrics are at /metrics\n", "text/plain"
            else:
                await refresh()
                status, body, kind = "200 OK", generate_latest(metrics.registry), CONTENT_TYPE_LATEST
            header = (
                f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            try:
                await stream.send(header + (b"" if parts[:1] == [b"HEAD"] else body))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass

    async with listener:
        await listener.serve(handle)
