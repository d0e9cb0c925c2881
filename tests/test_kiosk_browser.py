"""The kiosk's browser UI in a real Chromium (headless, Selenium), against a real `edge-shitu serve`.

The camera is Chromium's fake capture device playing a .y4m written from a drink test photo; the bundle is
the tiny ONNX bundle of conftest (random weights: the UI is under test, not accuracy). Covered: live
recognition before and after an enrolment made through the Enrol tab (chosen box, drawn box, undo), the
Gallery tab's thumbnails and deletion with confirmation (checked through the API too), Settings (save,
calibrate, errors in the status line), Photos, and the token for a non-loopback client (401/403/200 with
urllib, the UI taking ``#token=`` and asking for a token on 401).

Needs Chromium and chromedriver (Debian: ``chromium``, ``chromium-driver``; or $EDGE_SHITU_CHROMIUM and
$EDGE_SHITU_CHROMEDRIVER) and the kiosk extra. Screenshots go to the test's tmp dir and, when
$EDGE_SHITU_SCREENSHOTS names a folder, there too.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = os.environ.get("EDGE_SHITU_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("EDGE_SHITU_CHROMEDRIVER", "/usr/bin/chromedriver")
WAIT = 60  # seconds: the bound of every wait
LABEL = "红牛 Red Bull"
RELABEL = "可口可乐 Coca-Cola"
TOKEN = "kiosk-test-token-0123456789abcdef"

# ---------------------------------------------------------------- helpers


def _need_tools():
    pytest.importorskip("starlette", reason="starlette (the 'kiosk' extra) is not installed")
    pytest.importorskip("uvicorn", reason="uvicorn (the 'kiosk' extra) is not installed")
    pytest.importorskip("selenium", reason="selenium is not installed")
    for path, what in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromedriver")):
        if not (Path(path).is_file() and os.access(path, os.X_OK)):
            pytest.skip(f"no {what} at {path} (apt-get install chromium chromium-driver)")


def write_y4m(path: Path, photo: Path, frames: int = 4, size=(640, 480)) -> Path:
    """A YUV4MPEG2 (4:2:0, JPEG chroma siting) clip of ``frames`` identical frames of ``photo``, cropped to fill
    ``size``: a still scene, so every frame the browser sends shows the same objects."""
    from PIL import Image, ImageOps

    w, h = size
    with Image.open(photo) as im:
        img = ImageOps.fit(ImageOps.exif_transpose(im).convert("RGB"), size, Image.BICUBIC)
    ycc = np.asarray(img.convert("YCbCr"), dtype=np.float32)
    y = ycc[..., 0].round().astype(np.uint8)
    chroma = [ycc[..., c].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)).round().astype(np.uint8) for c in (1, 2)]
    frame = b"FRAME\n" + y.tobytes() + chroma[0].tobytes() + chroma[1].tobytes()
    path.write_bytes(f"YUV4MPEG2 W{w} H{h} F10:1 Ip A1:1 C420jpeg\n".encode() + frame * frames)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def non_loopback_ipv4() -> str:
    """This machine's IPv4 address on a non-loopback interface (a UDP connect sends nothing)."""
    tried = []
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 9))
            addr = s.getsockname()[0]
        tried.append(addr)
        if not addr.startswith("127.") and addr != "0.0.0.0":
            return addr
    except OSError as exc:
        tried.append(f"UDP probe failed: {exc}")
    try:
        addr = socket.gethostbyname(socket.gethostname())
        tried.append(addr)
        if not addr.startswith("127."):
            return addr
    except OSError as exc:
        tried.append(f"gethostbyname failed: {exc}")
    pytest.fail("this machine has no non-loopback IPv4 address, so the token of a non-loopback client cannot be "
                f"tested (tried: {', '.join(tried)}); give the test machine a network interface")


def http(url: str, *, method: str = "GET", token: str | None = None, body: bytes | None = None,
         content_type: str | None = None):
    """(status, decoded JSON or bytes) of one request, errors included."""
    req = urllib.request.Request(url, data=body, method=method)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=WAIT) as res:
            status, data, kind = res.status, res.read(), res.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        status, data, kind = exc.code, exc.read(), exc.headers.get("Content-Type", "")
    return status, (json.loads(data) if kind.startswith("application/json") else data)


class Server:
    """`python -m edge_shitu.cli serve ...` in a subprocess, waited for on /healthz."""

    def __init__(self, tmp: Path, name: str, bundle: Path, gallery: Path, *, host: str = "127.0.0.1",
                 probe_host: str = "127.0.0.1", extra=()):
        self.port = free_port()
        self.base = f"http://{probe_host}:{self.port}"
        self.log_path = tmp / f"{name}.log"
        cmd = [sys.executable, "-m", "edge_shitu.cli", "serve", "--bundle", str(bundle), "--gallery", str(gallery),
               "--host", host, "--port", str(self.port), "--threads", "1", *extra]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + WAIT
        while True:
            if self.proc.poll() is not None:
                self.stop()
                pytest.fail(f"`{' '.join(cmd)}` exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if http(self.base + "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the service did not answer /healthz within {WAIT} s:\n{self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def api(self, path: str, **kw):
        return http(self.base + path, **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        self.log.close()


def make_driver(y4m: Path, tmp: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-video-capture={y4m}", "--window-size=800,480", "--hide-scrollbars",
                "--autoplay-policy=no-user-gesture-required", "--no-first-run", "--disable-extensions",
                "--lang=en-US", f"--user-data-dir={tmp / 'chromium-profile'}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager (which would download one) is never run.
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=opts)
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    # --window-size is the window's, not the page's: make the page itself 800x480, the kiosk screen.
    inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    outer = driver.get_window_size()
    driver.set_window_size(outer["width"] + 800 - inner[0], outer["height"] + 480 - inner[1])
    return driver


class Shots:
    def __init__(self, driver, tmp: Path):
        self.driver = driver
        self.dir = tmp / "screenshots"
        self.dir.mkdir(exist_ok=True)
        self.copy_to = os.environ.get("EDGE_SHITU_SCREENSHOTS")

    def __call__(self, name: str) -> Path:
        path = self.dir / f"kiosk-{name}.png"
        assert self.driver.save_screenshot(str(path)), f"no screenshot {path}"
        if self.copy_to:
            Path(self.copy_to).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, Path(self.copy_to) / path.name)
        return path


def wait_for(driver, what: str, condition, timeout: float = WAIT):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d))
    except TimeoutException:
        status = driver.execute_script("return document.getElementById('status').textContent")
        pytest.fail(f"timed out after {timeout} s waiting for {what} (status line: {status!r})")


def by_css(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def el(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def text(driver, element_id: str) -> str:
    """An element's textContent (also when the layout clips it, where Selenium's .text is empty)."""
    return driver.execute_script("return document.getElementById(arguments[0]).textContent", element_id)


def live_labels(driver) -> list:
    return driver.execute_script(
        "return [...document.querySelectorAll('#live-results .result')].map(e => e.dataset.label)")


def status_line(driver) -> tuple:
    return tuple(driver.execute_script(
        "const s = document.getElementById('status'); return [s.className, s.textContent]"))


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def kiosk(tiny_bundle, test_images, tmp_path_factory):
    """(server, driver, shots, tmp): one service on 127.0.0.1 with an empty gallery, one browser."""
    _need_tools()
    tmp = tmp_path_factory.mktemp("kiosk")
    photo = next(p for p in test_images if p.suffix.lower() in (".jpg", ".jpeg"))
    y4m = write_y4m(tmp / "camera.y4m", photo)
    server = Server(tmp, "serve", tiny_bundle, tmp / "gallery.db")
    driver = None
    try:
        driver = make_driver(y4m, tmp)
        yield server, driver, Shots(driver, tmp), tmp
    finally:
        if driver is not None:
            driver.quit()
        server.stop()


# ---------------------------------------------------------------- tests


def test_live_enrol_gallery_settings_photos(kiosk, test_images, drink_dir):
    from selenium.webdriver.common.action_chains import ActionChains

    server, d, shot, tmp = kiosk
    d.get(server.base + "/")

    # Live, empty gallery: objects are found and all unknown.
    wait_for(d, "live results", lambda d: len(live_labels(d)) > 0)
    assert set(live_labels(d)) == {""}, live_labels(d)
    wait_for(d, "the fps counter", lambda d: "fps" in text(d, "live-fps") and "–" not in text(d, "live-fps"))
    assert d.execute_script("return document.documentElement.scrollHeight <= window.innerHeight"), "Live scrolls"

    # Enrol: freeze, take the best detected box, label it, save.
    el(d, "tab-enrol").click()
    wait_for(d, "the enrol preview", lambda d: d.execute_script(
        "return document.getElementById('enrol-video').videoWidth > 0"))
    el(d, "enrol-freeze").click()
    wait_for(d, "box choices of the frozen frame", lambda d: by_css(d, "#enrol-box-0"))
    by_css(d, "#enrol-box-0")[0].click()
    el(d, "enrol-label").send_keys(LABEL)
    shot("enrol")
    el(d, "enrol-save").click()
    wait_for(d, "the enrolment", lambda d: "Saved item #" in text(d, "enrol-status"))
    status, page = server.api("/api/items")
    assert status == 200 and page["total"] == 1 and page["items"][0]["label"] == LABEL, page
    item_id = page["items"][0]["id"]
    assert f"#{item_id}" in text(d, "enrol-status")

    # A box drawn by dragging, saved, then undone.
    canvas = el(d, "enrol-canvas")
    w, h = canvas.size["width"], canvas.size["height"]
    (ActionChains(d).move_to_element_with_offset(canvas, -w // 6, -h // 6).click_and_hold()
     .move_by_offset(w // 8, h // 8).move_by_offset(w // 8, h // 8).release().perform())
    wait_for(d, "the drawn box", lambda d: by_css(d, "#enrol-box-drawn.selected"))
    label = el(d, "enrol-label")
    label.clear()
    label.send_keys("drawn")
    el(d, "enrol-save").click()
    wait_for(d, "the second enrolment", lambda d: '"drawn"' in text(d, "enrol-status"))
    status, page = server.api("/api/items?label=drawn")
    assert status == 200 and page["total"] == 1, page
    drawn_id = page["items"][0]["id"]
    el(d, "enrol-undo").click()
    wait_for(d, "the undo", lambda d: f"Removed item #{drawn_id}" in text(d, "enrol-status"))
    status, page = server.api("/api/items")
    assert status == 200 and [it["id"] for it in page["items"]] == [item_id], page

    # Live: the enrolled object is recognised on the next frames.
    el(d, "tab-live").click()
    wait_for(d, f"{LABEL!r} among the live results", lambda d: LABEL in live_labels(d))
    shot("live")

    # Settings: a gallery the kiosk creates keeps int8 compact features, so matches are accepted by similarity:
    # the similarity slider (not the radius) is shown; the preview lists the last frame's candidates, accepted
    # or not by the slider's value before it is saved; save a threshold; calibrate answers or says why not.
    el(d, "tab-settings").click()
    _, settings = server.api("/api/settings")
    assert settings["mode"] == "similarity" and settings["compact"] == "int8", settings
    wait_for(d, "the settings", lambda d: text(d, "settings-sim-value") == f"{settings['min_similarity']:.3f}")
    assert el(d, "settings-sim").is_displayed() and not el(d, "settings-radius").is_displayed()
    assert "larger is stricter" in text(d, "page-settings")
    mine = f'#settings-preview .cand[data-label="{LABEL}"]'
    assert by_css(d, mine), text(d, "settings-preview")
    d.execute_script("const r = document.getElementById('settings-sim'); r.value = 1;"
                     "r.dispatchEvent(new Event('input'));")
    wait_for(d, "no candidate accepted at similarity 1", lambda d: not by_css(d, mine))
    assert "✗" in text(d, "settings-preview") and "✓" not in text(d, "settings-preview")
    d.execute_script("const r = document.getElementById('settings-sim'); r.value = 0.6;"
                     "r.dispatchEvent(new Event('input'));")
    wait_for(d, "the candidate accepted again", lambda d: by_css(d, mine))
    el(d, "settings-save").click()
    wait_for(d, "the saved settings", lambda d: server.api("/api/settings")[1]["min_similarity"] == 0.6)
    el(d, "calibrate-run").click()
    wait_for(d, "the calibration's answer", lambda d: not el(d, "calibrate-run").get_property("disabled")
             and (text(d, "calibrate-result").startswith("Minimum similarity") or status_line(d)[0] == "error"))
    # One item is too small a gallery to calibrate: the API's error is shown in the status line.
    assert status_line(d)[0] == "error" and "/api/calibrate: 400" in status_line(d)[1], status_line(d)

    # Photos: a picked file is recognised and drawn.
    el(d, "tab-photos").click()
    el(d, "photos-input").send_keys(str(test_images[1]))
    wait_for(d, "the photo's results", lambda d: by_css(d, "#photos-list .photo .result"))
    shot("photos")
    # ... and sent to the Enrol tab, with its boxes as choices.
    by_css(d, "#photos-list .photo .to-enrol")[0].click()
    wait_for(d, "the photo in the Enrol tab", lambda d: el(d, "enrol-canvas").is_displayed()
             and by_css(d, "#enrol-box-0.selected"))

    # Gallery: the item with its thumbnail; the filter; delete with confirmation.
    el(d, "tab-gallery").click()
    item_css = f'#gallery-grid .item[data-id="{item_id}"]'
    wait_for(d, "the item's thumbnail", lambda d: d.execute_script(
        "const i = document.querySelector(arguments[0] + ' img');"
        "return !!i && i.complete && i.naturalWidth > 0 && i.src.startsWith('blob:')", item_css))
    assert by_css(d, item_css)[0].get_attribute("data-label") == LABEL
    assert "1 item" in by_css(d, "#gallery-grid .group h3")[0].text
    shot("gallery")
    # Relabel (PATCH) to a CJK label through the prompt.
    by_css(d, item_css + " .relabel")[0].click()
    wait_for(d, "the relabel prompt", lambda d: el(d, "prompt-input").is_displayed())
    el(d, "prompt-input").clear()
    el(d, "prompt-input").send_keys(RELABEL)
    el(d, "prompt-ok").click()
    wait_for(d, "the new label", lambda d: by_css(d, f'{item_css}[data-label="{RELABEL}"]'))
    status, page = server.api("/api/items")
    assert status == 200 and page["items"][0]["label"] == RELABEL, page
    assert by_css(d, f'#gallery-grid .group[data-label="{RELABEL}"]'), text(d, "gallery-grid")
    el(d, "gallery-filter").send_keys("no such label")
    wait_for(d, "the filter", lambda d: not by_css(d, item_css))
    el(d, "gallery-filter").clear()
    d.execute_script("document.getElementById('gallery-filter').dispatchEvent(new Event('input'))")
    wait_for(d, "the unfiltered gallery", lambda d: by_css(d, item_css))
    by_css(d, item_css + " .delete")[0].click()
    wait_for(d, "the confirmation", lambda d: el(d, "confirm-yes").is_displayed())
    assert server.api("/api/items")[1]["total"] == 1, "deleted before the confirmation"
    el(d, "confirm-yes").click()
    wait_for(d, "the item to go", lambda d: not by_css(d, item_css))
    status, page = server.api("/api/items")
    assert status == 200 and page["total"] == 0, page
    assert server.api(f"/api/items/{item_id}/thumbnail")[0] == 404

    # Calibration on a gallery of two labels with three items each (enrolled through the API): the curve and
    # "Use this similarity".
    for folder, label in (("0", "cal-a"), ("1", "cal-b")):
        for photo in sorted((drink_dir / "gallery" / folder).glob("*.jpg"))[:3]:
            status, answer = server.api(f"/api/items?label={label}", method="POST", body=photo.read_bytes(),
                                        content_type="image/jpeg")
            assert status == 201 and answer["label"] == label, (status, answer)
    el(d, "tab-settings").click()
    el(d, "calibrate-run").click()
    wait_for(d, "the calibration", lambda d: text(d, "calibrate-result").startswith("Minimum similarity"))
    _, calibration = server.api("/api/calibrate", method="POST", body=b'{"precision": 0.95}',
                                content_type="application/json")
    assert calibration["metric"] == "similarity" and calibration["threshold"] is not None, calibration
    assert f"Minimum similarity {calibration['threshold']:.3f}" in text(d, "calibrate-result")
    assert text(d, "calibrate-use") == "Use this similarity"
    el(d, "calibrate-use").click()
    assert abs(float(el(d, "settings-sim").get_property("value")) - calibration["threshold"]) < 1e-9
    assert text(d, "settings-sim-value") == f"{calibration['threshold']:.3f}"
    shot("settings")

    # Nothing went wrong along the way that the status line showed, and no script error.
    assert status_line(d)[0] != "error", status_line(d)
    # No script error, and nothing the service's content security policy had to refuse.
    uncaught = [e["message"] for e in d.get_log("browser")
                if "Uncaught" in e["message"] or "Content Security Policy" in e["message"]]
    assert not uncaught, uncaught
    for name in ("live", "enrol", "gallery", "settings", "photos"):
        assert (shot.dir / f"kiosk-{name}.png").stat().st_size > 1000


def test_token_for_non_loopback_client(kiosk, tiny_bundle):
    _, d, shot, tmp = kiosk
    ip = non_loopback_ipv4()
    token_file = tmp / "token"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(TOKEN + "\n")
    # This gallery keeps codes only: the UI shows the acceptance radius instead of the similarity.
    server = Server(tmp, "serve-lan", tiny_bundle, tmp / "lan.db", host="0.0.0.0", probe_host=ip,
                    extra=("--token-file", str(token_file), "--compact", "none"))
    try:
        assert server.api("/healthz")[0] == 200
        status, answer = server.api("/api/items")
        assert status == 401 and "error" in answer, (status, answer)
        status, answer = server.api("/api/items", token="wrong-" + TOKEN)
        assert status == 403 and "error" in answer, (status, answer)
        status, answer = server.api("/api/items", token=TOKEN)
        assert status == 200 and answer["total"] == 0, (status, answer)
        status, answer = server.api("/api/info", token=TOKEN)
        assert status == 200 and answer["token_required"] is True, (status, answer)

        # The UI takes the token from the address once, keeps it, removes it from the address bar.
        d.get(f"{server.base}/#token={TOKEN}")
        wait_for(d, "the address without the token", lambda d: "token" not in d.current_url)
        assert d.execute_script("return sessionStorage.getItem('edge-shitu-token')") == TOKEN
        el(d, "tab-gallery").click()
        wait_for(d, "the gallery through the token", lambda d: "0 items" in text(d, "gallery-summary"))
        assert not el(d, "token-dialog").is_displayed()
        assert status_line(d)[0] != "error", status_line(d)
        status, settings = server.api("/api/settings", token=TOKEN)
        assert status == 200 and settings["mode"] == "distance", settings
        el(d, "tab-settings").click()
        wait_for(d, "the radius", lambda d: text(d, "settings-radius-value") == str(settings["max_distance"]))
        assert el(d, "settings-radius").is_displayed() and not el(d, "settings-sim").is_displayed()
        assert el(d, "settings-radius").get_attribute("max") == str(settings["bits"])
        assert "smaller is stricter" in text(d, "page-settings")
        d.execute_script("const r = document.getElementById('settings-radius'); r.value = 42;"
                         "r.dispatchEvent(new Event('input'));")
        el(d, "settings-save").click()
        wait_for(d, "the saved radius", lambda d: server.api("/api/settings", token=TOKEN)[1]["max_distance"] == 42)
        # Over plain http on a LAN address the browser gives no camera: the UI says so.
        el(d, "tab-live").click()
        wait_for(d, "the no-camera notice", lambda d: el(d, "live-nocamera").is_displayed())
        assert "Photos" in text(d, "live-nocamera")

        # Without a token the UI asks for one, and works with it.
        d.execute_script("sessionStorage.clear()")
        d.get(server.base + "/")
        wait_for(d, "the token prompt", lambda d: el(d, "token-dialog").is_displayed())
        assert "401" in status_line(d)[1], status_line(d)
        el(d, "token-input").send_keys(TOKEN)
        el(d, "token-save").click()
        el(d, "tab-gallery").click()
        wait_for(d, "the gallery after the prompt", lambda d: "0 items" in text(d, "gallery-summary"))
        assert not el(d, "token-dialog").is_displayed()
    finally:
        server.stop()
