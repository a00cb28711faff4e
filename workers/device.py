"""Can this worker use its device? Checked once before the worker takes any task, and again while it
cannot: a GPU worker whose device is missing or broken would otherwise start "healthy" and then fail
every image it takes (each one going to the failure ledger), instead of leaving them to a worker
that can hash them.

The check runs a tiny tensor computation on the device and compares it with the expected result.
For a CUDA device (or ``auto``) it runs in a separate Python process: initialising CUDA in the
worker's main process would break the pool processes Celery forks from it. ``cpu`` is checked in
the process itself by importing torch only (a computation here could start a thread pool before the
fork, which the pool processes would inherit broken).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

# A CUDA initialisation that hangs (a wedged driver) is a device we cannot use.
PROBE_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class DeviceCheck:
    requested: str
    device: str  # resolved: "cuda:0", "cpu"
    ok: bool
    detail: str  # the device's name, or why it cannot be used


def check_device(requested: str, timeout: float = PROBE_TIMEOUT_SECONDS) -> DeviceCheck:
    """Whether ``requested`` (``auto``, ``cpu``, ``cuda:N``) can run the model here, and what it is."""
    if requested == "cpu":
        try:
            import torch

            torch.zeros(1)
        except Exception as exc:  # noqa: BLE001 - a broken torch install is an unusable device
            return DeviceCheck(requested, "cpu", False, f"torch unusable: {type(exc).__name__}: {exc}"[:300])
        return DeviceCheck(requested, "cpu", True, "cpu")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "workers.device", requested],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return DeviceCheck(requested, requested, False, f"the device did not answer in {timeout:.0f} s")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return DeviceCheck(requested, requested, False, f"device check crashed ({proc.returncode}): {tail}"[:300])
    found = json.loads(lines[-1])
    return DeviceCheck(requested, found["device"], bool(found["ok"]), str(found["detail"])[:300])


def probe(requested: str) -> dict[str, object]:
    """Run a small matrix product on the device and compare it with the CPU's; never raises."""
    import torch

    from hashing.encoder import resolve_device

    try:
        device = resolve_device(requested)
    except Exception as exc:  # noqa: BLE001 - "cuda:x": not a device name torch knows
        return {"device": requested, "ok": False, "detail": f"not a device: {exc}"}
    name = str(device)
    try:
        detail = "cpu"
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return {
                    "device": name,
                    "ok": False,
                    "detail": "CUDA is not available (no GPU visible, no driver, or a CPU-only torch build)",
                }
            index = device.index or 0
            count = torch.cuda.device_count()
            if index >= count:
                return {"device": name, "ok": False, "detail": f"{name} does not exist ({count} GPU(s) visible)"}
            name = f"cuda:{index}"
            detail = torch.cuda.get_device_name(index)
        x = torch.arange(16, dtype=torch.float32).reshape(4, 4)
        expected = float((x @ x).sum())
        got = float((x.to(device) @ x.to(device)).sum().cpu())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if abs(got - expected) > 1e-3 * abs(expected):
            return {"device": name, "ok": False, "detail": f"wrong result on {name}: {got} instead of {expected}"}
        return {"device": name, "ok": True, "detail": detail}
    except Exception as exc:  # noqa: BLE001 - out of memory, a driver error: the device is unusable
        return {"device": name, "ok": False, "detail": f"{type(exc).__name__}: {exc}"}


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1] if len(sys.argv) > 1 else "auto")), flush=True)
