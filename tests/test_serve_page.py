"""The chat page in a real headless browser (Debian's chromium driven by Selenium): type a question,
watch the answer stream in, press stop; model and user text are shown as text, never as HTML.
A harmony model's reasoning is shown in a collapsible box apart from the answer, open while it
streams and closed when the answer starts (the model of
tests/harmony_fixture.py, served here); a model without reasoning shows no such box."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

import harmony_fixture as HF
from mpiutil import ROOT, mpi_env
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
def browser(tmp_path_factory):
    import os

    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service as DriverService

    path, driver = chromium_paths()
    # chromium leaves a directory (its singleton socket) in TMPDIR on every start: pytest's, not /tmp
    tmp = tmp_path_factory.mktemp("chromium")
    opts = Options()
    opts.binary_location = path
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1100,800", "--no-first-run", "--disable-extensions"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=DriverService(executable_path=driver, env=dict(os.environ, TMPDIR=str(tmp))),
                         options=opts)
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


# -- reasoning ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def harmony_server(tmp_path_factory):
    """The tiny harmony model (an analysis message, then a final one) converted and served at 1 rank."""
    src = HF.write(tmp_path_factory.mktemp("harmony_src"))
    out = tmp_path_factory.mktemp("harmony_model") / "m"
    r = subprocess.run([sys.executable, "-m", "convert", str(src), str(out), "--world-size", "1", "--no-progress"],
                       cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s = Server(1, "--model", str(out))
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def api_reply(server, question: str, max_tokens: int) -> tuple[dict, int]:
    """The model's own greedy reply to the page's request (no system prompt, one user message),
    non-stream through the API, and its completion tokens: the page is checked against them."""
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": question}],
                                            "temperature": 0, "max_tokens": max_tokens}, timeout=120)
    return r["choices"][0]["message"], r["usage"]["completion_tokens"]


def ask_on_page(d, server, question: str, max_tokens: int, timeout: float = 120, before_send: str = "",
                schema: str = ""):
    """Open the page, set greedy decoding, send ``question`` and wait for the reply to finish;
    returns the assistant message's element. ``before_send``: a script run in the page just before;
    ``schema``: the "JSON schema or tools" setting (cleared when empty)."""
    from selenium.webdriver.common.by import By

    d.get(server.url + "/")
    wait_for(lambda: d.find_element(By.ID, "model").text not in ("", "connecting…")
             and "not connected" not in d.find_element(By.ID, "model").text, 20, "the model name")
    d.find_element(By.CSS_SELECTOR, "#settings summary").click()
    d.find_element(By.ID, "system").clear()
    d.find_element(By.ID, "schema").clear()
    if schema:
        d.execute_script("document.getElementById('schema').value = arguments[0];", schema)
    for field, value in (("temperature", "0"), ("max-tokens", str(max_tokens))):
        el = d.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)
    d.find_element(By.ID, "input").send_keys(question)
    if before_send:
        d.execute_script(before_send)
    d.find_element(By.ID, "send").click()
    meta = wait_for(lambda: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta"), timeout, "the reply's footer")
    assert "tokens" in meta[0].text and "error" not in meta[0].text, meta[0].text
    replies = d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
    assert len(replies) == 1
    return replies[0]


def visible(d, el) -> bool:
    """Rendered (layout boxes, not hidden by a closed <details>), asked of the browser itself."""
    return bool(d.execute_script("return arguments[0].checkVisibility() && arguments[0].getClientRects().length > 0;",
                                 el)) and el.is_displayed()


@pytest.mark.timeout(600)
def test_page_shows_reasoning_in_a_collapsible_box_apart_from_the_answer(harmony_server, browser):
    from selenium.webdriver.common.by import By

    d, question = browser, "Capital of France?"
    msg, n_tokens = api_reply(harmony_server, question, 40)
    reasoning, answer = msg.get("reasoning_content"), msg["content"]
    # the model's two channels, both non-empty and distinct, free of harmony's special tokens
    assert reasoning and answer and reasoning not in answer and answer not in reasoning, msg
    assert (reasoning, answer) == (HF.EXPECTED_REASONING, HF.EXPECTED_FINAL), msg
    # what the page did while the reply streamed, in order (the records of one read of the stream
    # come in one batch, so the states are read off the records, not off the page at callback time):
    # "r" reasoning text added, "a" answer text added, "close"/"open" the box's open attribute removed/set
    watch = """window.__events = [];
      new MutationObserver(records => {
        for (const rec of records) {
          const t = rec.target;
          if (rec.type === "attributes" && rec.attributeName === "open" && t.matches("details.reasoning"))
            window.__events.push(rec.oldValue === null ? "open" : "close");   // was absent / was set
          else if (rec.type === "childList" && t.closest && t.closest("details.reasoning") && t.matches("span"))
            window.__events.push("r");
          else if (rec.type === "childList" && t.matches && t.matches(".msg.assistant .text") && rec.addedNodes.length)
            window.__events.push("a");
        }
      }).observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true,
                                 attributeOldValue: true});"""
    out = ask_on_page(d, harmony_server, question, 40, before_send=watch)
    ev = d.execute_script("return window.__events;") or []
    # the box came in open (no "open" event needed: it was created so), its reasoning streamed, then
    # it closed itself, once, just before the first piece of the answer
    assert "r" in ev and "a" in ev and ev.count("close") == 1 and "open" not in ev, ev
    assert ev.index("close") > max(i for i, e in enumerate(ev) if e == "r"), ev
    assert ev.index("close") < ev.index("a"), ev

    boxes = out.find_elements(By.CSS_SELECTOR, "details.reasoning")
    assert len(boxes) == 1, out.get_attribute("outerHTML")
    box = boxes[0]
    summary = box.find_element(By.CSS_SELECTOR, ":scope > summary")
    body = box.find_element(By.CSS_SELECTOR, ":scope > :not(summary)")
    assert body.get_attribute("textContent") == reasoning                  # the streamed deltas, joined
    bubble = out.find_element(By.CSS_SELECTOR, ".text")
    assert bubble.text == answer and reasoning not in bubble.text          # the answer alone
    # the footer counts every generated token, the reasoning's too
    assert f"{n_tokens} tokens" in out.find_element(By.CSS_SELECTOR, ".meta").text
    assert not box.find_elements(By.CSS_SELECTOR, ".text")                 # the box is not in the bubble,
    assert not bubble.find_elements(By.CSS_SELECTOR, "details")            # nor the bubble in the box
    whole = out.get_attribute("textContent")
    for tok in ("<|channel|>", "<|message|>", "<|start|>", "<|end|>", "<|return|>", "<|", "analysis", "final"):
        assert tok not in whole, (tok, whole)

    # collapsible: closed at first (the reasoning hidden), a click shows it, another hides it again
    assert box.get_attribute("open") is None and not visible(d, body)
    summary.click()
    wait_for(lambda: visible(d, body), 5, "the reasoning to show")
    assert box.get_attribute("open") is not None and body.text == reasoning
    summary.click()
    wait_for(lambda: not visible(d, body), 5, "the reasoning to hide")
    assert box.get_attribute("open") is None and visible(d, bubble) and bubble.text == answer


@pytest.mark.timeout(600)
def test_page_shows_no_reasoning_box_for_a_model_without_reasoning(server, browser):
    """Negative control for the test above: same page, same check, a model with no reasoning channel."""
    from selenium.webdriver.common.by import By

    question = "What is the capital of France?"
    msg, _ = api_reply(server, question, 12)
    assert msg["content"] and not msg.get("reasoning_content"), msg
    out = ask_on_page(browser, server, question, 12)
    assert not out.find_elements(By.CSS_SELECTOR, "details"), out.get_attribute("outerHTML")
    assert out.find_element(By.CSS_SELECTOR, ".text").text == msg["content"]


# -- tools and JSON schemas ---------------------------------------------------------------------
WEATHER_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}]


def test_page_shows_a_tool_call_with_name_and_arguments(server, browser):
    """Tools in the settings: the reply shows the call (name, arguments as JSON), as the API gives it
    with one call per reply (what the page asks for). Control: the same question without tools
    shows no call."""
    import json

    from selenium.webdriver.common.by import By

    question = "What is the weather in Paris?"
    api = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": question}],
                                               "tools": WEATHER_TOOLS, "parallel_tool_calls": False,
                                               "temperature": 0, "max_tokens": 40})
    call = api["choices"][0]["message"]["tool_calls"][0]["function"]
    out = ask_on_page(browser, server, question, 40, schema=json.dumps(WEATHER_TOOLS))
    shown = out.find_elements(By.CSS_SELECTOR, ".calls .call")
    assert len(shown) == 1, out.get_attribute("outerHTML")
    assert shown[0].find_element(By.CSS_SELECTOR, ".name").text == "tool call: " + call["name"]
    assert shown[0].find_element(By.CSS_SELECTOR, "code").text == call["arguments"]
    json.loads(call["arguments"])
    out = ask_on_page(browser, server, question, 12)
    assert not out.find_elements(By.CSS_SELECTOR, ".calls")


def test_page_attaches_a_json_schema(server, browser):
    """A schema object in the settings: the reply is JSON matching it. Control: a malformed
    setting is reported on the page and nothing is sent."""
    import json

    from selenium.webdriver.common.by import By

    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 30}},
              "required": ["capital"], "additionalProperties": False}
    out = ask_on_page(browser, server, "What is the capital of France? Answer in JSON.", 40, schema=json.dumps(schema))
    reply = json.loads(out.find_element(By.CSS_SELECTOR, ".text").text)
    assert set(reply) == {"capital"} and isinstance(reply["capital"], str)
    d = browser
    d.execute_script("document.getElementById('schema').value = '{not json';")
    d.find_element(By.ID, "input").send_keys("hello")
    d.find_element(By.ID, "send").click()
    err = wait_for(lambda: d.find_elements(By.CSS_SELECTOR, ".msg.error .meta"), 10, "the error")
    assert "JSON schema or tools" in err[0].text
    d.execute_script("document.getElementById('schema').value = '';")
