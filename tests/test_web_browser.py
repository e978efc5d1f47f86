"""The web page in Debian's Chromium through Selenium (design.md §10): login, study list, viewer with the overlay
toggled (canvas pixels change), a role switch, window/level drag, slice scroll, a download; and the refusals: no
session, a forged CSRF token, `../` in a download path. The app is served by waitress on 127.0.0.1 in a thread."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.test_web import PATIENT_ID, PATIENT_SHOWN, Node, make_app, new_user, web_node

__all__ = ["web_node"]  # the session fixture, shared with tests/test_web.py

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 30
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--window-size=1280,1100")
# Pixels where red exceeds green: only the overlay paints them (the image itself is grey).
RED_PIXELS_JS = """
const data = document.getElementById('canvas').getContext('2d').getImageData(0, 0, arguments[0], arguments[1]).data;
let red = 0, sum = 0;
for (let i = 0; i < data.length; i += 4) { if (data[i] > data[i + 1] + 10) { red += 1; } sum += data[i + 1]; }
return [red, sum];
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip(f"Debian chromium and chromium-driver are needed ({CHROMIUM}, {CHROMEDRIVER} missing)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def site(web_node: Node):
    """The app on a free loopback port, served by waitress in a thread."""
    from waitress.server import create_server

    server = create_server(make_app(web_node), host="127.0.0.1", port=0, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.effective_port}"
    server.close()
    thread.join(timeout=5)


def _wait(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(condition, message)


def _rendered(driver, *parts: str):
    """Wait until the canvas says it drew what `parts` name (role, slice, overlay state...)."""
    from selenium.webdriver.common.by import By

    def drawn(_driver):
        value = driver.find_element(By.ID, "canvas").get_attribute("data-rendered") or ""
        return value if all(part in value.split(":") for part in parts) else False

    return _wait(driver, drawn, f"canvas never rendered {parts}")


def _log_in(driver, site: str, name: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    driver.get(f"{site}/studies")
    _wait(driver, ec.url_contains("/login?next="), "no redirect to the login page")
    driver.find_element(By.ID, "username").send_keys(name)
    driver.find_element(By.ID, "password").send_keys("correct horse battery staple")
    driver.find_element(By.ID, "login").click()
    _wait(driver, ec.url_to_be(f"{site}/studies"), "login did not land on the study list")


def test_refusals_without_a_session(browser, site: str, web_node: Node) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    browser.delete_all_cookies()
    browser.get(f"{site}/studies/{web_node.study_uid}/stroke/mask.nii.gz")
    _wait(browser, ec.url_contains("/login?next="), "a download without a session was not sent to login")
    browser.get(f"{site}/api/studies")
    assert "login required" in browser.find_element(By.TAG_NAME, "body").text
    assert not list(browser.downloads.iterdir())


def test_login_study_list_viewer_overlay_and_download(browser, site: str, web_node: Node) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    _log_in(browser, site, new_user(web_node))
    table = browser.find_element(By.ID, "studies").text
    assert PATIENT_SHOWN in table and PATIENT_ID in table and "stroke" in table
    assert "DEMO MODEL – NOT FOR CLINICAL USE" in browser.find_element(By.ID, "demo-banner").text

    browser.find_element(By.CSS_SELECTOR, f'tr[data-study-uid="{web_node.study_uid}"] a').click()
    first = _rendered(browser, "dwi", "overlay")
    canvas = browser.find_element(By.ID, "canvas")
    size = (int(canvas.get_attribute("width")), int(canvas.get_attribute("height")))
    red_on, _ = browser.execute_script(RED_PIXELS_JS, *size)
    assert red_on > 0, "the overlay painted no pixel"
    browser.find_element(By.ID, "overlay-toggle").click()
    _rendered(browser, "dwi", "plain")
    red_off, grey_sum = browser.execute_script(RED_PIXELS_JS, *size)
    assert red_off == 0 and grey_sum > 0
    browser.find_element(By.ID, "overlay-toggle").click()
    _rendered(browser, "dwi", "overlay")
    assert browser.execute_script(RED_PIXELS_JS, *size)[0] == red_on

    slice_index = first.split(":")[1]
    ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(canvas), 0, 120).perform()
    _wait(browser, lambda d: canvas.get_attribute("data-rendered").split(":")[1] != slice_index, "no slice scroll")
    window = canvas.get_attribute("data-rendered").split(":")[4:]
    ActionChains(browser).click_and_hold(canvas).move_by_offset(60, -40).release().perform()
    _wait(browser, lambda d: canvas.get_attribute("data-rendered").split(":")[4:] != window, "window/level unchanged")

    for role in ("adc", "flair", "dwi"):
        browser.find_element(By.ID, f"role-{role}").click()
        _rendered(browser, role, "overlay")

    browser.find_element(By.CSS_SELECTOR, 'a.download[href$="/stroke/mask.nii.gz"]').click()
    target = browser.downloads / "stroke-mask.nii.gz"
    _wait(browser, lambda d: target.exists() and target.stat().st_size > 0, "the mask download never arrived")
    assert target.read_bytes()[:2] == b"\x1f\x8b"


# Each edge letter's box centre relative to the canvas (0..1 across, 0..1 down), and the canvas' own size.
EDGE_BOXES_JS = """
const canvas = document.getElementById('canvas').getBoundingClientRect();
const boxes = {};
for (const edge of ['top', 'right', 'bottom', 'left']) {
  const box = document.getElementById('edge-' + edge).getBoundingClientRect();
  boxes[edge] = [(box.left + box.width / 2 - canvas.left) / canvas.width,
                 (box.top + box.height / 2 - canvas.top) / canvas.height];
}
return boxes;
"""
FETCH_JSON_JS = "fetch(arguments[0]).then(r => r.json()).then(arguments[arguments.length - 1]);"
EDGE_POSITIONS = {"top": (0.5, 0.0), "right": (1.0, 0.5), "bottom": (0.5, 1.0), "left": (0.0, 0.5)}


def test_viewer_shows_the_patient_directions_on_the_four_edges(browser, site: str, web_node: Node) -> None:
    """The synthetic study's series are axial with rows running to the patient's right and columns anterior
    (ImageOrientationPatient -1 0 0 0 -1 0); the viewer shows slices as stored, as a PACS does, so L sits on the
    left edge and P on top. Each volume's letters come from the server and are drawn at the middle of each edge."""
    import pydicom
    from selenium.webdriver.common.by import By

    orientations = {tuple(float(v) for v in pydicom.dcmread(path, stop_before_pixels=True).ImageOrientationPatient)
                    for path in web_node.studies.study_files(web_node.study_uid)}
    assert orientations == {(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0)}
    as_stored = {"left": "L", "right": "R", "top": "P", "bottom": "A"}

    browser.delete_all_cookies()
    _log_in(browser, site, new_user(web_node))
    browser.get(f"{site}/studies/{web_node.study_uid}")
    volumes = browser.execute_async_script(FETCH_JSON_JS, f"/api/studies/{web_node.study_uid}/volumes")["volumes"]
    for role in ("dwi", "adc", "flair"):
        assert volumes[role]["edge_letters"] == as_stored, role
        browser.find_element(By.ID, f"role-{role}").click()
        _rendered(browser, role)
        shown = {edge: browser.find_element(By.ID, f"edge-{edge}").text for edge in EDGE_POSITIONS}
        assert shown == as_stored, role
        for edge, (x, y) in browser.execute_script(EDGE_BOXES_JS).items():
            expected_x, expected_y = EDGE_POSITIONS[edge]
            assert abs(x - expected_x) < 0.1 and abs(y - expected_y) < 0.1, (role, edge, x, y)


def test_forged_csrf_token_and_dot_dot_download_are_refused(browser, site: str, web_node: Node) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    browser.delete_all_cookies()
    _log_in(browser, site, new_user(web_node))
    jobs_before = len(web_node.jobs.jobs_for_study(web_node.study_uid))
    browser.get(f"{site}/studies/{web_node.study_uid}")
    browser.execute_script("document.querySelector('form.reprocess input[name=csrf_token]').value = 'forged';")
    browser.find_element(By.ID, "reprocess").click()
    _wait(browser, ec.text_to_be_present_in_element((By.TAG_NAME, "body"), "400 Bad Request"), "forged CSRF passed")
    assert len(web_node.jobs.jobs_for_study(web_node.study_uid)) == jobs_before

    for path in (f"/studies/{web_node.study_uid}/stroke/..%2F..%2F..%2Fusers.sqlite3",
                 f"/studies/{web_node.study_uid}/..%2F..%2Fweb-secret.key/mask.nii.gz"):
        browser.get(site + path)
        body = browser.find_element(By.TAG_NAME, "body").text
        assert body.startswith(("404", "400")) and "SQLite" not in body
    assert not [p for p in browser.downloads.iterdir() if "users" in p.name or "secret" in p.name]
