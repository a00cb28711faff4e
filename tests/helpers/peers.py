"""Helpers for the plugin's integration tests: start the SCP in-process, fill the store, run DCMTK.

Every peer is real: the SCP is the one ``drh-pacs serve`` starts, on a free port; DCMTK tools are
called by absolute path (the ``findscu`` on PATH is pynetdicom's); Redis is the session's server.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from pydicom import dcmread
from pydicom.dataset import Dataset

from plugin.core.redis_server import free_port
from plugin.core.settings import Settings, load_settings
from tests.helpers.processes import DCMTK

VERSION = "v-test"
NBITS = 16


@dataclass
class Plugin:
    settings: Settings
    store: Any
    indexes: dict[str, Any]
    celery: Any
    server: Any

    @property
    def port(self) -> int:
        return self.server.port


def make_settings(tmp: Path, redis_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp / "data",
        "redis_url": redis_url,
        "dicom_host": "127.0.0.1",
        "dicom_port": free_port(),
        "api_token": "test-token",
        "study_stable_seconds": 1.0,
        # Tests of query behaviour query from several AE titles; access control has its own tests.
        "dicom_query_open": True,
    }
    values.update(overrides)
    return load_settings(env={}, **values)


@contextlib.contextmanager
def running_plugin(tmp: Path, redis_url: str, **overrides: Any) -> Iterator[Plugin]:
    """The SCP of ``drh-pacs serve`` (with its store, replica indexes and Celery app), stopped after."""
    from plugin.dicom.scp import start_scp
    from plugin.search.replica import ReplicaIndex
    from plugin.store import Store
    from workers.client import make_celery

    settings = make_settings(tmp, redis_url, **overrides)
    store = Store(redis.Redis.from_url(redis_url), settings.redis_namespace)
    indexes = {level: ReplicaIndex(store, level) for level in ("study", "image")}
    celery_app = make_celery(settings)
    server = start_scp(settings, store, indexes, celery_app)
    try:
        yield Plugin(settings, store, indexes, celery_app, server)
    finally:
        server.shutdown()


def code(bits: str) -> bytes:
    """A 16-bit code from a string of 0/1 (readable distances in tests)."""
    return int(bits.replace(" ", ""), 2).to_bytes(NBITS // 8, "big")


def populate(store: Any, studies: Mapping[str, tuple[bytes, dict[str, str]]], level: str = "study") -> None:
    """Codes and metadata as the workers write them, for query tests that need no model."""
    store.models.register(VERSION, NBITS)
    store.models.ensure_active(VERSION)
    for uid, (bits, meta) in studies.items():
        if level == "study":
            store.records.put_study(uid, meta)
        store.codes.upsert(VERSION, level, uid, bits)


@functools.cache
def dcmtk_env() -> dict[str, str]:
    """DCMTK's own dictionaries plus ours, so ``-k (0099,1001)=<uid>`` is sent as text (UI), not as UN."""
    from plugin.dicom.status import dcmtk_dictionary

    path = Path(tempfile.mkdtemp(prefix="drh-dcmtk-")) / "drh-pacs.dic"
    path.write_text(dcmtk_dictionary())
    base = [str(p) for p in sorted(Path("/usr/share").glob("libdcmtk*/dicom.dic"))[-1:]]
    base += [str(p) for p in sorted(Path("/usr/share").glob("libdcmtk*/private.dic"))[-1:]]
    return {**os.environ, "DCMDICTPATH": ":".join([*base, str(path)])}


def dcmtk(tool: str, *args: str, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DCMTK / tool), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
        env=dcmtk_env(),
    )


def findscu(
    port: int,
    keys: list[str],
    out_dir: Path,
    *,
    called: str = "DRHPACS",
    calling: str = "VIEWER",
    model: str = "-S",
    debug: bool = False,
    extra: tuple[str, ...] = (),
) -> tuple[subprocess.CompletedProcess[str], list[Dataset]]:
    """Run DCMTK findscu, extracting every pending response; returns them in the order received.

    ``debug`` (``-d``) makes findscu print whole response commands, ErrorComment included.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["-d" if debug else "-v", model, *extra, "-aet", calling, "-aec", called, "-X", "-od", str(out_dir)]
    for key in keys:
        args += ["-k", key]
    proc = dcmtk("findscu", *args, "127.0.0.1", str(port))
    responses = [dcmread(p) for p in sorted(out_dir.glob("rsp*.dcm"))]
    return proc, responses


DEPLOY_ORTHANC = Path(__file__).parents[2] / "deploy" / "orthanc"
ORTHANC_USER = ("drh-pacs", "orthanc-test-password")


class Orthanc:
    """A real Orthanc (Debian package) built from deploy/orthanc/orthanc.json, on free ports in ``tmp``.

    ``modalities``: AE -> port on 127.0.0.1 (DRHPACS, VIEWER...). ``forward``: load the shipped Lua
    script (every stable study goes to DRHPACS), with ``StableAge`` 1 s so tests do not wait a minute.
    """

    def __init__(
        self,
        tmp: Path,
        modalities: Mapping[str, int],
        *,
        forward: bool = True,
        aet: str = "ORTHANC",
        dicom_port: int | None = None,
    ):
        import json

        self.dir = tmp / "orthanc"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dicom_port = dicom_port or free_port()
        self.http_port = free_port()
        self.aet = aet
        config = json.loads((DEPLOY_ORTHANC / "orthanc.json").read_text())
        config.update(
            Name="test-orthanc",
            StorageDirectory=str(self.dir / "db"),
            IndexDirectory=str(self.dir / "db"),
            DicomAet=aet,
            DicomPort=self.dicom_port,
            HttpPort=self.http_port,
            RemoteAccessAllowed=False,
            RegisteredUsers={ORTHANC_USER[0]: ORTHANC_USER[1]},
            DicomModalities={ae: {"AET": ae, "Host": "127.0.0.1", "Port": p} for ae, p in modalities.items()},
            StableAge=1,
            LuaScripts=[str(DEPLOY_ORTHANC / "drh-pacs-forward.lua")] if forward else [],
            Plugins=[],
        )
        self.config_path = self.dir / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.log_path = self.dir / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60) -> Orthanc:
        import time

        import httpx

        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["/usr/sbin/Orthanc", "--verbose", str(self.config_path)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({self.proc.returncode}): {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/system", auth=ORTHANC_USER, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Orthanc did not answer in {timeout:.0f} s")
            time.sleep(0.1)

    def get(self, path: str) -> Any:
        import httpx

        response = httpx.get(f"{self.url}{path}", auth=ORTHANC_USER, timeout=30)
        response.raise_for_status()
        return response.json()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
