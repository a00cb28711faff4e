"""The external Redis locked down as deploy/redis/drh-pacs.conf says (ACL users, no anonymous access),
on Debian's redis-server: the whole service works as user `drh` (SCP, worker, pooling, similar
query, status, the worker's health check), the dangerous commands are refused to it, and the backup
script works as `backup`."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from plugin.core.redis_server import free_port
from plugin.store import Store
from tests.helpers.dicomgen import fixture_images, make_study
from tests.helpers.peers import dcmtk
from tests.helpers.processes import wait_until
from tests.helpers.serve import ServeProc
from tests.helpers.workers import NS, active_version, indexed_count

pytestmark = pytest.mark.slow  # Debian's redis-server, serve, a worker, DCMTK

DEPLOY = Path(__file__).parents[1] / "deploy"


def _documented_acl(passwords: dict[str, str]) -> list[str]:
    """The commented ``user`` lines of deploy/redis/drh-pacs.conf, uncommented, with real passwords."""
    lines = []
    for line in (DEPLOY / "redis" / "drh-pacs.conf").read_text().splitlines():
        match = re.match(r"#\s*(user \S+ .*)$", line)
        if match:
            user = match.group(1).split()[1]
            lines.append(
                re.sub(r">\S+", f">{passwords[user]}", match.group(1)) if user in passwords else match.group(1)
            )
    return lines


@pytest.fixture
def locked_redis(tmp_path):
    passwords = {"drh": secrets.token_urlsafe(24), "backup": secrets.token_urlsafe(24)}
    folder = tmp_path / "redis"
    folder.mkdir()
    port = free_port()
    settings = [
        line for line in (DEPLOY / "redis" / "drh-pacs.conf").read_text().splitlines() if line and line[0] != "#"
    ]
    conf = folder / "redis.conf"
    conf.write_text("\n".join([*settings, f"port {port}", "bind 127.0.0.1", f'dir "{folder}"',
                               *_documented_acl(passwords)]) + "\n")  # fmt: skip
    conf.chmod(0o600)
    proc = subprocess.Popen(["/usr/bin/redis-server", str(conf)], stdout=subprocess.DEVNULL)
    url = f"redis://drh:{passwords['drh']}@127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.exceptions.ConnectionError:
            return False

    wait_until(answers, 20, what="redis-server with the documented ACL")
    yield url, port, passwords, folder
    proc.terminate()
    proc.wait(20)


def test_the_service_runs_on_the_documented_acl_and_nothing_dangerous_is_allowed(locked_redis, tmp_path):
    url, port, passwords, folder = locked_redis
    with pytest.raises(redis.exceptions.AuthenticationError):  # no anonymous user
        redis.Redis(port=port).ping()
    client = redis.Redis.from_url(url)
    for command in ("CONFIG SET dir /tmp", "FLUSHALL", "DEBUG SLEEP 0", "MODULE LIST", "REPLICAOF 127.0.0.1 1"):
        with pytest.raises(redis.exceptions.ResponseError, match="(?i)permission|not allowed"):
            client.execute_command(*command.split())  # NOPERM (DEBUG: Redis 7 refuses it before the ACL)

    serve = ServeProc(
        tmp_path / "data",
        tmp_path / "serve.log",
        workers=1,
        DRH_REDIS_URL=url,
        DRH_DICOM_VIEWERS="VIEWER=127.0.0.1:104",
    )
    try:
        study = make_study(tmp_path / "in", fixture_images("normal")[:2])
        sent = dcmtk("storescu", "-aet", "PACS", "-aec", "DRHPACS", "127.0.0.1", str(serve.dicom_port),
                     *map(str, study.files))  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: indexed_count(client, study.sop_uids) == 2, 120, what="indexed as user drh")
        store = Store(client, NS)
        wait_until(lambda: store.codes.get(active_version(client), "study", study.study_uid), 60, what="pooled")
        found = dcmtk("findscu", "-S", "-aet", "VIEWER", "-aec", "DRHPACS", "-k", "QueryRetrieveLevel=STUDY",
                      "-k", "StudyInstanceUID=", "127.0.0.1", str(serve.dicom_port))  # fmt: skip
        assert found.returncode == 0, found.stderr
        env = {k: v for k, v in os.environ.items() if not k.startswith("DRH_")}
        status = subprocess.run(
            [sys.executable, "-m", "plugin.cli", "status", "--json"],
            env={**env, "DRH_REDIS_URL": url},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert status.returncode == 0 and '"redis_ok": true' in status.stdout, status.stderr
        # the worker's health check (a Celery ping: publish and reply through Redis) works as user drh
        health = subprocess.run(
            [sys.executable, "-m", "plugin.cli", "worker", "--health", "--hostname", "serve0@%h"],
            env={**env, "DRH_REDIS_URL": url},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert health.returncode == 0, health.stderr
        assert "NOPERM" not in serve.log()
    finally:
        serve.stop()

    backup = subprocess.run(
        ["sh", str(DEPLOY / "redis" / "backup.sh")],
        env={
            **os.environ,
            "BACKUP_DIR": str(tmp_path / "backups"),
            "REDIS_DIR": str(folder),
            "REDIS_CLI_ARGS": f"-p {port} --user backup",
            "REDISCLI_AUTH": passwords["backup"],
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert backup.returncode == 0, backup.stderr
    assert list((tmp_path / "backups").glob("dump-*.rdb"))
