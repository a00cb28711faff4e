"""Bounded memory, on a real `drh-pacs serve`: an oversize PDU, an oversize dataset and oversize
uploads are refused, a large accepted dataset streams to disk, and the process's resident memory
stays flat meanwhile (sampled with psutil while hundreds of megabytes are thrown at it)."""

from __future__ import annotations

import select
import socket
import threading
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.helpers.dicomgen import make_instance
from tests.helpers.dicomwire import associate_rq, pdu_header, read_pdu
from tests.helpers.peers import dcmtk
from tests.helpers.processes import wait_until
from tests.helpers.serve import TOKEN, ServeProc

pytestmark = pytest.mark.slow  # starts `drh-pacs serve` and DCMTK peers

MB = 1024 * 1024
LIMIT = 32 * MB  # max_dataset_size and max_upload_size of the serve under test
DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
# What the serve process may grow by, all refusals and the accepted 24 MB image together: buffers
# (a PDU, a copy chunk), not payloads.
RSS_HEADROOM = 40 * MB


class PeakRss:
    """The highest resident set size of a process, sampled every 10 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.NoSuchProcess:
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak


def _image_file(path: Path, side: int) -> Path:
    """A 16-bit DX image of side x side pixels (2 bytes each), as a file."""
    rng = np.random.default_rng(side)
    pixels = rng.integers(0, 4095, size=(side, side), dtype=np.uint16)
    ds = make_instance(pixels, study_uid=generate_uid(), series_uid=generate_uid())
    ds.save_as(path, enforce_file_format=True)
    return path


def _send_oversize_pdu(port: int) -> tuple[int, int]:
    """Associate, then announce a 300 MB P-DATA-TF and keep sending; returns (bytes the SCP let us
    send, the type of the last PDU it sent us)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(associate_rq("PACS", "DRHPACS", abstract=DX))
    kind, _ = read_pdu(sock)
    assert kind == 0x02, "association not accepted"
    sent = 0
    sock.sendall(pdu_header(0x04, 300 * MB))
    try:
        while sent < 300 * MB:
            sock.sendall(b"\0" * MB)
            sent += MB
    except OSError:  # reset by the SCP
        pass
    last = 0
    try:
        while (pdu := read_pdu(sock))[0]:
            last = pdu[0]
    except OSError:
        pass
    sock.close()
    return sent, last


def _post_endless(port: int, multipart: bool) -> tuple[int, str, int]:
    """POST an upload that never ends (chunked) until the API answers; returns (status, headers, sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    boundary = "drhboundary"
    ctype = f"multipart/form-data; boundary={boundary}" if multipart else "application/dicom"
    sock.sendall(
        (
            f"POST /api/similar/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: {ctype}\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
    )
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.dcm"\r\n\r\n'.encode()
    chunks = [head] if multipart else []
    sent = 0
    try:
        while sent < 300 * MB:
            chunk = chunks.pop() if chunks else b"\0" * MB
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
            if select.select([sock], [], [], 0)[0]:
                break  # the API answered before the end
    except OSError:
        pass
    response = b""
    try:
        while b"\r\n\r\n" not in response and (data := sock.recv(65536)):
            response += data
    except OSError:
        pass
    sock.close()
    head_text = response.split(b"\r\n\r\n")[0].decode(errors="replace")
    status = int(head_text.split()[1]) if head_text.startswith("HTTP/") else 0
    return status, head_text, sent


def test_oversize_pdus_datasets_and_uploads_are_refused_and_memory_stays_flat(tmp_path):
    big = _image_file(tmp_path / "big.dcm", 6000)  # 72 MB of pixels: over the limit
    large = _image_file(tmp_path / "large.dcm", 3500)  # 24.5 MB: under it, accepted
    serve = ServeProc(
        tmp_path / "data",
        tmp_path / "serve.log",
        DRH_MAX_DATASET_SIZE=str(LIMIT),
        DRH_MAX_UPLOAD_SIZE=str(LIMIT),
        DRH_MAX_CONCURRENT_UPLOADS="1",
    )
    sampler: PeakRss | None = None
    try:
        port = str(serve.dicom_port)
        warm = _image_file(tmp_path / "warm.dcm", 256)
        assert dcmtk("storescu", "-aet", "PACS", "-aec", "DRHPACS", "127.0.0.1", port, str(warm)).returncode == 0
        assert serve.get("/health").status_code == 200
        baseline = psutil.Process(serve.pid).memory_info().rss
        sampler = PeakRss(serve.pid)

        sent, last = _send_oversize_pdu(serve.dicom_port)
        assert last == 0x07 and sent < 300 * MB  # A-ABORT, and it stopped reading

        refused = dcmtk("storescu", "-aet", "PACS", "-aec", "DRHPACS", "127.0.0.1", port, str(big), timeout=120)
        assert refused.returncode != 0

        accepted = dcmtk("storescu", "-aet", "PACS", "-aec", "DRHPACS", "127.0.0.1", port, str(large), timeout=120)
        assert accepted.returncode == 0, accepted.stderr
        sop = dcmread(large, stop_before_pixels=True)
        spooled = tmp_path / "data" / "spool" / sop.StudyInstanceUID / f"{sop.SOPInstanceUID}.dcm"
        assert spooled.stat().st_size > 24_000_000

        for multipart in (True, False):
            status, head, sent = _post_endless(serve.http_port, multipart)
            assert status == 413, head
            assert sent < 300 * MB

        peak = sampler.stop()
        assert peak - baseline < RSS_HEADROOM, f"RSS grew by {(peak - baseline) / MB:.0f} MB"

        log = serve.log()
        assert "(pdu-too-large)" in log and "(dataset-too-large)" in log
        # nothing left behind in the temporary folder once the transfers are over
        wait_until(lambda: not list((tmp_path / "data" / "tmp").iterdir()), 10, what="tmp folder empty")
    finally:
        if sampler is not None:
            sampler.stop()
        serve.stop()


def test_uploads_beyond_the_concurrency_limit_are_told_to_come_back(tmp_path):
    serve = ServeProc(tmp_path / "data", tmp_path / "serve.log", DRH_MAX_CONCURRENT_UPLOADS="1")
    held = socket.create_connection(("127.0.0.1", serve.http_port), timeout=10)
    try:
        held.sendall(
            (
                f"POST /api/similar/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                "Content-Type: application/dicom\r\nContent-Length: 1000000\r\n\r\n"
            ).encode()
            + b"\0" * 1000
        )  # an upload in progress: its body is still coming

        def busy() -> httpx.Response | None:
            response = httpx.post(
                f"http://127.0.0.1:{serve.http_port}/api/similar/upload",
                headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/dicom"},
                content=b"\0" * 100,
                timeout=10,
            )
            return response if response.status_code == 503 else None

        response = wait_until(busy, 20, what="the second upload refused as busy")
        assert response.headers["retry-after"] == "5"
        assert "uploads in progress" in response.json()["detail"]
    finally:
        held.close()
        serve.stop()
