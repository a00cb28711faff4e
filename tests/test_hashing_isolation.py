"""``hashing`` is a plain library: importing all of it loads no networking, Redis or Celery code."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import hashing

FORBIDDEN = ("redis", "celery", "pynetdicom", "starlette", "uvicorn", "kombu", "httpx", "plugin", "workers")


def test_importing_every_hashing_module_loads_no_service_code() -> None:
    modules = sorted(f"hashing.{m.name}" for m in pkgutil.iter_modules(hashing.__path__))
    assert {"hashing.encoder", "hashing.train", "hashing.evaluate", "hashing.dmih"} <= set(modules)
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    bad = sorted(m for m in loaded if m.split(".")[0] in FORBIDDEN)
    assert not bad, f"hashing imports service code: {bad}"
