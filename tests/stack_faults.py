"""Outages caused for real: a server of the session stack signalled by the PIDs `up` recorded."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import psutil

from cli.stack import Stack


def signal_service(stack: Stack, name: str, sig: int = signal.SIGKILL) -> list[int]:
    """Signal ``name``'s process and the ones it started (MLflow's uvicorn worker would
    otherwise keep serving, and keep the port); their PIDs."""
    pid = stack.running_pid(name)
    assert pid is not None, f"{name} is not running"
    tree = [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    for member in tree:
        os.kill(member, sig)
    return tree


def wait_dead(pids: list[int], seconds: float = 10.0) -> None:
    procs = []
    for pid in pids:
        with suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(pid))
    psutil.wait_procs(procs, timeout=seconds)


@contextmanager
def service_down(stack: Stack, name: str) -> Iterator[None]:
    """``name`` killed for the block, and started again whatever happens in it, so later
    tests find the stack whole."""
    wait_dead(signal_service(stack, name))
    try:
        yield
    finally:
        stack.up(only=[name])
