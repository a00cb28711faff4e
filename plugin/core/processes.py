"""Child processes that cannot outlive their parent, restart back-off, and one owner per data dir.

``drh-pacs serve`` starts an embedded Redis and worker processes. If ``serve`` is killed (SIGKILL,
the OOM killer), nothing else tells them: they used to keep running, and a restarted ``serve``
started a second redis-server appending to the same AOF. Three mechanisms, each for one gap:

- :func:`die_with_parent` asks the kernel (``PR_SET_PDEATHSIG``) to signal the child when the
  thread that started it exits; ``serve`` starts children from its main thread only, so that is
  when ``serve`` exits. Redis gets SIGTERM (it writes its data and stops), a worker SIGTERM (Celery's
  warm shutdown hands its task back).
- :class:`DataDirLock`: an exclusive ``flock`` on ``data_dir/serve.lock``. The embedded Redis
  inherits the locked file, so the lock is free again only once ``serve`` *and* its Redis are gone:
  a new ``serve`` waits for the old Redis to finish writing instead of opening the same files.
- :class:`Backoff`: a child that keeps dying is restarted after 1, 2, 4... up to 60 s, so a
  crash loop does not flood the log or the machine.

And one for the front process's pauses: :func:`freeze_startup_heap`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import gc
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child gets ``sig`` when its parent dies.

    Runs in the child between fork and exec: it sets a private umask (what the child writes, such
    as Redis's AOF, is readable by the service user only), calls ``prctl``, and checks that the
    parent did not die before the call (then the signal would never come), exiting at once if so.
    """
    parent = os.getpid()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

    def preexec() -> None:
        os.umask(0o077)
        if libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0) != 0:
            os._exit(127)
        if os.getppid() != parent:
            os._exit(0)

    return preexec


def freeze_startup_heap() -> int:
    """Take everything allocated at start-up out of the garbage collector's full passes
    (``gc.freeze``); returns how many objects that was.

    A full (generation 2) collection walks every container object the process holds, with the GIL
    held: every thread (the SCP, the HTTP API, the search) stops meanwhile. ``serve``'s front process
    holds about 107,000 of them after start-up (the libraries it imports), and on the 2-core
    development machine a full collection of them took 120 ms; one came in every few thousand
    queries (a 228 ms stall in 3,600 searches at 1M, none with the heap frozen). Objects made at
    start-up live as long as the process, so nothing is lost by never looking at them again;
    whatever the process allocates later is collected as before.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def python_module(module: str, *args: str) -> list[str]:
    """The command line running ``module`` of this installation in a child Python.

    ``-P``: without it ``python -m`` looks in the current directory first, so a process started
    from a folder holding another copy of drh-pacs (an old checkout, an unpacked release) would run
    that copy's code and weights instead of the installed ones, silently (seen by an upgrade check:
    a worker of the new release loaded the old default model from the directory ``serve`` was
    started in).
    """
    return [sys.executable, "-P", "-m", module, *args]


class Backoff:
    """Delay before the next restart of a child: doubles on each quick death, resets once it has
    run ``stable_seconds``."""

    def __init__(self, first: float = 1.0, maximum: float = 60.0, stable_seconds: float = 60.0) -> None:
        self.first = first
        self.maximum = maximum
        self.stable_seconds = stable_seconds
        self.delay = 0.0
        self.next_at = 0.0

    def failed(self, ran_for: float, now: float | None = None) -> float:
        """Record a death after ``ran_for`` seconds; returns the delay before the restart."""
        now = time.monotonic() if now is None else now
        if ran_for >= self.stable_seconds:
            self.delay = self.first
        else:
            self.delay = min(self.maximum, max(self.first, self.delay * 2))
        self.next_at = now + self.delay
        return self.delay

    def due(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self.next_at


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class DataDirLocked(RuntimeError):
    """Another process owns the data directory."""


class DataDirLock:
    """An exclusive lock on ``data_dir/serve.lock``, held for the life of ``serve``.

    ``flock`` locks belong to the open file, and children that inherit the descriptor keep it
    locked: pass :attr:`fd` to the embedded Redis (``pass_fds``) so that a killed ``serve`` whose Redis
    is still writing does not let a new one in. The kernel releases it when every holder is gone, so a
    crash never leaves a stale lock behind.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / "serve.lock"
        self.fd: int | None = None

    def acquire(self, wait_seconds: float = 30.0, on_wait: Callable[[str], None] | None = None) -> DataDirLock:
        """Take the lock. A live owner is refused at once; a dead one whose children still hold the
        lock (its Redis writing its last data) is waited for, up to ``wait_seconds``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait_seconds
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                owner = self._owner()
                if (owner is not None and _alive(owner)) or time.monotonic() >= deadline:
                    os.close(fd)
                    raise DataDirLocked(
                        f"{self.path.parent} is in use by another drh-pacs serve (pid {owner or 'unknown'}"
                        f"{'' if owner is not None and _alive(owner) else ', or the children it left'}); "
                        "stop it first, or give this one its own DRH_DATA_DIR"
                    ) from None
                if on_wait is not None and not told:
                    on_wait(f"waiting for what the previous owner of {self.path.parent} left running to finish")
                    told = True
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def _owner(self) -> int | None:
        try:
            text = self.path.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
