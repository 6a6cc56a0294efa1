"""Machine resources through psutil: CPU, memory, disk and network, as rates between two samples.

psutil's CPU percentages and the network rates are differences since the previous call, so a
sampler lives as long as the process that reports them; its first sample has no network rate.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class Resources:
    cpu_percent: float
    cpu_count: int
    load_average: list[float]
    memory_percent: float
    memory_used_bytes: int
    memory_total_bytes: int
    disk_percent: float
    disk_used_bytes: int
    disk_total_bytes: int
    disk_path: str
    network_sent_bytes: int
    network_received_bytes: int
    network_sent_per_s: float | None
    network_received_per_s: float | None
    process_memory_bytes: int
    process_cpu_percent: float
    uptime_s: float


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent: the data dir may not exist where the API runs."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(os.sep)


class ResourceSampler:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process = psutil.Process()
        self._started = time.monotonic()
        self._last_net: tuple[float, int, int] | None = None
        # Start psutil's CPU counters, so the first real sample measures something.
        psutil.cpu_percent(interval=None)
        self._process.cpu_percent(interval=None)

    def sample(self, disk_path: Path) -> Resources:
        with self._lock:
            now = time.monotonic()
            net = psutil.net_io_counters()
            sent_rate = received_rate = None
            if self._last_net is not None and now > self._last_net[0]:
                elapsed = now - self._last_net[0]
                sent_rate = round((net.bytes_sent - self._last_net[1]) / elapsed, 1)
                received_rate = round((net.bytes_recv - self._last_net[2]) / elapsed, 1)
            self._last_net = (now, net.bytes_sent, net.bytes_recv)
            cpu = psutil.cpu_percent(interval=None)
            process_cpu = self._process.cpu_percent(interval=None)
        memory = psutil.virtual_memory()
        disk_at = _existing(disk_path)
        disk = psutil.disk_usage(str(disk_at))
        return Resources(
            cpu_percent=cpu,
            cpu_count=psutil.cpu_count() or 1,
            load_average=[round(x, 2) for x in os.getloadavg()],
            memory_percent=memory.percent,
            memory_used_bytes=memory.total - memory.available,
            memory_total_bytes=memory.total,
            disk_percent=disk.percent,
            disk_used_bytes=disk.used,
            disk_total_bytes=disk.total,
            disk_path=str(disk_at),
            network_sent_bytes=net.bytes_sent,
            network_received_bytes=net.bytes_recv,
            network_sent_per_s=sent_rate,
            network_received_per_s=received_rate,
            process_memory_bytes=self._process.memory_info().rss,
            process_cpu_percent=process_cpu,
            uptime_s=round(now - self._started, 1),
        )
