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
    from plugin.search.routed import RoutedIndex
    from plugin.store import Store
    from workers.client import make_celery

    settings = make_settings(tmp, redis_url, **overrides)
    store = Store(redis.Redis.from_url(redis_url), settings.redis_namespace)
    indexes = {level: RoutedIndex(store, level) for level in ("study", "image")}  # as serve builds them
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
DEBIAN_ORTHANC = Path("/etc/orthanc")  # what Debian's orthanc package installs
ORTHANC_USER = ("drh-pacs", "orthanc-test-password")
DROP_IN = ("drh-pacs.json", "python.json", "drh-pacs-forward.py")


def read_orthanc_json(path: Path) -> dict[str, Any]:
    """An Orthanc configuration file: JSON with ``//`` and ``/* */`` comments (Debian's have both)."""
    import json

    text = path.read_text()
    out: list[str] = []
    i, in_string = 0, False
    while i < len(text):
        c = text[i]
        if in_string:
            out.append(c)
            if c == "\\":
                out.append(text[i + 1])
                i += 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
            out.append(c)
        elif text.startswith("//", i):
            i = text.find("\n", i)
            i = len(text) if i < 0 else i
            continue
        elif text.startswith("/*", i):
            i = text.index("*/", i) + 2
            continue
        else:
            out.append(c)
        i += 1
    return json.loads("".join(out))


class Orthanc:
    """A real Orthanc (Debian package) started on a configuration directory laid out as Debian's.

    The directory holds every file of Debian's ``/etc/orthanc`` (its ``orthanc.json``, the site's
    own, edited only as a site would: ports, storage, ``StableAge``, authentication, its viewers in
    ``DicomModalities``; ``credentials.json`` with the drh-pacs user) and, with ``forward``, the
    drop-in of ``deploy/orthanc`` as shipped (``drh-pacs.json``, ``python.json``,
    ``drh-pacs-forward.py``) with drh-pacs's address and short retry delays for the test.

    ``modalities``: the site's own modalities, AE -> port on 127.0.0.1; ``drh_port`` (or a
    ``DRHPACS`` entry of ``modalities``) where drh-pacs listens; ``drop_in_settings``: more of the drop-in's
    ``DrhPacs`` settings.
    """

    def __init__(
        self,
        tmp: Path,
        modalities: Mapping[str, int] | None = None,
        *,
        forward: bool = True,
        drh_port: int | None = None,
        aet: str = "ORTHANC",
        dicom_port: int | None = None,
        stable_age: int = 1,
        retry_first: float = 0.5,
        retry_max: float = 2.0,
        drop_in_settings: Mapping[str, Any] | None = None,
    ):
        import json
        import shutil

        self.dir = tmp / "orthanc"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dicom_port = dicom_port or free_port()
        self.http_port = free_port()
        self.aet = aet
        site_modalities = dict(modalities or {})
        if drh_port is None and "DRHPACS" in site_modalities:
            drh_port = site_modalities["DRHPACS"]
        if forward:
            site_modalities.pop("DRHPACS", None)  # the drop-in declares it
        self.drh_port = drh_port
        conf = self.config_path = self.dir / "etc"
        conf.mkdir(exist_ok=True)
        for path in DEBIAN_ORTHANC.glob("*.json"):
            shutil.copy(path, conf / path.name)
        site = read_orthanc_json(conf / "orthanc.json")
        site.update(
            Name="test-orthanc",
            StorageDirectory=str(self.dir / "db"),
            IndexDirectory=str(self.dir / "db"),
            DicomAet=aet,
            DicomPort=self.dicom_port,
            HttpPort=self.http_port,
            StableAge=stable_age,
            AuthenticationEnabled=True,
            DicomModalities={ae: {"AET": ae, "Host": "127.0.0.1", "Port": p} for ae, p in site_modalities.items()},
        )
        (conf / "orthanc.json").write_text(json.dumps(site, indent=2))
        (conf / "credentials.json").write_text(json.dumps({"RegisteredUsers": {ORTHANC_USER[0]: ORTHANC_USER[1]}}))
        if forward:
            for name in DROP_IN:
                shutil.copy(DEPLOY_ORTHANC / name, conf / name)
            drop_in = json.loads((conf / "drh-pacs.json").read_text())
            drop_in["DrhPacs"].update(
                Host="127.0.0.1",
                Port=drh_port or free_port(),
                StateFile=str(self.dir / "drh-pacs-forward.sqlite"),
                RetryFirstSeconds=retry_first,
                RetryMaxSeconds=retry_max,
                **(drop_in_settings or {}),
            )
            (conf / "drh-pacs.json").write_text(json.dumps(drop_in, indent=2))
            python = json.loads((conf / "python.json").read_text())
            python["PythonScript"] = str(conf / "drh-pacs-forward.py")  # /etc/orthanc/ in production
            (conf / "python.json").write_text(json.dumps(python, indent=2))
        self.forward = forward
        self.log_path = self.dir / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60) -> Orthanc:
        import time

        import httpx

        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["/usr/sbin/Orthanc", "--verbose", str(self.config_path)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({self.proc.returncode}): {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/system", auth=ORTHANC_USER, timeout=2).status_code == 200 and (
                    not self.forward or "DRHPACS" in self.get("/modalities")  # the drop-in has declared it
                ):
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

    def post(self, path: str, body: Any) -> Any:
        import httpx

        response = httpx.post(f"{self.url}{path}", auth=ORTHANC_USER, json=body, timeout=60)
        response.raise_for_status()
        return response.json()

    def study_id(self, study_uid: str) -> str:
        """Orthanc's identifier of a study (``/tools/lookup`` takes the UID as the raw body)."""
        import httpx

        response = httpx.post(f"{self.url}/tools/lookup", auth=ORTHANC_USER, content=study_uid, timeout=30)
        response.raise_for_status()
        (found,) = [r["ID"] for r in response.json() if r["Type"] == "Study"]
        return found

    def forwarding(self) -> dict[str, Any]:
        """The drop-in's record: pending studies, refused instances (``GET /drh-pacs/forwarding``)."""
        return self.get("/drh-pacs/forwarding")

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


class StoreSCP:
    """DCMTK storescp as a viewer or a send destination (``ae`` on a free port), files under ``folder``."""

    def __init__(self, folder: Path, ae: str = "VIEWER") -> None:
        from tests.helpers.processes import wait_until

        self.dir = folder
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ae = ae
        self.port = free_port()
        self.proc = subprocess.Popen(
            [str(DCMTK / "storescp"), "-aet", ae, "-od", str(self.dir), str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(
            lambda: dcmtk("echoscu", "-aec", ae, "127.0.0.1", str(self.port), timeout=10).returncode == 0,
            20,
            what="storescp to listen",
        )

    def received(self) -> set[str]:
        """SOPInstanceUIDs of the files received so far."""
        return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in self.dir.iterdir() if p.is_file()}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
