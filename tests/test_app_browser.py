"""End to end: ``python -m autoseg.app`` serves the page, headless Chromium drives it like a person.

Uploads a bundled sample, runs it, checks the names, the overlay and the downloads, hovers and clicks a name, removes
it and adds one (re-segmenting without recaptioning), uploads a non-image, and saves a screenshot (also copied to
``$AUTOSEG_SCREENSHOT`` when set). Uploads a ShapesWorld clip, checks that the browser decodes its overlay video, and
uploads a broken clip. Needs Debian's ``chromium`` and ``chromium-driver`` (browser downloads are impossible here);
skipped only when they cannot be found.
"""

import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "samples" / "shapes" / "images" / "000002.png"
START_TIMEOUT = 240  # s: imports and model loading on a busy 2-core machine
STEP_TIMEOUT = 120  # s: one page action (a run of the demo takes ~2 s on a free core)


def find_chromium() -> tuple[str, str] | None:
    """``(browser, driver)`` paths: $AUTOSEG_CHROMIUM / $AUTOSEG_CHROMEDRIVER, else Debian's packages on PATH."""
    browser = os.environ.get("AUTOSEG_CHROMIUM") or next(
        (p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None
    )
    driver = os.environ.get("AUTOSEG_CHROMEDRIVER") or shutil.which("chromedriver")
    if driver is None and Path("/usr/bin/chromedriver").exists():
        driver = "/usr/bin/chromedriver"
    return (browser, driver) if browser and driver else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """The real command on 127.0.0.1 and a free port; yields its URL; stopped (SIGTERM, then kill) at the end."""
    pytest.importorskip("gradio", reason="the page needs the app extra: pip install -e '.[app]'")
    port = free_port()
    (tmp_path / "tmp").mkdir()
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        GRADIO_ANALYTICS_ENABLED="False",
        GRADIO_TEMP_DIR=str(tmp_path / "gradio"),  # the server writes only under tmp_path
        TMPDIR=str(tmp_path / "tmp"),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    cmd = [sys.executable, "-m", "autoseg.app", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    log: list[str] = []

    def read():
        for line in proc.stdout:
            log.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    url = None
    try:
        while url is None:
            try:
                line = lines.get(timeout=START_TIMEOUT)
            except queue.Empty:
                pytest.fail(f"no URL printed within {START_TIMEOUT} s:\n{''.join(log)[-3000:]}")
            if line is None:
                pytest.fail(f"the server exited ({proc.wait()}) before printing its URL:\n{''.join(log)[-3000:]}")
            if line.startswith("AutoSeg demo page: "):
                url = line.split()[3]
        assert url == f"http://127.0.0.1:{port}/"
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in "".join(log), "".join(log)[-3000:]


@pytest.fixture
def browser():
    found = find_chromium()
    if found is None:
        pytest.skip("no Chromium found: apt-get install -y chromium chromium-driver (or set AUTOSEG_CHROMIUM/_DRIVER)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the app extra")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1600"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=found[1]), options=options)
    yield driver
    driver.quit()


def test_page_segments_a_sample_edits_names_and_reports_bad_input(browser, server, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    wait = WebDriverWait(d, STEP_TIMEOUT, ignored_exceptions=(StaleElementReferenceException,))

    def css(selector):
        return d.find_elements(By.CSS_SELECTOR, selector)

    def status():
        boxes = css("#status textarea")
        return boxes[0].get_attribute("value") if boxes else ""

    def wait_status(prefix, containing=""):
        wait.until(
            lambda _: status().startswith(prefix) and containing in status(),
            f"the status never started with {prefix!r} (containing {containing!r})",
        )
        return status()

    def legend():
        return [e.text for e in css("#segmentation .legend-item")]

    def table_names():
        cells = [e.get_attribute("textContent").strip() for e in css("#names [role=gridcell][data-col='0']")]
        return [c for c in cells if c and c != "(unlabelled)"]

    d.get(server)
    wait.until(lambda _: css("#upload input[type=file]"), "the upload box never appeared")
    wait_status("Upload an image or pick a sample first.")
    # everything the page loads comes from the server itself: no fonts or scripts from the internet
    resources = d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and [r for r in resources if not r.startswith(server)] == []

    # upload a sample and segment it
    css("#upload input[type=file]")[0].send_keys(str(SAMPLE))
    wait_status("000002.png: 128 x 128 px")
    css("#run")[0].click()
    found = wait_status("000002.png: ", containing="names")
    wait.until(lambda _: legend() and table_names(), "no names shown")
    names = table_names()  # the names that label pixels, as the status lists them
    assert f"{', '.join(names)}" in found
    shown = legend()
    assert shown == [n for n in names if n in shown]  # the legend: the names that label pixels, in the same order
    masks = css("#segmentation img.mask")
    assert len(masks) == len(legend())
    base = css("#segmentation img.base-image")[0]
    wait.until(lambda _: d.execute_script("return arguments[0].naturalWidth", base) > 0, "the overlay never loaded")
    wait.until(lambda _: len(css("#cluster-table [role=gridcell][data-col='0']")) > 1, "no cluster table")
    assert css("#clusters .legend-item") and css("#clusters img.mask")
    downloads = css("#downloads")[0].text
    assert "000002" in downloads and ".png" in downloads and ".json" in downloads and ".jpg" in downloads

    # hovering a name highlights its mask; clicking it chooses it for editing
    target = css("#segmentation .legend-item")[0]
    victim = target.text
    ActionChains(d).move_to_element(target).perform()
    wait.until(lambda _: len(css("#segmentation img.mask.active")) == 1, "hovering a name highlighted no mask")
    target.click()
    wait.until(lambda _: css("#name input")[0].get_attribute("value") == victim, "clicking a name did not choose it")
    wait.until(lambda _: css("#selected img"), "the selected name's view never appeared")

    # remove it: re-segmented without recaptioning
    css("#remove")[0].click()
    wait_status(f"Removed '{victim}'; re-segmented without recaptioning")
    wait.until(lambda _: victim not in table_names() and victim not in legend(), f"'{victim}' is still shown")
    # every other name keeps its pixels (a name's logits do not depend on the others), and the removed name's pixels
    # go to the remaining names, possibly to one that had none before (listed after "no pixels:" in the status)
    unshown = found.split("no pixels: ")[1].split(")")[0].split(", ") if "no pixels: " in found else []
    after = table_names()
    assert [n for n in after if n in names] == [n for n in names if n != victim]
    assert set(after) - set(names) <= set(unshown)

    # add a name of one's own
    css("#new-name textarea, #new-name input")[0].send_keys("pebble")
    css("#add")[0].click()
    added = wait_status("Added 'pebble'")
    if "no pixels:" in added and "pebble" in added.split("no pixels:")[1]:
        assert "pebble" not in table_names()  # it lost every pixel to the other names: not in the legend either
    else:
        wait.until(lambda _: table_names() and table_names()[-1] == "pebble", "the added name is not listed")

    # the screenshot shows the edited result with one name selected
    d.set_window_size(1400, 1900)
    css("#segmentation .legend-item")[0].click()
    wait.until(lambda _: css("#selected img"), "the selected name's view never appeared")
    shot = tmp_path / "autoseg_app.png"
    d.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("AUTOSEG_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["AUTOSEG_SCREENSHOT"])

    # a non-image upload gets a clear message, and the page goes on working
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    css("#upload button[aria-label='Clear']")[0].click()
    wait.until(lambda _: css("#upload input[type=file]"), "the upload box did not clear")
    css("#upload input[type=file]")[0].send_keys(str(bad))
    message = wait_status("Cannot use this file: notes.txt: not a readable image")
    assert str(tmp_path) not in message
    wait.until(lambda _: not legend() and not table_names(), "the previous image's result is still shown")
    css("#run")[0].click()
    wait_status("Upload an image or pick a sample first.")
    css("#samples img")[0].click()  # a bundled sample, picked in the gallery
    wait_status("000000.png: 128 x 128 px")
    wait.until(lambda _: "notes.txt" not in css("#upload")[0].text, "the refused file is still in the upload box")


def test_page_plays_a_clips_overlay_and_refuses_a_bad_clip(browser, server, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from autoseg.data.shapes_scene import ShapesConfig
    from autoseg.data.shapes_video import write_video_dataset

    frames = 6
    clip = write_video_dataset(tmp_path / "sv", 1, 31, frames, ShapesConfig(size=64), progress=False)
    clip = clip / "videos" / "clip_000000.mp4"
    d = browser
    wait = WebDriverWait(d, STEP_TIMEOUT, ignored_exceptions=(StaleElementReferenceException,))

    def css(selector):
        return d.find_elements(By.CSS_SELECTOR, selector)

    def status():
        boxes = css("#clip-status textarea")
        return boxes[0].get_attribute("value") if boxes else ""

    def wait_status(prefix, containing=""):
        wait.until(lambda _: status().startswith(prefix) and containing in status(), f"no clip status {prefix!r}")
        return status()

    d.get(server)
    wait.until(lambda _: css("#clip-upload input[type=file]"), "the clip upload box never appeared")
    css("#clip-upload input[type=file]")[0].send_keys(str(clip))
    wait_status("clip_000000.mp4: 64 x 64 px at 10 fps")
    css("#run-clip")[0].click()
    done = wait_status("clip_000000.mp4: ", containing=f"{frames} frames segmented")
    names = done.split("names: ")[1].split(";")[0].split(", ")
    # the browser decodes the overlay: metadata and a first frame (readyState >= 2), 64 px wide, 6 frames at 10 fps
    wait.until(lambda _: css("#clip-video video"), "no overlay video shown")
    video = css("#clip-video video")[0]
    state = "return [arguments[0].readyState, arguments[0].videoWidth, arguments[0].duration, arguments[0].error]"
    wait.until(lambda _: d.execute_script(state, video)[0] >= 2, "the browser never decoded the overlay video")
    ready, width, duration, error = d.execute_script(state, video)
    assert error is None and width == 64 and abs(duration - frames / 10) < 0.11
    legend = css("#clip-legend")[0].text
    assert all(n in legend for n in names)
    if os.environ.get("AUTOSEG_SCREENSHOT"):  # the clip section, beside the image page's screenshot
        d.set_window_size(1400, 2600)
        shot = os.environ["AUTOSEG_SCREENSHOT"]
        d.save_screenshot(os.path.splitext(shot)[0] + "_clip.png")

    # a file that is no video: a clear message, and the clip's results go
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00" * 64)
    css("#clip-upload button[aria-label='Clear']")[0].click()
    wait_status("Upload a short clip first.")
    wait.until(lambda _: css("#clip-upload input[type=file]"), "the clip upload box did not clear")
    css("#clip-upload input[type=file]")[0].send_keys(str(bad))
    message = wait_status("Cannot use this clip: ", containing="broken.mp4")
    assert str(tmp_path) not in message
    wait.until(lambda _: not css("#clip-video video"), "the earlier overlay is still shown")
