"""What a daemon tells the fleet and its service manager: its devices (NVML when nvidia-ml-py is installed), the
GPUs its free slots hold, and systemd's notify protocol (READY=1, WATCHDOG=1, STOPPING=1 as datagrams on
$NOTIFY_SOCKET; nothing at all when it is unset).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping
from typing import Any

from .. import logconfig

log = logconfig.get("pgml_tuned.worker.fleet")


def _nvml() -> Any | None:
    """The pynvml module, initialised; None without nvidia-ml-py or without a driver."""
    try:
        import pynvml  # type: ignore[import-untyped, import-not-found, unused-ignore]

        pynvml.nvmlInit()
    except Exception:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
        return None
    return pynvml


def device_readings(indexes: list[str] | None = None) -> list[dict[str, Any]]:
    """One dict per GPU (index, name, memory_mb, memory_used_mb, utilization_pct) from NVML, for `indexes` (all when
    None); [] without NVML. Blocking: call it in a thread."""
    nvml = _nvml()
    if nvml is None:
        return []
    out = []
    try:
        for i in range(nvml.nvmlDeviceGetCount()):
            if indexes is not None and str(i) not in indexes:
                continue
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            name = nvml.nvmlDeviceGetName(handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            reading: dict[str, Any] = {
                "index": str(i),
                "name": name.decode() if isinstance(name, bytes) else str(name),
                "memory_mb": int(memory.total) // 2**20,
                "memory_used_mb": int(memory.used) // 2**20,
            }
            with contextlib.suppress(Exception):  # not every device reports utilization
                reading["utilization_pct"] = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            out.append(reading)
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()
    return out


def detect_devices(gpu_ids: list[str]) -> list[dict[str, Any]]:
    """The GPUs this daemon hands out: those of --gpus (named by NVML when it can), else every GPU that
    CUDA_VISIBLE_DEVICES leaves it (all that NVML sees when it is unset). Blocking: call it in a thread."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    wanted = gpu_ids or ([v.strip() for v in visible.split(",") if v.strip()] if visible is not None else None)
    found = {d["index"]: d for d in device_readings(wanted)}
    if wanted is None:
        devices = list(found.values())
    else:
        devices = [found.get(i, {"index": i, "name": None, "memory_mb": None}) for i in wanted]
    return [{k: d.get(k) for k in ("index", "name", "memory_mb")} for d in devices]


def free_gpus(gpu_ids: list[str], devices: list[dict[str, Any]], free_slots: list[int]) -> int:
    """How many GPUs a job claimed now could get: with --gpus, those of the free slots (slot i holds the i-th id);
    without, every slot sees all the devices, so all of them while a slot is free."""
    if gpu_ids:
        return len({gpu_ids[s] for s in free_slots if s < len(gpu_ids)})
    return len(devices) if free_slots else 0


# ---- systemd's notify protocol (sd_notify(3)), without libsystemd ----
def sd_notify(*states: str, env: Mapping[str, str] | None = None) -> bool:
    """Send `states` ("READY=1", "WATCHDOG=1", "STOPPING=1", "STATUS=...") to the service manager as one datagram
    on $NOTIFY_SOCKET. False (and nothing sent) when the variable is unset, as outside systemd. A datagram to a
    local socket never waits on its reader, so this is safe on the event loop."""
    path = (os.environ if env is None else env).get("NOTIFY_SOCKET")
    if not path or not states:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto("\n".join(states).encode(), address)
    except OSError as e:
        log.warning("sd_notify.failed", socket=path, error=str(e))
        return False
    return True


def watchdog_enabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether systemd asked this process for WATCHDOG=1 pings (WatchdogSec= in the unit)."""
    values = os.environ if env is None else env
    pid = values.get("WATCHDOG_PID")
    return bool(values.get("WATCHDOG_USEC")) and (not pid or pid == str(os.getpid()))
