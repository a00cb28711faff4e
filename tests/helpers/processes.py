"""Waiting on conditions with a deadline (never a bare sleep), and stopping process groups."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")

# DCMTK's tools, by absolute path: pynetdicom installs same-named scripts on PATH.
DCMTK = Path("/usr/bin")


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> T:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what or predicate}")
        time.sleep(interval)


def stop_process_group(proc: subprocess.Popen, sig: int, timeout: float) -> None:
    """Ask a process started with ``start_new_session=True`` to stop with ``sig``; after ``timeout``
    s, or once it has exited, SIGKILL whatever is left of its group (pool children included)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)
