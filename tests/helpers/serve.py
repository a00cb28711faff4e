"""`drh-pacs serve` as a real process for the tests: started in its own session, its children listed,
its HTTP API asked, killed or stopped the way an operator (or a crash) would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from plugin.core.redis_server import free_port
from tests.helpers.processes import stop_process_group, wait_until

TOKEN = "serve-test-token"


def process_tree(pid: int) -> dict[int, str]:
    """Every descendant of ``pid``: pid -> command line."""
    out: dict[int, str] = {}
    todo = [pid]
    while todo:
        parent = todo.pop()
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(parent)], capture_output=True, text=True)
        for child in map(int, children.stdout.split()):
            out[child] = cmdline(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class ServeProc:
    """`drh-pacs serve` with its own data dir and ports; ``env`` adds or overrides DRH_* settings."""

    def __init__(self, data_dir: Path, log: Path, workers: int = 0, wait_ready: bool = True, **env: str) -> None:
        self.data_dir = data_dir
        self.log_path = log
        self.dicom_port = int(env.pop("DRH_DICOM_PORT", 0) or free_port())
        self.http_port = int(env.pop("DRH_HTTP_PORT", 0) or free_port())
        full = {k: v for k, v in os.environ.items() if not k.startswith("DRH_")}
        full.update(
            DRH_DATA_DIR=str(data_dir),
            DRH_DICOM_HOST="127.0.0.1",
            DRH_DICOM_PORT=str(self.dicom_port),
            DRH_HTTP_PORT=str(self.http_port),
            DRH_API_TOKEN=TOKEN,
            DRH_DEVICE="cpu",
            DRH_SERVE_WORKERS=str(workers),
            DRH_STUDY_STABLE_SECONDS="2",
            OMP_NUM_THREADS="1",
        )
        full.update(env)
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "plugin.cli", "serve"],
                env=full,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait_ready:
            self.wait_ready()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 120) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"serve exited early:\n{self.log()}"
            return "ready" in self.log()

        wait_until(ready, timeout, what="drh-pacs serve ready")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> dict[int, str]:
        return process_tree(self.pid)

    def redis_pid(self) -> int | None:
        return next((p for p, cmd in self.children().items() if "redis-server" in cmd), None)

    def worker_pids(self) -> list[int]:
        """Worker main processes (children of serve running `plugin.cli worker`)."""
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.pid)], capture_output=True, text=True)
        return [p for p in map(int, out.stdout.split()) if "plugin.cli worker" in cmdline(p)]

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        return httpx.get(f"http://127.0.0.1:{self.http_port}{path}", headers=headers, timeout=10, **kwargs)

    def health(self) -> tuple[int, dict[str, Any]]:
        try:
            response = self.get("/health")
        except httpx.HTTPError as exc:
            return 0, {"error": str(exc)}
        return response.status_code, response.json()

    def kill_main(self) -> None:
        """SIGKILL serve's own process only: its children must go by themselves."""
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        stop_process_group(self.proc, signal.SIGINT, 90)
        print(f"--- {self.log_path.name} ---\n{self.log()[-6000:]}")
