"""deploy/: the compose file parses (Debian's docker-compose, no engine needed), the systemd units
verify, the Prometheus rules name metrics we export, the backup script backs up a real Redis."""

from __future__ import annotations

import functools
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
    workers = {name: svc for name, svc in services.items() if name.startswith("worker-gpu")}
    assert set(services) == {"redis", "orthanc", "plugin", "prometheus", "alertmanager", "https", *workers}
    assert "--appendonly" in services["redis"]["command"] and "yes" in services["redis"]["command"]
    # one worker service per GPU, each reserving its own device, which it sees as cuda:0
    devices = []
    for name, svc in workers.items():
        (gpu,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert gpu["capabilities"] == ["gpu"] and len(gpu["device_ids"]) == 1, name
        devices.append(gpu["device_ids"][0])
        assert (
            svc["environment"]["DRH_DEVICE"] == "cuda:0" and svc["environment"]["DRH_API_URL"] == "http://plugin:8080"
        )
        hostname = svc["command"][svc["command"].index("--hostname") + 1]
        assert svc["healthcheck"]["test"][-3:] == ["--health", "--hostname", hostname], name
    assert len(workers) >= 2 and len(set(devices)) == len(devices)
    assert services["plugin"]["environment"]["DRH_SERVE_WORKERS"] == "0"
    assert services["orthanc"]["healthcheck"]["test"] and services["plugin"]["healthcheck"]["test"]
    for name, svc in services.items():  # every log is capped
        assert svc["logging"]["driver"] == "json-file" and svc["logging"]["options"]["max-size"], name
    # Prometheus sends its alerts to the Alertmanager service
    prometheus = yaml.safe_load((copy / "prometheus" / "prometheus.yml").read_text())
    (target,) = prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert target.split(":")[0] == "alertmanager"
    # every file the stack mounts from deploy/ ships with it (except the site's secrets and certs)
    for svc in services.values():
        for vol in svc.get("volumes", []):
            source = vol["source"] if isinstance(vol, dict) else vol.split(":")[0]
            if source.startswith("/"):  # a bind mount (named volumes have no slash)
                src = Path(source)
                if src.name not in {"token", "certs", "orthanc-password"}:
                    assert src.exists(), f"{src} is mounted but not in deploy/"


def test_compose_file_is_rejected_when_broken(tmp_path):
    copy = _compose_copy(tmp_path)
    text = (copy / "docker-compose.yml").read_text()
    (copy / "docker-compose.yml").write_text(text.replace("  worker-gpu0:\n", "  worker-gpu0:\n    bogus_key: 1\n"))
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


def _exported_names(redis_client, tmp_path: Path) -> set[str]:
    """Every metric name drh-pacs exports (a serve process with Orthanc configured and a worker that
    has done something) and the ones the Orthanc drop-in sets."""
    from plugin.core.redis_server import free_port
    from plugin.core.settings import load_settings
    from plugin.dicom.counters import DicomCounters

    store = Store(redis_client)
    beat = {"hostname": "w@h", "pid": 1, "queues": ["ingest"], "concurrency": 1, "device": "cpu"}
    store.workers.beat({**beat, "started": time.time(), "last_seen": time.time()})
    settings = load_settings(env={}, data_dir=tmp_path, orthanc_url=f"http://127.0.0.1:{free_port()}")
    text = metrics.render(gather(store, settings=settings, dicom=DicomCounters())).decode()
    ours = set(re.findall(r"^(drh_[a-z_]+)", text, re.M))
    plugin = (DEPLOY / "orthanc" / "drh-pacs-forward.py").read_text()
    return ours | set(re.findall(r'SetMetricsValue\("(drh_[a-z_]+)"', plugin))


def test_prometheus_config_scrapes_metrics_and_alerts_use_exported_names(redis_client, tmp_path):
    conf = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in conf["scrape_configs"]}
    assert jobs["drh-pacs"]["metrics_path"] == "/metrics" and jobs["drh-pacs"]["authorization"]["type"] == "Bearer"
    assert jobs["orthanc"]["metrics_path"] == "/tools/metrics-prometheus"
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exprs = " ".join(r["expr"] for g in rules["groups"] for r in g["rules"])
    base = functools.partial(re.sub, r"_(total|bucket|count|sum|created)$", "")
    used = {base(name) for name in re.findall(r"\b(drh_[a-z_]+)", exprs)}
    exported = {base(name) for name in _exported_names(redis_client, tmp_path)}
    assert used and used <= exported, used - exported


def _prometheus_files(tmp_path: Path) -> Path:
    """prometheus.yml and alerts.yml with their /etc/prometheus paths pointed at a copy (as in the container)."""
    etc = tmp_path / "etc-prometheus"
    etc.mkdir()
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", etc / "alerts.yml")
    (etc / "drh-token").write_text("token\n")
    (etc / "orthanc-password").write_text("password\n")
    text = (DEPLOY / "prometheus" / "prometheus.yml").read_text().replace("/etc/prometheus/", f"{etc}/")
    (etc / "prometheus.yml").write_text(text)
    return etc


def rules_of(etc: Path) -> list[dict]:
    return yaml.safe_load((etc / "alerts.yml").read_text())["groups"]


def test_promtool_accepts_the_configuration_and_the_rules(tmp_path):
    etc = _prometheus_files(tmp_path)
    rules = subprocess.run(
        ["/usr/bin/promtool", "check", "rules", str(etc / "alerts.yml")], capture_output=True, text=True
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = subprocess.run(
        ["/usr/bin/promtool", "check", "config", str(etc / "prometheus.yml")], capture_output=True, text=True
    )
    assert config.returncode == 0, config.stdout + config.stderr
    broken = etc / "broken.yml"
    broken.write_text((etc / "alerts.yml").read_text().replace("> 10", "> > 10", 1))
    assert subprocess.run(["/usr/bin/promtool", "check", "rules", str(broken)], capture_output=True).returncode != 0


def test_the_alerts_fire_on_the_first_burst_and_for_a_part_that_is_down(tmp_path):
    """promtool's unit tests of the shipped rules, on the series drh-pacs exports: a failure counter
    there at zero from the start lets the first burst of failures fire the alert."""
    etc = _prometheus_files(tmp_path)
    tests = {
        "rule_files": [str(etc / "alerts.yml")],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'drh_tasks_total{task="index_instance",outcome="failed"}', "values": "0 0 0 15 15 15"},
                    {"series": 'drh_worker_up{worker="gpu0@h",device="cuda:0"}', "values": "1 1 0 0 0 0"},
                    {"series": 'drh_worker_up{worker="gpu1@h",device="cuda:0"}', "values": "1 1 1 1 1 1"},
                    {"series": "drh_spool_free_bytes", "values": "500 400 50 40 30 20 10 10 10 10 10 10 10 10"},
                    {"series": "drh_spool_size_bytes", "values": "1000+0x14"},
                    {
                        "series": 'drh_dicom_association_rejections_total{reason="calling-ae"}',
                        "values": "0 0 12 12 12",
                    },
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "5m",
                        "alertname": "DrhPacsFailures",
                        "exp_alerts": [{"exp_labels": {"task": "index_instance", "outcome": "failed"}}],
                    },
                    {
                        "eval_time": "5m",
                        "alertname": "DrhPacsWorkerDown",
                        "exp_alerts": [{"exp_labels": {"worker": "gpu0@h", "device": "cuda:0"}}],
                    },
                    {"eval_time": "3m", "alertname": "DrhPacsWorkerDown", "exp_alerts": []},  # not yet 2 min
                    {"eval_time": "13m", "alertname": "DrhPacsSpoolDiskLow", "exp_alerts": [{"exp_labels": {}}]},
                    {
                        "eval_time": "4m",
                        "alertname": "DrhPacsAssociationsRejected",
                        "exp_alerts": [{"exp_labels": {"reason": "calling-ae"}}],
                    },
                ],
            }
        ],
    }
    # promtool compares annotations too: the summaries of the shipped rules with the labels filled in
    summaries = {r["alert"]: r["annotations"]["summary"] for g in rules_of(etc) for r in g["rules"]}
    for case in tests["tests"][0]["alert_rule_test"]:
        for alert in case["exp_alerts"]:
            summary = summaries[case["alertname"]]
            for label, value in alert["exp_labels"].items():
                summary = summary.replace("{{ $labels." + label + " }}", value)
            alert["exp_annotations"] = {"summary": summary}
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(tests))
    res = subprocess.run(["/usr/bin/promtool", "test", "rules", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_alertmanager_configuration_has_a_receiver_for_it_staff(tmp_path):
    config = DEPLOY / "alertmanager" / "alertmanager.yml"
    res = subprocess.run(["/usr/bin/amtool", "check-config", str(config)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    loaded = yaml.safe_load(config.read_text())
    assert loaded["route"]["receiver"] in {r["name"] for r in loaded["receivers"]}
    broken = tmp_path / "alertmanager.yml"
    broken.write_text(config.read_text().replace("receiver: it-staff", "receiver: nobody"))
    assert subprocess.run(["/usr/bin/amtool", "check-config", str(broken)], capture_output=True).returncode != 0


def _nginx_check(tmp_path: Path, server_block: str) -> subprocess.CompletedProcess[str]:
    """Debian's ``nginx -t`` on a server block, with test certificates (deploy/tls/make-certs.sh) and
    the upstream at 127.0.0.1 as on a Debian host (the compose name ``plugin`` resolves in Docker only)."""
    certs = tmp_path / "certs"
    if not (certs / "server.crt").exists():
        made = subprocess.run(
            ["sh", str(DEPLOY / "tls" / "make-certs.sh"), str(certs), "drh-pacs.example.org"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert made.returncode == 0, made.stderr
    block = server_block.replace("/etc/nginx/certs/", f"{certs}/").replace("plugin:8080", "127.0.0.1:8080")
    (tmp_path / "drh-pacs.conf").write_text(block)
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log stderr;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {tmp_path};\n  include {tmp_path}/drh-pacs.conf;\n}}\n"
    )
    return subprocess.run(
        ["/usr/sbin/nginx", "-t", "-p", str(tmp_path), "-c", str(main), "-e", "stderr"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_tls_proxy_configuration_works_on_debian_s_nginx(tmp_path):
    shipped = (DEPLOY / "tls" / "nginx.conf").read_text()
    res = _nginx_check(tmp_path, shipped)
    assert res.returncode == 0, res.stderr
    assert "syntax is ok" in res.stderr and "test is successful" in res.stderr
    # what the shipped file said before: nginx 1.22 has no `http2` directive
    older = shipped.replace("listen 443 ssl http2;", "listen 443 ssl;\n    http2 on;")
    res = _nginx_check(tmp_path, older)
    assert res.returncode != 0 and 'unknown directive "http2"' in res.stderr


def test_the_ohif_proxy_configuration_works_on_debian_s_nginx_and_reaches_every_drh_pacs_path(tmp_path):
    """deploy/viewers/ohif/nginx.conf said `http2 on;` (nginx 1.22 refuses it), and its drh-pacs
    location left out the status page, health and metrics: the page's Status link opened OHIF."""
    import re

    from plugin.core.settings import load_settings
    from plugin.http.app import ApiContext, create_app

    shipped = (DEPLOY / "viewers" / "ohif" / "nginx.conf").read_text()
    local = shipped.replace("drh-pacs.example.org:8080", "127.0.0.1:8080").replace("pacs.example.org", "127.0.0.1")
    res = _nginx_check(tmp_path, local)
    assert res.returncode == 0, res.stderr

    (pattern,) = re.findall(r"location ~ (\S+) \{\n\s*proxy_pass http://drh-pacs", shipped)
    app = create_app(ApiContext(settings=load_settings(env={"DRH_DATA_DIR": str(tmp_path / "data")}), store=None))

    def paths(routes, prefix=""):
        for route in routes:
            path = prefix + getattr(route, "path", "")
            yield from paths(route.routes, path) if getattr(route, "routes", None) else [path]

    served = {path for path in paths(app.routes) if path != "/"}
    assert served and not [p for p in served if not re.match(pattern, p.replace("{", "x").replace("}", ""))]


def test_the_backup_folder_is_created_by_the_install_steps_and_the_unit():
    unit = (DEPLOY / "systemd" / "drh-pacs-redis-backup.service").read_text()
    backup_dir = re.search(r"^Environment=BACKUP_DIR=(\S+)$", unit, re.M).group(1)
    assert re.search(r"^ReadWritePaths=(\S+)$", unit, re.M).group(1) == backup_dir
    # run as root ("+") before the sandbox, which needs the folder to exist
    assert re.search(r"^ExecStartPre=\+/usr/bin/install -d -o redis -g redis -m 0750 \$\{BACKUP_DIR\}$", unit, re.M)
    steps = (DEPLOY / "README.md").read_text()
    assert f"install -d -o redis -g redis -m 0750 {backup_dir}" in steps


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
