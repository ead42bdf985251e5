"""Screenshot of the chat page (for the README): headless chromium holds a short conversation
with a running server, then saves a PNG.

  python scripts/serve_screenshot.py http://127.0.0.1:8080 docs/chat-page.png
"""
from __future__ import annotations

import shutil
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By


def main(url: str, out: str) -> None:
    opts = Options()
    opts.binary_location = shutil.which("chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,900", "--hide-scrollbars"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        d.get(url + "/")
        time.sleep(1)
        d.find_element(By.CSS_SELECTOR, "#settings summary").click()
        sys_el = d.find_element(By.ID, "system")
        sys_el.send_keys("You are a helpful assistant. Answer briefly.")
        t = d.find_element(By.ID, "temperature")
        t.clear()
        t.send_keys("0")
        for q in ("What is MPI, in two sentences?", "And what is tensor parallelism?"):
            d.find_element(By.ID, "input").send_keys(q)
            d.find_element(By.ID, "send").click()
            deadline = time.time() + 120
            while time.time() < deadline and not d.find_element(By.ID, "stop").get_attribute("disabled"):
                time.sleep(0.2)
            time.sleep(0.3)
        d.save_screenshot(out)
    finally:
        d.quit()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
