"""The playground page at / in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium) against the real server: live progress over POST /generate/stream, the image, its info, errors."""

import base64
import io
import shutil
import time

import pytest
from PIL import Image

from distillery.testing.launch import serve_subprocess

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATA_URL = "data:image/png;base64,"
WAIT_S = 120  # loading the page
GENERATE_WAIT_S = 300  # 25 steps took 55 s on a busy 2-core machine shared with other test runs


@pytest.fixture(scope="module")
def server_url():
    with serve_subprocess(ready_within_s=120) as url:
        yield url


def _binaries() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):  # fail, never skip: a skipped browser test would read as a pass
        missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if not path]
        pytest.fail(f"{' and '.join(missing)} not found on PATH: the playground test drives Debian's Chromium. "
                    f"Install the Debian packages `chromium chromium-driver` (`make tools` does it).")
    return chromium, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = _binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--disable-background-networking", "--disable-sync",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    logs = tmp_path_factory.mktemp("chromedriver")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SE_OFFLINE", "true")  # Selenium Manager (skipped anyway: both paths are given) never downloads
        driver = webdriver.Chrome(options=options,
                                  service=Service(executable_path=chromedriver, log_output=str(logs / "log.txt")))
        try:
            driver.set_page_load_timeout(WAIT_S)
            driver.set_script_timeout(WAIT_S)
            yield driver
        finally:
            driver.quit()


def _open(driver, url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{url}/")
    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.find_element(By.ID, "adapters").get_attribute("data-loaded") == "true"
        and d.find_element(By.ID, "width").get_attribute("value") != "")


def _fill(driver, field: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    el = driver.find_element(By.ID, field)
    el.clear()
    el.send_keys(text)


def _generate(driver) -> str:
    """Press Generate and wait until the page has an outcome; the state the progress element ended in."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.ID, "generate").click()
    WebDriverWait(driver, GENERATE_WAIT_S).until(
        lambda d: d.find_element(By.ID, "progress").get_attribute("data-state") in ("done", "error"))
    return driver.find_element(By.ID, "progress").get_attribute("data-state")


def _image(driver) -> Image.Image:
    from selenium.webdriver.common.by import By

    src = driver.find_element(By.ID, "image").get_attribute("src")
    assert src.startswith(DATA_URL), src[:80]
    png = base64.b64decode(src[len(DATA_URL):])
    assert png[:8] == PNG_MAGIC
    return Image.open(io.BytesIO(png)).convert("RGB")


def _info(driver) -> dict[str, str]:
    from selenium.webdriver.common.by import By

    return {row.get_attribute("data-key"): row.find_element(By.TAG_NAME, "td").get_attribute("data-value")
            for row in driver.find_elements(By.CSS_SELECTOR, "#info tr")}


def _error_text(driver) -> str:
    from selenium.webdriver.common.by import By

    el = driver.find_element(By.ID, "error")
    return el.text if el.is_displayed() else ""


def test_prompt_to_image_with_live_progress(server_url, browser, tmp_path):
    from selenium.webdriver.common.by import By

    from distillery.distill.toy.oracle import load_oracle

    driver = browser
    _open(driver, server_url)
    assert driver.find_element(By.ID, "width").get_attribute("value") == "32"  # GET /model's native size
    assert driver.find_elements(By.CSS_SELECTOR, "#adapters input[type=checkbox][data-name='lcm-toy']")
    assert driver.find_element(By.CSS_SELECTOR, "a[href='docs']")
    _fill(driver, "prompt", "a red circle")
    _fill(driver, "seed", "1")  # a seed for which the toy draws it right (the oracle says so)
    started = time.monotonic()
    state = _generate(driver)
    assert state == "done", _error_text(driver)
    elapsed = time.monotonic() - started

    progress = driver.find_element(By.ID, "progress")
    # every step of the 25 (the model's default) came as its own event, and over more than one network read:
    # the progress was live, not delivered in one piece with the image
    assert progress.get_attribute("data-steps-seen") == "25"
    assert int(progress.get_attribute("data-progress-reads")) > 1
    assert "step 25 of 25" in driver.find_element(By.ID, "progress-text").text

    image = _image(driver)
    assert image.size == (32, 32)
    assert load_oracle().classify([image]) == [("red", "circle")]
    info = _info(driver)
    assert (info["seed"], info["mode"], info["steps"], info["UNet evaluations"], info["adapters"]) == \
        ("1", "cfg", "25", "50", "none")
    assert info["scheduler"] == "ddim" and info["total"].endswith(" ms") and info["peak memory"].endswith(")")
    assert _error_text(driver) == ""

    # no request left the server: the page is self-contained
    urls = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(server_url) for u in urls), urls

    driver.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "playground.png"
    assert driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 1000 and shot.read_bytes()[:8] == PNG_MAGIC
    print(f"generated in {elapsed:.1f} s; screenshot: {shot}")


def test_adapter_checkbox_and_random_seed(server_url, browser, tmp_path):
    """The 4-step consistency adapter ticked: 4 progress events, single-eval; an empty seed is picked by the
    server, shown, and 'use' puts it in the seed field."""
    from selenium.webdriver.common.by import By

    from distillery.distill.toy.oracle import load_oracle

    driver = browser
    _open(driver, server_url)
    driver.find_element(By.ID, "adapter-lcm-toy").click()
    assert driver.find_element(By.ID, "weight-lcm-toy").is_enabled()
    from selenium.webdriver.support.ui import WebDriverWait  # the placeholder is the server's plan: asked on change

    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "steps").get_attribute("placeholder") == "default 4")
    assert driver.find_element(By.ID, "scheduler-default").text == "default lcm"
    _fill(driver, "prompt", "a red circle")
    _fill(driver, "seed", "1")
    assert _generate(driver) == "done", _error_text(driver)
    assert driver.find_element(By.ID, "progress").get_attribute("data-steps-seen") == "4"
    info = _info(driver)
    assert (info["mode"], info["steps"], info["scheduler"], info["UNet evaluations"], info["adapters"]) == \
        ("single-eval", "4", "lcm", "4", "lcm-toy × 1")
    assert load_oracle().classify([_image(driver)]) == [("red", "circle")]
    driver.save_screenshot(str(tmp_path / "playground-lcm.png"))

    driver.find_element(By.ID, "seed").clear()
    assert _generate(driver) == "done", _error_text(driver)
    seed = _info(driver)["seed"]
    assert seed.isdigit()
    driver.find_element(By.CSS_SELECTOR, "#info tr[data-key='seed'] button").click()
    assert driver.find_element(By.ID, "seed").get_attribute("value") == seed


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("steps", "0", ["steps", "[1, 1000]"]),
    ("width", "4000", ["width: 4000 is not allowed", "multiple of 8"]),
])
def test_bad_input_shows_the_servers_message(server_url, browser, field, value, expected, tmp_path):
    from selenium.webdriver.common.by import By

    driver = browser
    _open(driver, server_url)
    _fill(driver, "prompt", "a blue square")
    _fill(driver, field, value)
    assert _generate(driver) == "error"
    text = _error_text(driver)
    assert "422" in text and all(part in text for part in expected), text
    assert not driver.find_element(By.ID, "image").is_displayed()
    driver.execute_script("window.scrollTo(0, 0)")
    assert driver.save_screenshot(str(tmp_path / "playground-error.png"))
