"""Orthanc (the Debian package) as the hospital PACS: automatic forwarding, and the backfill command.

Orthanc runs with the shipped deploy/orthanc/orthanc.json (ports, storage and modalities rewritten
for the test) and the shipped Lua script; studies reach it with DCMTK storescu.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydicom import dcmread

from plugin.store.broker import queue_depth
from tests.helpers.dicomgen import fixture_images, make_study
from tests.helpers.peers import ORTHANC_USER, Orthanc, dcmtk, running_plugin
from tests.helpers.processes import wait_until

pytestmark = pytest.mark.slow  # real DICOM peers, Orthanc, workers or deployment tools


def _source_ae(path) -> str:
    return str(dcmread(path, stop_before_pixels=True).file_meta.SourceApplicationEntityTitle).strip()


def _spooled(plugin, study) -> list:
    folder = plugin.settings.spool_dir / study.study_uid
    return sorted(folder.glob("*.dcm")) if folder.exists() else []


def test_orthanc_forwards_every_stable_study_to_drh_pacs(tmp_path, redis_client, redis_server):
    images = fixture_images()
    studies = [
        make_study(tmp_path / "in", images[0:2], patient_id="P-ORTH-1"),
        make_study(tmp_path / "in", images[4:5], patient_id="P-ORTH-2", rle=True),
    ]
    with running_plugin(tmp_path, redis_server.url, allowed_calling_aes=["ORTHANC"]) as plugin:
        with Orthanc(tmp_path, {"DRHPACS": plugin.port}) as orthanc:
            for study in studies:
                proc = dcmtk(
                    "storescu", "-aet", "MODALITY", "-aec", "ORTHANC", "-xr", "127.0.0.1", str(orthanc.dicom_port),
                    *map(str, study.files),
                )  # fmt: skip
                assert proc.returncode == 0, proc.stderr
            for study in studies:
                wait_until(
                    lambda s=study: len(_spooled(plugin, s)) == len(s.files),
                    60,
                    what=f"Orthanc to forward study {study.study_uid}",
                )
            assert "forwarded to DRHPACS" in orthanc.log()
        for study in studies:
            for path in _spooled(plugin, study):
                assert path.stem in study.sop_uids
                assert (
                    dcmread(path, stop_before_pixels=True).file_meta.SourceApplicationEntityTitle.strip() == "ORTHANC"
                )
        wait_until(lambda: queue_depth(redis_client, "ingest") >= 3, 20, what="three indexing tasks")


def _backfill(settings, orthanc, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DRH_REDIS_URL": settings.redis_url,
        "DRH_DATA_DIR": str(settings.data_dir),
        "DRH_ORTHANC_URL": orthanc.url,
        "DRH_ORTHANC_USER": ORTHANC_USER[0],
        "DRH_ORTHANC_PASSWORD": ORTHANC_USER[1],
    }
    return subprocess.run(
        [sys.executable, "-m", "plugin.cli", "backfill", "orthanc", *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )


def test_backfill_indexes_an_existing_archive_and_resumes(tmp_path, redis_client, redis_server):
    images = fixture_images()
    studies = [make_study(tmp_path / "in", images[n : n + 1], patient_id=f"P-BF-{n}") for n in range(3)]
    with running_plugin(tmp_path, redis_server.url) as plugin:
        with Orthanc(tmp_path, {"DRHPACS": plugin.port}, forward=False) as orthanc:
            files = [str(f) for s in studies for f in s.files]
            proc = dcmtk(
                "storescu", "-aet", "MODALITY", "-aec", "ORTHANC", "127.0.0.1", str(orthanc.dicom_port), *files
            )
            assert proc.returncode == 0, proc.stderr
            wait_until(lambda: len(orthanc.get("/studies")) == 3, 30, what="Orthanc to hold three studies")

            first = _backfill(plugin.settings, orthanc, "--limit", "1")
            assert first.returncode == 0, first.stderr
            assert "1 new study(ies), 1 instance(s) queued" in first.stdout
            assert sum(len(_spooled(plugin, s)) for s in studies) == 1

            second = _backfill(plugin.settings, orthanc)
            assert second.returncode == 0, second.stderr
            assert "2 new study(ies), 2 instance(s) queued" in second.stdout
            assert "1 study(ies) done in earlier runs" in second.stdout
            assert "backfill orthanc" in second.stderr  # the progress bar

            third = _backfill(plugin.settings, orthanc)
            assert "0 new study(ies)" in third.stdout and "3 study(ies) done in earlier runs" in third.stdout

            again = _backfill(plugin.settings, orthanc, "--restart")
            assert "3 new study(ies), 0 instance(s) queued, 3 already present" in again.stdout

        for study in studies:
            (path,) = _spooled(plugin, study)
            assert _source_ae(path) == "ORTHANC"
        assert queue_depth(redis_client, "ingest") == 3


def test_backfill_says_when_orthanc_is_unreachable(tmp_path, redis_server):
    from plugin.core.redis_server import free_port

    with running_plugin(tmp_path, redis_server.url) as plugin:

        class Nowhere:
            url = f"http://127.0.0.1:{free_port()}"

        proc = _backfill(plugin.settings, Nowhere)
        assert proc.returncode == 1
        assert "cannot reach Orthanc" in proc.stderr


@pytest.mark.parametrize("key", ["DicomModalities", "LuaScripts", "StableAge", "DrhPacs"])
def test_shipped_orthanc_configuration_is_valid_json_with_forwarding(key):
    import json

    from tests.helpers.peers import DEPLOY_ORTHANC

    config = json.loads((DEPLOY_ORTHANC / "orthanc.json").read_text())
    assert key in config
    assert config["DicomModalities"][config["DrhPacs"]["Modality"]]["AET"] == "DRHPACS"
