"""Settings: precedence, parsing, loud failures, and that the README documents every setting."""

import dataclasses
from pathlib import Path

import pytest

from plugin.core.settings import Settings, SettingsError, load_settings, settings_table

README = Path(__file__).parents[1] / "README.md"


def test_defaults_are_safe(tmp_path):
    s = load_settings(env={"DRH_DATA_DIR": str(tmp_path)})
    assert s.ae_title == "DRHPACS" and s.dicom_port == 11112 and s.similar_ae_title == "SIMILAR"
    assert s.http_host == "127.0.0.1"  # the API is not exposed beyond this machine by default
    assert s.redis_url == ""  # embedded Redis
    token = s.resolved_api_token()
    assert len(token) >= 32
    assert s.resolved_api_token() == token  # kept, not regenerated
    assert (tmp_path / "api-token").stat().st_mode & 0o077 == 0


def test_environment_beats_file_beats_default(tmp_path):
    cfg = tmp_path / "drh.toml"
    cfg.write_text('dicom_port = 4000\nae_title = "FROMFILE"\nallowed_calling_aes = ["PACS1", "PACS2"]\n')
    s = load_settings(env={"DRH_CONFIG": str(cfg), "DRH_DICOM_PORT": "5000"})
    assert s.dicom_port == 5000
    assert s.ae_title == "FROMFILE"
    assert s.allowed_calling_aes == ["PACS1", "PACS2"]
    assert load_settings(env={"DRH_CONFIG": str(cfg)}, dicom_port=6000).dicom_port == 6000


def test_lists_maps_and_booleans_from_environment():
    s = load_settings(
        env={
            "DRH_ALLOWED_CALLING_AES": "A, B,,C",
            "DRH_DICOM_NODES": "ORTHANC=127.0.0.1:4242, VIEWER=10.0.0.5:104",
            "DRH_API_OPEN_READONLY": "yes",
        }
    )
    assert s.allowed_calling_aes == ["A", "B", "C"]
    assert s.dicom_nodes == {"ORTHANC": "127.0.0.1:4242", "VIEWER": "10.0.0.5:104"}
    assert s.api_open_readonly is True


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"DRH_DICOM_PORT": "eleven"}, "dicom_port"),
        ({"DRH_API_OPEN_READONLY": "maybe"}, "api_open_readonly"),
        ({"DRH_DICOM_NODES": "ORTHANC"}, "dicom_nodes"),
        ({"DRH_NON_IMAGE_POLICY": "drop"}, "non_image_policy"),
        ({"DRH_AE_TITLE": "A_TITLE_FAR_TOO_LONG"}, "AE title"),
        ({"DRH_DEVICE": "tpu"}, "device"),
        ({"DRH_CONFIG": "/nonexistent/drh.toml"}, "DRH_CONFIG"),
        ({"DRH_MOVE_DESTINATIONS": "VIEWER"}, "move_destinations"),  # not a declared viewer or node
        ({"DRH_VIEWER_URLS": "X=javascript:alert(1)"}, "viewer_urls"),  # the page writes these into links
        ({"DRH_VIEWER_URLS": "X=https://v/{PatientName}"}, "viewer_urls"),  # not a field the page fills
        ({"DRH_CORS_ORIGINS": "https://ohif.example.org/app"}, "cors_origins"),  # an origin has no path
        ({"DRH_SESSION_HOURS": "0"}, "session_hours"),
        # values a worker or the listener would only stumble on later (a crash loop, every image failed)
        ({"DRH_LOG_LEVEL": "verbose"}, "log_level"),
        ({"DRH_BATCH_SIZE": "0"}, "batch_size"),
        ({"DRH_WORKER_CONCURRENCY": "0"}, "worker_concurrency"),
        ({"DRH_HTTP_PORT": "99999"}, "http_port"),
        ({"DRH_DICOM_PORT": "0"}, "dicom_port"),
        ({"DRH_TASK_MAX_RETRIES": "-1"}, "task_max_retries"),
        ({"DRH_BATCH_CLAIM_SECONDS": "0"}, "batch_claim_seconds"),
    ],
)
def test_bad_values_fail_loudly_naming_the_setting(env, needle):
    with pytest.raises(SettingsError, match=needle):
        load_settings(env=env)


def test_page_settings_from_environment():
    s = load_settings(
        env={
            "DRH_DICOM_NODES": "VIEWER=10.0.0.5:104",
            "DRH_MOVE_DESTINATIONS": "VIEWER",
            "DRH_VIEWER_URLS": "OHIF=https://ohif.example.org/viewer?StudyInstanceUIDs={StudyInstanceUID},"
            "Weasis=weasis://%24dicom%3Ars%20-r%20%22studyUID%3D{StudyInstanceUID}%22",
            "DRH_CORS_ORIGINS": "https://ohif.example.org",
        }
    )
    assert list(s.viewer_urls) == ["OHIF", "Weasis"]  # the page shows them in this order
    assert s.viewer_urls["OHIF"].endswith("StudyInstanceUIDs={StudyInstanceUID}")
    assert s.move_destinations == ["VIEWER"] and s.cors_origins == ["https://ohif.example.org"]
    # a viewer declared once (dicom_viewers, where its C-MOVE goes) may be a destination too
    both = load_settings(env={"DRH_DICOM_VIEWERS": "OHIF=10.0.0.6:104", "DRH_MOVE_DESTINATIONS": "OHIF"})
    assert both.move_destinations == ["OHIF"] and both.move_destination("OHIF") == "10.0.0.6:104"


def test_unknown_key_in_file_is_refused(tmp_path):
    cfg = tmp_path / "drh.toml"
    cfg.write_text("dicom_prot = 4000\n")
    with pytest.raises(SettingsError, match="dicom_prot"):
        load_settings(env={"DRH_CONFIG": str(cfg)})


def test_a_misspelled_variable_is_refused_with_the_setting_it_resembles():
    with pytest.raises(SettingsError, match=r"DRH_HTTP_PROT \(DRH_HTTP_PORT\?\)"):
        load_settings(env={"DRH_HTTP_PROT": "9000"})
    with pytest.raises(SettingsError, match=r"DRH_NONSENSE$"):
        load_settings(env={"DRH_NONSENSE": "1"})
    # not settings, but read by name: the settings file, and the tests' screenshot switch
    load_settings(env={"DRH_CONFIG": "", "DRH_UPDATE_SCREENSHOT": "1"})
    # a Kubernetes Service named drh-pacs puts these in every pod
    k8s = {"DRH_PACS_SERVICE_HOST": "10.0.0.1", "DRH_PACS_PORT": "tcp://10.0.0.1:11112", "DRH_PACS_PORT_11112_TCP": "x"}
    assert load_settings(env=k8s).pacs_wado_root == ""
    # other programs' variables are none of ours
    assert load_settings(env={"HTTP_PORT": "1", "DRHX": "2"}).http_port == 8080


def test_a_bad_value_in_the_file_names_the_file(tmp_path):
    cfg = tmp_path / "drh.toml"
    cfg.write_text('http_port = "eighty"\n')
    with pytest.raises(SettingsError, match=f"http_port \\(in {cfg}\\)") as err:
        load_settings(env={"DRH_CONFIG": str(cfg)})
    assert "DRH_HTTP_PORT" not in str(err.value)  # it was not the environment
    cfg.write_text("http_prot = 8000\n")
    with pytest.raises(SettingsError, match=r"http_prot \(http_port\?\)"):
        load_settings(env={"DRH_CONFIG": str(cfg)})


def test_the_log_level_is_read_in_any_case():
    assert load_settings(env={"DRH_LOG_LEVEL": "debug"}).log_level == "debug"


def test_readme_documents_every_setting():
    text = README.read_text()
    missing = [f.name for f in dataclasses.fields(Settings) if f"DRH_{f.name.upper()}" not in text]
    assert not missing, f"settings not documented in README.md: {missing}"
    assert settings_table() in text, "README's settings table is stale: paste `python -m plugin.settings`"
