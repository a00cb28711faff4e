"""A viewer for retrieve tests: DCMTK storescp under an AE title, receiving into a folder."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pydicom import dcmread

from plugin.core.redis_server import free_port
from tests.helpers.peers import DCMTK, dcmtk
from tests.helpers.processes import wait_until


class Viewer:
    """DCMTK storescp acting as the radiologist's viewer."""

    def __init__(self, tmp: Path, ae_title: str = "VIEWER") -> None:
        self.ae_title = ae_title
        self.dir = tmp / "viewer"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [str(DCMTK / "storescp"), "-aet", ae_title, "-od", str(self.dir), str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(
            lambda: dcmtk("echoscu", "-aec", ae_title, "127.0.0.1", str(self.port), timeout=10).returncode == 0,
            20,
            what="storescp to listen",
        )

    def received(self) -> set[str]:
        return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in self.dir.iterdir() if p.is_file()}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
