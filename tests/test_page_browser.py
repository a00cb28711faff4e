"""The similar-cases page in a real browser: Debian's chromium driven by chromedriver (selenium from
PyPI), against a real ``drh-pacs serve`` whose Redis holds generated studies indexed with the shipped
model, and a DCMTK ``storescp`` as the node the page sends studies to.

Screenshots are saved in the test's tmp folder (pytest prints it on failure). With
``DRH_UPDATE_SCREENSHOT=1`` the reading-room screenshot is also written to ``docs/similar-cases.png``,
the one the README shows: ``DRH_UPDATE_SCREENSHOT=1 python -m pytest tests/test_page_browser.py -k reading_room``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from plugin.core.redis_server import free_port
from tests.helpers.archive import Planned, index_archive
from tests.helpers.browser import chromium
from tests.helpers.dicomgen import Study, fixture_images, make_instance
from tests.helpers.peers import StoreSCP
from tests.helpers.processes import stop_process_group, wait_until

pytestmark = pytest.mark.slow  # serve, chromium, storescp

TOKEN = "browser-test-token"
NAMESPACE = "drh-page-test"
DOCS_SCREENSHOT = Path(__file__).parents[1] / "docs" / "similar-cases.png"
USER, PASSWORD = "radiologist", "reading-room-2024"

images = fixture_images()
# The reference (P1, 2023) first; a prior of the same patient; other patients' studies, CR and DX.
PLAN = [
    Planned("P1", [images[0]], "DX", "20230301"),
    Planned("P1", images[1:3], "DX", "20230914"),
    Planned("P2", [images[4]], "DX", "20240102"),
    Planned("P3", [images[8]], "CR", "20240103"),
    Planned("P4", images[5:7], "DX", "20240210"),
    Planned("P5", [images[9]], "CR", "20240301"),
    Planned("P6", [images[7]], "DX", "20240402"),
    Planned("P7", images[10:12], "CR", "20240515"),
    Planned("P8", [images[3]], "DX", "20240601"),
]


@dataclass
class Served:
    base: str
    studies: list[Study]
    viewer: StoreSCP  # the node the page sends studies to
    tmp: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory, redis_server) -> Iterator[Served]:
    """`drh-pacs serve` (no worker) over the session's Redis, the archive indexed beforehand."""
    from hashing.encoder import Encoder
    from plugin.http.auth import hash_password, write_users
    from plugin.store import Store

    tmp = tmp_path_factory.mktemp("page")
    data = tmp / "data"
    client = redis.Redis.from_url(redis_server.url)
    for key in client.scan_iter(match=f"{NAMESPACE}:*"):
        client.delete(key)
    store = Store(client, NAMESPACE)
    studies = index_archive(store, Encoder.load(None, device="cpu"), data / "spool", PLAN)
    write_users(data / "http-users", {USER: hash_password(PASSWORD)})

    viewer = StoreSCP(tmp / "received", "VIEWER")
    http_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRH_")}
    env.update(
        DRH_REDIS_URL=redis_server.url,
        DRH_REDIS_NAMESPACE=NAMESPACE,
        DRH_DATA_DIR=str(data),
        DRH_SERVE_WORKERS="0",
        DRH_DICOM_PORT=str(free_port()),
        DRH_HTTP_PORT=str(http_port),
        DRH_API_TOKEN=TOKEN,
        DRH_DEVICE="cpu",
        DRH_DICOM_NODES=f"VIEWER=127.0.0.1:{viewer.port}",
        DRH_MOVE_DESTINATIONS="VIEWER",
        DRH_VIEWER_URLS="OHIF=https://ohif.example.org/viewer?StudyInstanceUIDs={StudyInstanceUID},"
        "Weasis=weasis://%24dicom%3Ars%20--url%20%22https%3A%2F%2Fpacs%2Fdicom-web%22%20-r%20%22studyUID%3D{StudyInstanceUID}%22",
        OMP_NUM_THREADS="1",
    )
    log = tmp / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "plugin.cli", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{http_port}"
    try:

        def ready() -> bool:
            assert proc.poll() is None, f"serve exited early:\n{log.read_text()}"
            try:
                return httpx.get(f"{base}/ready", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5).is_success
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout=120, interval=0.5, what="drh-pacs serve to be ready")
        yield Served(base, studies, viewer, tmp)
    finally:
        stop_process_group(proc, signal.SIGINT, 60)
        viewer.stop()
        print(f"--- serve.log ---\n{log.read_text()[-4000:]}")


@pytest.fixture
def browser(served, tmp_path) -> Iterator:
    driver = chromium(tmp_path / "profile")
    try:
        yield driver
    finally:
        driver.save_screenshot(str(tmp_path / "last.png"))  # what the page showed when the test ended
        driver.quit()


def _wait(driver, condition, timeout: float = 60, what: str = ""):
    """Until ``condition`` holds. An element found on a page that is being replaced (a form's
    submission, a search's new rows) goes stale under the condition: that is "not yet", as a
    missing element is."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = (NoSuchElementException, StaleElementReferenceException)

    def holds(d):
        try:
            return condition(d)
        except WebDriverException as exc:  # Chromium's other word for a stale element
            if "does not belong to the document" in str(exc.msg):
                return False
            raise

    wait = WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=ignored)
    return wait.until(holds, message=what)


def _login(
    driver, base: str, password: str = TOKEN, username: str = "", target: str = "/similar", refused: bool = False
) -> None:
    """Log in as a person would, and (unless ``refused`` is expected) wait for the page the login leads
    to. Navigating on before the login's own redirect has landed races it: the redirect to the bare
    ``target`` can replace the next ``driver.get``, leaving a page that never searched."""
    from selenium.webdriver.common.by import By

    driver.get(base + target)
    _wait(driver, lambda d: d.find_elements(By.ID, "login-form"), what="the login form")
    if username:
        driver.find_element(By.ID, "username").send_keys(username)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "login-submit").click()
    if not refused:
        _wait(
            driver,
            lambda d: d.current_url.endswith(target) and d.execute_script("return document.readyState") == "complete",
            what=f"{target} after the login",
        )


def _rows(driver) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#results li.result")


def _result_studies(driver) -> list[str]:
    """The rows' studies, read in one script (rows are replaced while a search answers)."""
    script = "return [...document.querySelectorAll('#results li.result')].map(r => r.dataset.study)"
    return driver.execute_script(script)


def _settled(driver) -> bool:
    """The page answered the last search (its status line is not "Searching...")."""
    return not driver.execute_script("return document.getElementById('message').textContent.startsWith('Searching')")


def _thumbnails_decoded(driver, scope: str) -> list[int]:
    """naturalWidth of every thumbnail under ``scope`` once loaded (0: the browser could not decode it)."""
    return driver.execute_script(
        "const imgs = [...document.querySelectorAll(arguments[0] + ' img.thumb')];"
        "imgs.forEach(i => i.scrollIntoView());"
        "return imgs.every(i => i.complete) ? imgs.map(i => i.naturalWidth) : null;",
        scope,
    )


def _search_results(driver, served: Served, count: int, query: str) -> None:
    from selenium.common.exceptions import TimeoutException

    driver.get(f"{served.base}/similar?{query}")
    try:
        _wait(driver, lambda d: _settled(d) and len(_result_studies(d)) == count, what=f"{count} result rows")
    except TimeoutException:  # say what the page showed instead
        message = driver.execute_script("return document.getElementById('message').textContent")
        shown = len(_result_studies(driver))
        pytest.fail(f"expected {count} result rows, the page at {driver.current_url} shows {shown}: {message!r}")


def test_login_refuses_a_wrong_token_then_lets_the_right_one_in(served, browser):
    from selenium.webdriver.common.by import By

    _login(browser, served.base, password="not-the-token", refused=True)
    _wait(browser, lambda d: "wrong token" in d.find_element(By.ID, "login-error").text, what="the refusal")
    assert "/login" in browser.current_url
    assert httpx.get(f"{served.base}/api/session", cookies=_cookies(browser)).status_code == 401
    browser.find_element(By.ID, "password").send_keys(TOKEN)
    browser.find_element(By.ID, "login-submit").click()
    _wait(browser, lambda d: d.current_url.endswith("/similar"), what="the page after login")
    _wait(browser, lambda d: "API token" in d.find_element(By.ID, "who").text, what="who is logged in")
    assert httpx.get(f"{served.base}/api/session", cookies=_cookies(browser)).json()["kind"] == "token"


def test_a_configured_user_logs_in_and_the_status_page_opens(served, browser):
    from selenium.webdriver.common.by import By

    _login(browser, served.base, password="wrong-password", username=USER, refused=True)
    _wait(browser, lambda d: "wrong user name" in d.find_element(By.ID, "login-error").text, what="the refusal")
    _login(browser, served.base, password=PASSWORD, username=USER, target="/status")
    _wait(browser, lambda d: d.current_url.endswith("/status"), what="the status page after login")
    assert "drh-pacs status" in browser.page_source


def _cookies(driver) -> dict[str, str]:
    return {c["name"]: c["value"] for c in driver.get_cookies()}


def test_the_page_shows_the_most_similar_studies_with_decoded_thumbnails(served, browser):
    from selenium.webdriver.common.by import By

    reference = served.studies[0]
    _login(browser, served.base)
    _search_results(browser, served, 8, f"study={reference.study_uid}")
    expected = httpx.get(
        f"{served.base}/api/similar/study/{reference.study_uid}", headers={"Authorization": f"Bearer {TOKEN}"}
    ).json()["results"]
    assert _result_studies(browser) == [r["study"]["study_instance_uid"] for r in expected]  # nearest first
    widths = _wait(browser, lambda d: _thumbnails_decoded(d, "#results"), what="result thumbnails loaded")
    images_in_results = sum(len(s.files) for s in served.studies[1:])
    assert len(widths) == images_in_results and all(w > 0 for w in widths)
    ref_widths = _wait(browser, lambda d: _thumbnails_decoded(d, "#reference"), what="reference thumbnails")
    assert ref_widths and all(w > 0 for w in ref_widths)
    first = _rows(browser)[0]
    assert f"#{expected[0]['rank']}" in first.text and f"score {expected[0]['score']:.3f}" in first.text
    # the nearest study's own date, modality and image count, as the archive was planned
    plan = PLAN[[s.study_uid for s in served.studies].index(expected[0]["study"]["study_instance_uid"])]
    d = plan.study_date
    summary = f"{d[:4]}-{d[4:6]}-{d[6:]} · {plan.modality} · {len(plan.images)} image(s)"
    assert f"distance {expected[0]['distance']}" in first.text and summary in first.text
    # the study's own description, without the rank prefix the DICOM answer carries for viewers, and
    # the patient's name as people write it
    lines = first.find_elements(By.CSS_SELECTOR, ".meta .line")
    accession = "ACC" + expected[0]["study"]["study_instance_uid"][-8:]
    assert [line.text for line in lines][1:] == ["CHEST AP", f"Test, Patient · {plan.patient_id} · {accession}"]
    link = first.find_element(By.CSS_SELECTOR, "a.viewer-link")
    assert (
        link.get_attribute("href")
        == f"https://ohif.example.org/viewer?StudyInstanceUIDs={expected[0]['study']['study_instance_uid']}"
    )
    weasis = first.find_elements(By.CSS_SELECTOR, "a.viewer-link")[1].get_attribute("href")
    assert weasis.startswith("weasis://") and expected[0]["study"]["study_instance_uid"] in weasis
    # by accession number, the same answer
    accession = httpx.get(
        f"{served.base}/dicom-web/studies", params={"StudyInstanceUID": reference.study_uid},
        headers={"Authorization": f"Bearer {TOKEN}"},
    ).json()[0]["00080050"]["Value"][0]  # fmt: skip
    _search_results(browser, served, 8, f"accession={accession}")
    assert _result_studies(browser) == [r["study"]["study_instance_uid"] for r in expected]


def test_filters_change_the_rows(served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    reference = served.studies[0]
    cr = {served.studies[n].study_uid for n in (3, 5, 7)}
    _login(browser, served.base)
    _search_results(browser, served, 8, f"study={reference.study_uid}")
    browser.find_element(By.ID, "modality").send_keys("CR")
    browser.find_element(By.ID, "go").click()
    _wait(browser, lambda d: _settled(d) and len(_result_studies(d)) == 3, what="3 CR rows")
    assert set(_result_studies(browser)) == cr
    assert "modality=CR" in browser.current_url  # the filters are in the address, to share or reload
    browser.find_element(By.ID, "modality").clear()
    browser.find_element(By.CSS_SELECTOR, "input[name=patients][value=same]").click()
    browser.find_element(By.ID, "go").click()
    _wait(browser, lambda d: _result_studies(d) == [served.studies[1].study_uid], what="the patient's prior only")
    browser.find_element(By.CSS_SELECTOR, "input[name=patients][value=other]").click()
    Select(browser.find_element(By.ID, "k")).select_by_visible_text("5")
    browser.find_element(By.ID, "go").click()
    _wait(
        browser,
        lambda d: len(_result_studies(d)) == 5 and served.studies[1].study_uid not in _result_studies(d),
        what="5 rows of other patients",
    )
    _search_results(browser, served, 2, f"study={reference.study_uid}&date_from=20240301&date_to=20240415")
    assert set(_result_studies(browser)) == {served.studies[5].study_uid, served.studies[6].study_uid}
    _search_results(browser, served, 0, "study=1.2.999")
    _wait(browser, lambda d: "No study here" in d.find_element(By.ID, "message").text, what="the unknown reference")


def test_upload_search_finds_the_same_image_first(served, browser):
    from pydicom.uid import generate_uid
    from selenium.webdriver.common.by import By

    target = served.studies[2]  # a one-image study: the upload, as a one-image study, has its very code
    copy = make_instance(images[4], study_uid=generate_uid(), series_uid=generate_uid(), patient_id="UPLOAD")
    path = served.tmp / "dropped.dcm"
    copy.save_as(path, enforce_file_format=True)
    _login(browser, served.base)
    _wait(browser, lambda d: d.find_element(By.ID, "who").text, what="the page")
    browser.find_element(By.ID, "file").send_keys(str(path))
    _wait(browser, lambda d: _settled(d) and len(_result_studies(d)) == 9, what="9 rows (the whole archive)")
    assert _result_studies(browser)[0] == target.study_uid
    assert "distance 0" in _rows(browser)[0].text
    assert _wait(browser, lambda d: _thumbnails_decoded(d, "#reference"), what="the upload's thumbnail") == [192]
    # a picture (PNG export) works too
    png = served.tmp / "dropped.png"
    shutil.copy(images[8], served.tmp / "x.jpeg")
    from PIL import Image

    Image.open(served.tmp / "x.jpeg").save(png)
    browser.find_element(By.ID, "file").send_keys(str(png))
    _wait(browser, lambda d: "dropped.png" in d.find_element(By.ID, "reference").text, what="the PNG search")
    _wait(browser, lambda d: _settled(d) and len(_result_studies(d)) == 9, what="9 rows")
    assert _result_studies(browser)[0] == served.studies[3].study_uid  # the CR made from that picture
    # which model read it, in words: here the only one, the chest radiographs'
    assert "CHEST" in browser.find_element(By.ID, "answered-by").text
    # A picture says nothing of its kind: the person who dropped it can say, and the search runs again.
    from selenium.webdriver.support.ui import Select

    kinds = Select(browser.find_element(By.ID, "kind"))
    assert [o.get_attribute("value") for o in kinds.options] == ["", "chest-xr"]
    browser.execute_script("document.getElementById('results').replaceChildren()")
    kinds.select_by_value("chest-xr")
    _wait(browser, lambda d: _settled(d) and len(_result_studies(d)) == 9, what="9 rows, read by the chosen model")
    assert _result_studies(browser)[0] == served.studies[3].study_uid
    # a file that is no image: the error, and no longer the previous file as "the reference"
    notes = served.tmp / "notes.txt"
    notes.write_text("not an image")
    browser.find_element(By.ID, "file").send_keys(str(notes))
    _wait(browser, lambda d: "error" in d.find_element(By.ID, "message").get_attribute("class"), what="the error")
    assert not browser.find_element(By.ID, "reference").is_displayed()
    assert not browser.find_element(By.ID, "results").is_displayed()


def test_send_to_a_node_and_keyboard_use(served, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    reference = served.studies[0]
    _login(browser, served.base)
    _search_results(browser, served, 8, f"study={reference.study_uid}")

    def press(*keys: str) -> None:  # typed where the focus is, as a person at the keyboard would
        ActionChains(browser).send_keys(*keys).perform()

    def focused(attribute: str) -> str:
        return browser.switch_to.active_element.get_attribute(attribute)

    browser.execute_script("document.activeElement.blur()")
    press("/")
    assert focused("id") == "ref"
    browser.execute_script("document.activeElement.blur()")  # out of the form: keys now move through the rows
    press(Keys.ARROW_DOWN)
    assert focused("data-study") == _result_studies(browser)[0]
    press("j")
    second = _result_studies(browser)[1]
    assert focused("data-study") == second
    press(Keys.ARROW_UP, Keys.ARROW_DOWN)
    assert focused("data-study") == second
    row = _rows(browser)[1]
    row.find_element(By.CSS_SELECTOR, "button.send").send_keys(Keys.ENTER)  # a button works from the keyboard too
    _wait(browser, lambda d: "sent" in row.find_element(By.CSS_SELECTOR, ".sent").text, what="the send's outcome")
    n_images = len(next(s for s in served.studies if s.study_uid == second).files)
    assert f"sent {n_images} image(s)" in row.find_element(By.CSS_SELECTOR, ".sent").text
    sent = set(next(s for s in served.studies if s.study_uid == second).sop_uids)
    wait_until(lambda: served.viewer.received() == sent, 30, what="storescp to have the study")


def test_reading_room_and_laptop_screenshots(served, browser, tmp_path):
    reference = served.studies[0]
    _login(browser, served.base)
    for width, height, name in ((1920, 1080, "reading-room"), (1366, 768, "laptop")):
        browser.set_window_size(width, height)
        _search_results(browser, served, 8, f"study={reference.study_uid}&k=10")
        _wait(browser, lambda d: _thumbnails_decoded(d, "#results"), what="thumbnails")
        browser.execute_script("window.scrollTo(0, 0)")
        # readable: nothing wider than the window (no sideways scrolling on a laptop)
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        shot = tmp_path / f"similar-cases-{name}.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if name == "reading-room" and os.environ.get("DRH_UPDATE_SCREENSHOT") == "1":
            shutil.copy(shot, DOCS_SCREENSHOT)
