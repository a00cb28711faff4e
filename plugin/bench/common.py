"""What the ``drh-pacs bench ingest`` and ``bench query`` commands share.

Latency summaries (p50/p99 over every measured call, and the spread of the per-repeat p50, so a
reader can tell a real difference from run-to-run noise), synthetic study files (the package cannot
use the tests' DICOM generator, which is not installed), and starting/stopping a private
``drh-pacs serve`` on free ports.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from plugin.core.processes import python_module

DCMTK_BIN = Path("/usr/bin")  # DCMTK's tools; pynetdicom installs same-named scripts on PATH
if TYPE_CHECKING:
    from pydicom.dataset import Dataset

DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def log(msg: str) -> None:
    print(msg, flush=True)


def dcmtk(tool: str) -> str:
    """Absolute path of a DCMTK tool, or a clear error (the benchmarks compare against DCMTK)."""
    path = DCMTK_BIN / tool
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: install DCMTK (apt-get install dcmtk)")
    return str(path)


# -- latency summaries ---------------------------------------------------------------------------
@dataclass
class Latencies:
    """Per-repeat latency arrays (seconds) of one measured case."""

    name: str
    repeats: list[np.ndarray] = field(default_factory=list)
    errors: int = 0
    note: str = ""

    def add(self, values: Sequence[float]) -> None:
        self.repeats.append(np.asarray(values, dtype=np.float64))

    def summary(self) -> dict[str, float]:
        allv = np.concatenate(self.repeats) if self.repeats else np.empty(0)
        if allv.size == 0:
            return {"n": 0}
        p50s = [float(np.percentile(r, 50)) for r in self.repeats if r.size]
        return {
            "n": int(allv.size),
            "p50_ms": float(np.percentile(allv, 50)) * 1e3,
            "p99_ms": float(np.percentile(allv, 99)) * 1e3,
            "mean_ms": float(allv.mean()) * 1e3,
            "max_ms": float(allv.max()) * 1e3,
            "p50_min_ms": min(p50s) * 1e3,
            "p50_max_ms": max(p50s) * 1e3,
            "errors": self.errors,
        }


def time_calls(
    name: str, call: Callable[[int], None], count: int, warmup: int, repeats: int, progress: bool = True
) -> Latencies:
    """Run ``call(i)`` ``warmup`` times (discarded), then ``count`` times per repeat, each timed.

    ``call`` gets a running index so each call can pick its own input; an exception counts as an
    error (and its time is not kept) so one failed query does not abort a long benchmark.
    """
    out = Latencies(name)
    i = 0
    for _ in range(warmup):
        try:
            call(i)
        except Exception as exc:  # noqa: BLE001 - counted, reported
            out.errors += 1
            if out.errors <= 3:
                log(f"    {name}: warm-up call {i} failed: {exc}")
        i += 1
    for rep in range(repeats):
        lat: list[float] = []
        for _ in range(count):
            start = time.perf_counter()
            try:
                call(i)
            except Exception as exc:  # noqa: BLE001 - counted, reported
                out.errors += 1
                if out.errors <= 3:
                    log(f"    {name}: call {i} failed: {exc}")
            else:
                lat.append(time.perf_counter() - start)
            i += 1
        out.add(lat)
        if progress:
            p50 = np.percentile(lat, 50) * 1e3 if lat else float("nan")
            log(f"    {name}: repeat {rep + 1}/{repeats} done, p50 {p50:.2f} ms")
    return out


def time_interleaved(
    calls: Sequence[tuple[str, Callable[[int], None]]], count: int, warmup: int, repeats: int
) -> list[Latencies]:
    """Time several cases on the same inputs, interleaved: for each input ``i`` every case runs
    ``call(i)`` once, in an order that rotates from input to input.

    On a shared machine a burst of load from elsewhere then hits every case alike, instead of
    whichever case happened to be running (run one after another, a filtered search re-ranked from
    300 codes once measured p99 12.1 ms and the costlier one from 1,000 codes 8.1 ms in the same
    run). Inputs ``0 .. warmup - 1`` are run and discarded; the
    measured inputs ``warmup .. warmup + count - 1`` are the same in every repeat. A failing call is
    counted, not timed, as in :func:`time_calls`.
    """
    out = [Latencies(name) for name, _ in calls]

    def run(m: int, i: int) -> float | None:
        start = time.perf_counter()
        try:
            calls[m][1](i)
        except Exception as exc:  # noqa: BLE001 - counted, reported
            out[m].errors += 1
            if out[m].errors <= 3:
                log(f"    {calls[m][0]}: call {i} failed: {exc}")
            return None
        return time.perf_counter() - start

    for i in range(warmup):
        for m in range(len(calls)):
            run(m, i)
    for rep in range(repeats):
        lat: list[list[float]] = [[] for _ in calls]
        for i in range(warmup, warmup + count):
            for step in range(len(calls)):
                m = (i + step) % len(calls)
                took = run(m, i)
                if took is not None:
                    lat[m].append(took)
        for m, values in enumerate(lat):
            out[m].add(values)
        log(f"    repeat {rep + 1}/{repeats}: {count} inputs x {len(calls)} cases")
    return out


def latency_table(rows: Sequence[Latencies]) -> list[str]:
    width = max([len(r.name) for r in rows] + [6])
    lines = [f"  {'case':<{width}} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9} {'p50 spread':>19} {'n':>6} {'err':>4}"]
    for r in rows:
        s = r.summary()
        if not s["n"]:
            lines.append(f"  {r.name:<{width}} (no successful call, {r.errors} errors)")
            continue
        spread = f"{s['p50_min_ms']:.2f}-{s['p50_max_ms']:.2f}"
        lines.append(
            f"  {r.name:<{width}} {s['p50_ms']:9.2f} {s['p99_ms']:9.2f} {s['max_ms']:9.2f} {spread:>19}"
            f" {s['n']:6d} {s['errors']:4d}" + (f"  {r.note}" if r.note else "")
        )
    return lines


# -- synthetic studies ---------------------------------------------------------------------------
def synthetic_radiograph(rng: np.random.Generator, size: int) -> np.ndarray:
    """A float image in [0, 1] with the low-frequency structure and noise of a radiograph.

    A few Gaussian blobs (lung fields, mediastinum) over a vertical gradient plus noise: enough for
    the model and the codecs to do their real work; nobody should read anything into its codes.
    """
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = 0.2 + 0.3 * y
    for _ in range(int(rng.integers(3, 7))):
        cy, cx = rng.uniform(0.2, 0.8, 2)
        sy, sx = rng.uniform(0.05, 0.25, 2)
        img += float(rng.uniform(-0.4, 0.5)) * np.exp(-((y - cy) ** 2) / (2 * sy**2) - ((x - cx) ** 2) / (2 * sx**2))
    img += rng.normal(0.0, 0.03, img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0)


def image_files(data_dir: Path) -> list[Path]:
    """Every JPEG/PNG under ``data_dir``, in a stable order."""
    files = sorted(p for p in data_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no JPEG or PNG image under {data_dir}")
    return files


def load_image(path: Path, size: int | None) -> np.ndarray:
    """A grey image file as float [0, 1], resized to ``size`` x ``size`` when given."""
    from PIL import Image

    with Image.open(path) as im:
        grey = im.convert("L")
        if size:
            grey = grey.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(grey, dtype=np.float32) / 255.0


CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def radiograph_dataset(
    pixels: np.ndarray,
    *,
    sop_uid: str,
    study_uid: str,
    series_uid: str,
    patient_id: str,
    patient_name: str,
    birth_date: str,
    study_date: str,
    description: str,
    accession: str,
    study_id: str,
    modality: str = "DX",
    sop_class: str = DX_IMAGE_STORAGE,
    instance_number: int = 1,
    bits: int = 12,
    monochrome1: bool = False,
    body_part: str = "CHEST",
) -> Dataset:
    """A radiograph (DX storage unless ``sop_class`` says otherwise), Explicit VR Little Endian,
    from ``bits``-bit unsigned pixels.

    The one generator of synthetic studies: the benchmarks use it, and so do the tests' fixtures.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = birth_date
    ds.PatientSex = "O"
    ds.StudyDate = study_date
    ds.StudyTime = "101500"
    ds.StudyDescription = description
    ds.AccessionNumber = accession
    ds.StudyID = study_id
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    ds.BodyPartExamined = body_part
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = 2 ** (bits - 1)
    ds.WindowWidth = 2**bits
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    return ds


@dataclass
class GeneratedStudy:
    study_uid: str
    files: list[Path]
    nbytes: int


def write_study(
    out_dir: Path,
    images: Sequence[np.ndarray],
    *,
    index: int,
    modality: str = "DX",
    bits: int = 12,
) -> GeneratedStudy:
    """One study (one series, one DX instance per image, Explicit VR Little Endian) under ``out_dir``.

    UIDs are fresh (``2.25`` + random), so studies of different runs never collide in a store;
    patient data are obviously synthetic.
    """
    from pydicom.uid import generate_uid

    study_uid = generate_uid(prefix=None)
    series_uid = generate_uid(prefix=None)
    folder = out_dir / f"study{index:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    date = (datetime.date(2015, 1, 1) + datetime.timedelta(days=index % 3650)).strftime("%Y%m%d")
    files: list[Path] = []
    total = 0
    for n, img in enumerate(images, start=1):
        pixels = (np.clip(img, 0, 1) * (2**bits - 1)).round().astype(np.uint16)
        ds = radiograph_dataset(
            pixels,
            sop_uid=generate_uid(prefix=None),
            study_uid=study_uid,
            series_uid=series_uid,
            patient_id=f"BENCH{index:06d}",
            patient_name=f"Bench^{index:06d}",
            birth_date="19700101",
            study_date=date,
            description="BENCH CHEST",
            accession=f"B{index:08d}",
            study_id=str(index),
            modality=modality,
            instance_number=n,
            bits=bits,
        )
        path = folder / f"img{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        total += path.stat().st_size
    return GeneratedStudy(study_uid, files, total)


# -- a private drh-pacs serve --------------------------------------------------------------------
@dataclass
class ServeProcess:
    proc: subprocess.Popen[bytes]
    data_dir: Path
    dicom_port: int
    http_port: int
    token: str
    log_path: Path
    redis_url: str
    started: float  # time.monotonic() at launch

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_serve(
    data_dir: Path,
    *,
    redis_url: str = "",
    workers: int = 1,
    env_extra: dict[str, str] | None = None,
    timeout: float = 180.0,
) -> ServeProcess:
    """``drh-pacs serve`` on free ports in ``data_dir``; returns once it printed ``ready``.

    With an empty ``redis_url`` it starts its embedded Redis, whose URL is then read back from the
    runtime file so the benchmark can watch the store.
    """
    from plugin.core.redis_server import free_port, runtime_url_file

    data_dir.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    token = "bench-" + os.urandom(8).hex()
    env = {
        **os.environ,
        "DRH_DATA_DIR": str(data_dir),
        "DRH_DICOM_PORT": str(dicom_port),
        "DRH_DICOM_HOST": "127.0.0.1",
        "DRH_HTTP_PORT": str(http_port),
        "DRH_HTTP_HOST": "127.0.0.1",
        "DRH_API_TOKEN": token,
        "DRH_SERVE_WORKERS": str(workers),
        "DRH_REDIS_URL": redis_url,
    }
    env.update(env_extra or {})
    log_path = data_dir / "serve.log"
    with log_path.open("ab") as out:
        proc = subprocess.Popen(python_module("plugin.cli", "serve"), env=env, stdout=out, stderr=subprocess.STDOUT)
    serve = ServeProcess(proc, data_dir, dicom_port, http_port, token, log_path, redis_url, time.monotonic())
    deadline = time.monotonic() + timeout
    while "ready" not in serve.output():
        if proc.poll() is not None:
            raise RuntimeError(f"drh-pacs serve exited with {proc.returncode}:\n{serve.output()[-4000:]}")
        if time.monotonic() > deadline:
            stop_serve(serve)
            raise RuntimeError(f"drh-pacs serve not ready in {timeout:.0f} s:\n{serve.output()[-4000:]}")
        time.sleep(0.1)
    if not redis_url:
        serve.redis_url = runtime_url_file(data_dir).read_text().strip()
    return serve


def wait_http_ready(serve: ServeProcess, timeout: float = 300.0) -> float:
    """Poll ``/ready`` (Redis answers, a model is active, the replicas are loaded); seconds waited."""
    import httpx

    start = time.monotonic()
    deadline = start + timeout
    url = f"http://127.0.0.1:{serve.http_port}/ready"
    headers = {"Authorization": f"Bearer {serve.token}"}
    while True:
        try:
            if httpx.get(url, headers=headers, timeout=10).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        if serve.proc.poll() is not None:
            raise RuntimeError(f"drh-pacs serve exited with {serve.proc.returncode}:\n{serve.output()[-4000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"/ready not 200 within {timeout:.0f} s")
        time.sleep(0.05)


def stop_serve(serve: ServeProcess, timeout: float = 90.0) -> int:
    """Ctrl-C, as an operator would; killed if it does not stop in ``timeout`` seconds."""
    if serve.proc.poll() is None:
        serve.proc.send_signal(signal.SIGINT)
        try:
            serve.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            serve.proc.kill()
            serve.proc.wait()
    return serve.proc.returncode


def close_serve(serve: ServeProcess) -> None:
    """Stop a benchmark's serve; its log tail is shown when it did not stop cleanly."""
    code = stop_serve(serve)
    if code != 0:
        log(f"  drh-pacs serve exited with {code}; its log:\n{serve.output()[-3000:]}")


# -- a DICOM query client ------------------------------------------------------------------------
class _ParkedCheckpoint(threading.Event):
    """Stands in for a pynetdicom requestor association's reactor checkpoint and keeps it parked.

    pynetdicom 3.0's reactor thread sets ``_is_paused`` before waiting on the checkpoint and clears it
    just after; ``send_c_find``/``send_c_echo`` clear the checkpoint and go on once ``_is_paused`` is
    true. When the reactor has just left its wait, the flag is still true for a moment, the send goes
    ahead, and under load the reactor then takes the peer's response off the DIMSE queue ("Received
    unexpected C-FIND service message"): the client waits for a response that never comes, times
    out and aborts. A query-only client needs no reactor, so it is kept waiting here for the whole
    association; pynetdicom's own set()/clear() calls are ignored and ``release`` lets it exit.
    """

    def set(self) -> None:  # noqa: D102 - pynetdicom's calls are deliberately ignored
        return

    def clear(self) -> None:  # noqa: D102
        return

    def release(self) -> None:
        super().set()

    def has_waiter(self) -> bool:
        return bool(getattr(self._cond, "_waiters", None))  # type: ignore[attr-defined]


class FindClient:
    """A persistent pynetdicom association for similar-study C-FINDs: what a viewer keeps open.

    ``similar`` sends a Study Root C-FIND to the similar AE title and drains every pending
    response; it raises when the final status is not success, so a failed query is never timed
    as a fast one. When the association is lost, the next call re-associates (and the failure has
    been counted by then).
    """

    def __init__(
        self, host: str, port: int, called_ae: str = "SIMILAR", calling_ae: str = "BENCH", nodelay: bool = False
    ) -> None:
        import logging

        from pynetdicom import AE
        from pynetdicom.sop_class import (  # type: ignore[attr-defined]
            StudyRootQueryRetrieveInformationModelFind,
            Verification,
        )

        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        self._model = StudyRootQueryRetrieveInformationModelFind
        self._ae = AE(ae_title=calling_ae)
        self._ae.acse_timeout = 30
        self._ae.dimse_timeout = 15
        self._ae.network_timeout = 60
        self._ae.add_requested_context(self._model)
        self._ae.add_requested_context(Verification)
        self._peer = (host, port, called_ae)
        self.nodelay = nodelay
        self.reconnects = -1
        self._parked: _ParkedCheckpoint | None = None
        self._connect()

    def _connect(self) -> None:
        import socket

        host, port, called_ae = self._peer
        self.assoc = self._ae.associate(host, port, ae_title=called_ae)
        if not self.assoc.is_established:
            raise RuntimeError(f"association to {called_ae}@{host}:{port} not established")
        self.reconnects += 1
        if self.nodelay:
            # pynetdicom leaves Nagle's algorithm on: a request's command and data set go out as two
            # small writes, and the second waits for the peer's delayed ACK (~40 ms on Linux).
            # DCMTK turns Nagle off by default; this is how a pynetdicom viewer would.
            self.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hasattr(self.assoc, "_reactor_checkpoint") and hasattr(self.assoc, "_is_paused"):
            parked = _ParkedCheckpoint()
            self.assoc._reactor_checkpoint = parked
            deadline = time.monotonic() + 5
            while not parked.has_waiter() and time.monotonic() < deadline:
                time.sleep(0.001)
            self._parked = parked if parked.has_waiter() else None
            if self._parked is None:  # never parked: let it run as pynetdicom intends
                parked.release()

    def _ensure(self) -> None:
        if not self.assoc.is_established:
            self._unpark()
            self._connect()

    def _unpark(self) -> None:
        if self._parked is not None:
            self._parked.release()
            self._parked = None

    def similar(
        self, study_uid: str, k: int = 10, modalities: str = "", date_range: str = ""
    ) -> list[tuple[str, int | None]]:
        """(StudyInstanceUID, rank) of each pending answer, in arrival order."""
        from pydicom.dataset import Dataset

        from plugin.dicom.status import PRIVATE_CREATOR, PRIVATE_GROUP, RANK

        self._ensure()
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = study_uid
        ds.PatientID = ""
        ds.StudyDate = date_range
        ds.ModalitiesInStudy = modalities
        ds.NumberOfStudyRelatedInstances = ""
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
        block.add_new(0x02, "IS", str(k))
        answers: list[tuple[str, int | None]] = []
        final = None
        for status, identifier in self.assoc.send_c_find(ds, self._model):
            if status is None or "Status" not in status:
                raise RuntimeError("C-FIND: no response (association aborted or timed out)")
            code = int(status.Status)
            if code in (0xFF00, 0xFF01):
                rank = None
                if identifier is not None:
                    try:
                        rank = int(identifier.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)[RANK].value)
                    except (KeyError, ValueError):
                        rank = None
                answers.append((str(identifier.StudyInstanceUID) if identifier is not None else "", rank))
            else:
                final = code
                if code != 0x0000:
                    comment = str(status.get("ErrorComment", ""))
                    raise RuntimeError(f"C-FIND failed with status 0x{code:04X}: {comment}")
        if final is None:
            raise RuntimeError("C-FIND: no final response")
        return answers

    def echo(self) -> None:
        """A C-ECHO on the same association: the DICOM round trip with no search behind it."""
        self._ensure()
        status = self.assoc.send_c_echo()
        if "Status" not in status or int(status.Status) != 0:
            raise RuntimeError("C-ECHO: no success response (association aborted or timed out)")

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()
        self._unpark()
        self._ae.shutdown()
