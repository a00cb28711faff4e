"""deploy/: the compose file parses (Debian's docker-compose, no engine needed), the systemd units
verify, the Prometheus rules name metrics we export, the backup script backs up a real Redis."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis
import yaml

from plugin.ops import metrics
from plugin.ops.status import gather
from plugin.store import Store

pytestmark = pytest.mark.slow  # real DICOM peers, Orthanc, workers or deployment tools

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT_PREFIX = "/opt/drh-pacs/venv/bin/drh-pacs"


def _compose_copy(tmp_path: Path) -> Path:
    """The deploy folder with the site files an installation creates from the examples."""
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)
    shutil.copy(copy / "env.example", copy / ".env.drh")
    shutil.copy(copy / "orthanc" / "env.example", copy / ".env.orthanc")
    return copy


def test_compose_file_is_valid(tmp_path):
    copy = _compose_copy(tmp_path)
    compose = ["/usr/bin/docker-compose", "-f", str(copy / "docker-compose.yml")]
    check = subprocess.run([*compose, "config", "-q"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    resolved = yaml.safe_load(subprocess.run([*compose, "config"], capture_output=True, text=True, timeout=120).stdout)
    services = resolved["services"]
    assert set(services) == {"redis", "orthanc", "plugin", "worker", "prometheus", "https"}
    assert "--appendonly" in services["redis"]["command"] and "yes" in services["redis"]["command"]
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and services["worker"]["environment"]["DRH_DEVICE"].startswith("cuda")
    assert services["worker"]["environment"]["DRH_API_URL"] == "http://plugin:8080"
    assert services["plugin"]["environment"]["DRH_SERVE_WORKERS"] == "0"
    # every file the stack mounts from deploy/ ships with it (except the site's token and certs)
    for svc in services.values():
        for vol in svc.get("volumes", []):
            source = vol["source"] if isinstance(vol, dict) else vol.split(":")[0]
            if source.startswith("/"):  # a bind mount (named volumes have no slash)
                src = Path(source)
                if src.name not in {"token", "certs"}:
                    assert src.exists(), f"{src} is mounted but not in deploy/"


def test_compose_file_is_rejected_when_broken(tmp_path):
    copy = _compose_copy(tmp_path)
    text = (copy / "docker-compose.yml").read_text()
    (copy / "docker-compose.yml").write_text(text.replace("  worker:\n", "  worker:\n    bogus_key: 1\n"))
    check = subprocess.run(
        ["/usr/bin/docker-compose", "-f", str(copy / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode != 0


def _units(tmp_path: Path) -> list[Path]:
    """The units with the install prefix pointed at this environment's `drh-pacs`.

    `systemd-analyze verify` refuses an ExecStart binary that does not exist, and the units name
    the production path /opt/drh-pacs/venv; everything else is verified as shipped.
    """
    exe = shutil.which("drh-pacs")
    assert exe, "drh-pacs is not installed (pip install -e .)"
    out = []
    for unit in sorted((DEPLOY / "systemd").iterdir()):
        text = unit.read_text().replace(UNIT_PREFIX, exe)
        text = text.replace("/opt/drh-pacs/deploy/redis/backup.sh", str(DEPLOY / "redis" / "backup.sh"))
        name = unit.name.replace("@.service", "@0.service")  # a template is verified as an instance
        (tmp_path / name).write_text(text)
        out.append(tmp_path / name)
    return out


def test_systemd_units_verify(tmp_path):
    units = _units(tmp_path)
    assert {u.name for u in units} >= {"drh-pacs.service", "drh-pacs-worker@0.service"}
    res = subprocess.run(
        ["/usr/bin/systemd-analyze", "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert "Unknown key" not in res.stderr and "not executable" not in res.stderr, res.stderr


def test_systemd_verify_catches_a_broken_unit(tmp_path):
    units = _units(tmp_path)
    unit = next(u for u in units if u.name == "drh-pacs.service")
    unit.write_text(unit.read_text().replace(shutil.which("drh-pacs"), "/nonexistent/drh-pacs"))
    res = subprocess.run(
        ["/usr/bin/systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode != 0


def test_prometheus_config_scrapes_metrics_and_alerts_use_exported_names(redis_client):
    conf = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = conf["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["authorization"]["type"] == "Bearer"
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exprs = " ".join(r["expr"] for g in rules["groups"] for r in g["rules"])
    used = set(re.findall(r"\b(drh_[a-z_]+)", exprs))
    # a system that has done something: one task outcome, one live worker (as its heartbeat says)
    store = Store(redis_client)
    store.stats.count_task("index_instance", "done")
    beat = {"hostname": "w@h", "pid": 1, "queues": ["ingest"], "concurrency": 1, "device": "cpu"}
    store.workers.beat({**beat, "started": time.time(), "last_seen": time.time()})
    exported = set(re.findall(r"^(drh_[a-z_]+)", metrics.render(gather(store)).decode(), re.M))
    assert used and used <= exported, used - exported


def test_redis_backup_script_snapshots_a_real_redis(redis_server, redis_client, tmp_path):
    redis_client.set("drh:backup-probe", "1")
    env = dict(
        os.environ,
        BACKUP_DIR=str(tmp_path / "backups"),
        REDIS_DIR=str(redis_server.data_dir),
        REDIS_CLI_ARGS=f"-p {redis_server.port}",
        KEEP_DAYS="14",
    )
    res = subprocess.run(
        ["sh", str(DEPLOY / "redis" / "backup.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    (dump,) = (tmp_path / "backups").glob("dump-*.rdb")
    assert dump.read_bytes().startswith(b"REDIS")
    # the snapshot really holds the data: load it in a fresh server
    from plugin.core.redis_server import EmbeddedRedis

    restore_dir = tmp_path / "restore"
    restore_dir.mkdir()
    shutil.copy(dump, restore_dir / "dump.rdb")
    probe = EmbeddedRedis(restore_dir)  # only for its free port
    server = subprocess.Popen(
        ["/usr/bin/redis-server", "--port", str(probe.port), "--dir", str(restore_dir), "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=probe.port)
        from tests.helpers.processes import wait_until

        def loaded() -> bool:
            try:
                return client.get("drh:backup-probe") == b"1"
            except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                return False

        wait_until(loaded, 20, what="restored snapshot answers")
    finally:
        server.terminate()
        server.wait(10)
