"""The viewer integrations of deploy/: Orthanc Explorer 2's "Similar cases" button and the OHIF
configuration, checked against the formats the viewers document, and run where a real part exists
here (Debian's Orthanc merging the drop-in, Chromium evaluating OHIF's app-config.js).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

DEPLOY = Path(__file__).parents[1] / "deploy"
OE2_FILE = DEPLOY / "orthanc" / "orthanc-explorer-2.json"
OHIF_CONFIG = DEPLOY / "viewers" / "ohif" / "app-config.js"

# The keys of one custom button in OE2's Plugin/DefaultConfiguration.json ("CustomButtons").
OE2_BUTTON_KEYS = {"HttpMethod", "Id", "Tooltip", "Target", "Icon", "Url", "Payload", "Refresh"}
# Study-level tags OE2 can put in a study button's Url: the study's and patient's main DICOM tags.
OE2_STUDY_TAGS = {"StudyInstanceUID", "AccessionNumber", "StudyDate", "PatientID", "UUID"}
# OHIF's DicomWebConfig type (extensions/default/src/DicomWebDataSource/utils/dicomWebConfig.ts),
# plus the legacy wadoUriRoot and the display name.
OHIF_KEYS = {
    "name", "friendlyName", "qidoRoot", "wadoRoot", "wadoUriRoot", "wadoUri", "qidoSupportsIncludeField",
    "imageRendering", "thumbnailRendering", "supportsReject", "singlepart", "requestTransferSyntaxUID",
    "acceptHeader", "omitQuotationForMultipartRequest", "supportsFuzzyMatching", "supportsWildcard",
    "supportsNativeDICOMModel", "enableRequestTag", "enableStudyLazyLoad", "bulkDataURI", "onConfiguration",
    "staticWado",
}  # fmt: skip


def test_oe2_button_follows_the_documented_format_and_opens_the_page():
    config = json.loads(OE2_FILE.read_text())
    assert list(config) == ["OrthancExplorer2"]  # one section: a drop-in that merges
    buttons = config["OrthancExplorer2"]["UiOptions"]["CustomButtons"]
    assert set(buttons) == {"study", "series", "instance"}
    (button,) = buttons["study"]
    assert set(button) <= OE2_BUTTON_KEYS and {"HttpMethod", "Id", "Url"} <= set(button)
    assert button["HttpMethod"] == "GET" and button["Target"] == "_blank"
    assert re.fullmatch(r"bi bi-[a-z0-9-]+", button["Icon"])  # a bootstrap icon, as OE2 wants
    assert set(re.findall(r"\{(\w+)\}", button["Url"])) <= OE2_STUDY_TAGS
    url = urlsplit(button["Url"].replace("{StudyInstanceUID}", "1.2.3"))
    assert url.scheme == "https" and url.path == "/similar" and parse_qs(url.query) == {"study": ["1.2.3"]}


@pytest.mark.slow
def test_orthanc_merges_the_oe2_drop_in(tmp_path):
    """Debian's Orthanc reads its configuration folder with our file in it; a Python plugin reads the
    merged configuration back, as OE2 would see it."""
    from tests.helpers.peers import ORTHANC_USER, Orthanc, read_orthanc_json

    orthanc = Orthanc(tmp_path, {}, forward=False)  # its configuration folder is laid out as Debian's
    folder = orthanc.config_path
    script = tmp_path / "expose.py"
    script.write_text(
        "import orthanc\n"
        "def configuration(output, uri, **request):\n"
        "    output.AnswerBuffer(orthanc.GetConfiguration(), 'application/json')\n"
        "orthanc.RegisterRestCallback('/drh-test/configuration', configuration)\n"
    )
    python = read_orthanc_json(folder / "python.json")  # Debian's, from orthanc-python
    python["PythonScript"] = str(script)
    (folder / "python.json").write_text(json.dumps(python))
    (folder / "orthanc-explorer-2.json").write_text(OE2_FILE.read_text())
    with orthanc:
        merged = httpx.get(f"{orthanc.url}/drh-test/configuration", auth=ORTHANC_USER, timeout=30).json()
    (button,) = merged["OrthancExplorer2"]["UiOptions"]["CustomButtons"]["study"]
    assert button["Id"] == "drh-pacs-similar-cases" and merged["DicomAet"] == "ORTHANC"

    # The caveat the README states: a second file with the same section stops Orthanc.
    (folder / "other.json").write_text(json.dumps({"OrthancExplorer2": {"Enable": True}}))
    with pytest.raises(RuntimeError, match="exited"):
        orthanc.start(timeout=30)
    assert "OrthancExplorer2" in orthanc.log()


@pytest.mark.slow
def test_ohif_app_config_evaluates_and_points_at_drh_pacs(tmp_path):
    from tests.helpers.browser import chromium

    driver = chromium(tmp_path / "profile")
    try:
        driver.get("data:text/html,<title>ohif-config</title>")
        driver.execute_script(OHIF_CONFIG.read_text())  # as OHIF loads it: a plain script setting window.config
        sources = driver.execute_script(
            "return window.config.dataSources.map(s => ({sourceName: s.sourceName, namespace: s.namespace,"
            " keys: Object.keys(s.configuration), qidoRoot: s.configuration.qidoRoot}))"
        )
        roots = driver.execute_script(
            "const c = window.config.dataSources.find(s => s.sourceName === 'similar').configuration;"
            "const hook = q => c.onConfiguration({...c}, {params: {}, query: new URLSearchParams(q)}).qidoRoot;"
            "return [hook('similarTo=1.2.826.0.1.3'), hook(''), hook('similarTo=javascript:alert(1)')];"
        )
        default = driver.execute_script("return window.config.defaultDataSourceName")
    finally:
        driver.quit()
    assert default == "pacs" and [s["sourceName"] for s in sources] == ["pacs", "similar"]
    for source in sources:
        assert source["namespace"] == "@ohif/extension-default.dataSourcesModule.dicomweb"
        assert set(source["keys"]) <= OHIF_KEYS, set(source["keys"]) - OHIF_KEYS
    # with a reference: the per-reference similar root; without (a study opened): the plain root
    assert roots == ["/dicom-web/similar/study/1.2.826.0.1.3", "/dicom-web", "/dicom-web"]
