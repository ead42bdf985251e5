"""The chat page in a real headless browser (Debian's chromium driven by Selenium): type a question,
watch the answer stream in, press stop; model and user text are shown as text, never as HTML."""
from __future__ import annotations

import shutil
import time

import pytest

from serveutil import Server

webdriver = pytest.importorskip("selenium.webdriver")


def chromium_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or shutil.which("chromium-driver")
    if not browser or not driver:
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium "
                    "chromium-driver; .ci/run does)")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service as DriverService

    path, driver = chromium_paths()
    opts = Options()
    opts.binary_location = path
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1100,800", "--no-first-run", "--disable-extensions"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=DriverService(executable_path=driver), options=opts)
    d.set_page_load_timeout(30)
    try:
        yield d
    finally:
        d.quit()


@pytest.fixture(scope="module")
def server():
    s = Server(1, "--parallel", "2")
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def wait_for(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_page_streams_and_stops(server, browser):
    from selenium.webdriver.common.by import By

    d = browser
    d.get(server.url + "/")
    wait_for(lambda: "SmolLM2" in d.find_element(By.ID, "model").text, 20, "the model name")
    d.find_element(By.CSS_SELECTOR, "#settings summary").click()
    for field, value in (("temperature", "0"), ("max-tokens", "450")):
        el = d.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)
    hostile = "<img src=x onerror=alert(1)><b>Tell me a very long story about a dragon.</b>"
    d.find_element(By.ID, "input").send_keys(hostile)
    d.find_element(By.ID, "send").click()
    user = wait_for(lambda: d.find_elements(By.CSS_SELECTOR, ".msg.user"), 10, "the user message")
    assert user[0].find_element(By.CSS_SELECTOR, ".text").text == hostile      # shown as text
    assert not d.find_elements(By.CSS_SELECTOR, "#log img, #log b")             # never parsed as HTML
    reply = d.find_element(By.CSS_SELECTOR, ".msg.assistant .text")
    wait_for(lambda: len(reply.text) > 20, 60, "streamed text")
    first = reply.text
    wait_for(lambda: len(reply.text) > len(first), 30, "more streamed text")   # it grows: streaming
    assert d.find_element(By.ID, "stop").is_enabled()
    d.find_element(By.ID, "stop").click()
    meta = wait_for(lambda: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta"), 10, "the reply's footer")
    assert "stopped" in meta[0].text, meta[0].text
    assert not d.find_element(By.ID, "stop").is_enabled()
    stopped_len = len(reply.text)
    wait_for(lambda: server.metrics()["mpillm_slots_busy"] == 0, 10, "the slot to be freed")
    time.sleep(0.5)
    assert len(reply.text) == stopped_len           # nothing arrives after stop
    assert "tok/s" in d.find_element(By.ID, "speed").text

    # a second turn (multi-turn: the history is sent along) that finishes by itself
    d.find_element(By.ID, "input").send_keys("Thanks. Now answer in one word: what color is the sky?")
    d.find_element(By.ID, "send").click()
    wait_for(lambda: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta")) == 2, 90, "the second reply")
    metas = d.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta")
    assert "tokens" in metas[1].text and "error" not in metas[1].text, metas[1].text
    assert d.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")[1].text.strip()
