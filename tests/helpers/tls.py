"""Throw-away certificates for TLS tests (openssl): a CA, and a server and a client certificate it signed."""

from __future__ import annotations

import subprocess
from pathlib import Path


def certificates(folder: Path) -> dict[str, Path]:
    """ca.crt, server.crt/.key and client.crt/.key in ``folder``, valid two days."""
    folder.mkdir(parents=True, exist_ok=True)

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=drh-test-ca")  # fmt: skip
    for name in ("server", "client"):
        ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")  # fmt: skip
        ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2")  # fmt: skip
    return {n: folder / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}
