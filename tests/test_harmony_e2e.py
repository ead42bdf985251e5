"""Harmony end to end on a real model: the server (real `openai` client, non-stream and stream:
the reasoning in ``reasoning_content``, only the final answer in ``content``), generate and the
terminal chat, under mpirun at 1 and 2 ranks.

The model (tests/harmony_fixture.py) is a one-layer Llama with the harmony tokenizer whose
weights make greedy decoding write an analysis message and then a final one:
``<|channel|>analysis<|message|>Hmm yes<|end|><|start|>assistant<|channel|>final<|message|>Paris!<|return|>``.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

import harmony_fixture as HF
from mpiutil import ROOT, budget, kill_session, mpi_env, mpirun_cmd, popen_job
from serveutil import Server

openai = pytest.importorskip("openai")

Q = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Capital of France?"}]
RAW_ANSWER = ("<|channel|>analysis<|message|>Hmm yes<|end|><|start|>assistant<|channel|>final<|message|>Paris!")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    src = HF.write(tmp_path_factory.mktemp("harmony_src"))
    out = tmp_path_factory.mktemp("harmony_model") / "m"
    r = subprocess.run([sys.executable, "-m", "convert", str(src), str(out), "--world-size", "1", "2",
                        "--no-progress"], cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module", params=[1, 2], ids=["np1", "np2"])
def server(request, model_dir):
    # the prompt text in the log; room for a prompt with tools
    s = Server(request.param, "--model", str(model_dir), "--log-prompts", "--max-seq-len", "1024")
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def client(s: Server):
    return openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.timeout(400)
def test_chat_reasoning_apart_from_content(server):
    c = client(server)
    model = c.models.list().data[0].id
    r = c.chat.completions.create(model=model, messages=Q, temperature=0, max_tokens=40, reasoning_effort="high")
    m = r.choices[0].message
    assert m.content == HF.EXPECTED_FINAL
    assert m.model_extra["reasoning_content"] == HF.EXPECTED_REASONING
    assert r.choices[0].finish_reason == "stop"
    # every generated token counted: the chain after the prompt, <|return|> included
    assert r.usage.completion_tokens == len(HF.chain(HF.build_tokenizer())) - 1

    # the same prompt as raw text through /v1/completions: the special tokens are there, and the
    # chat reply above is exactly their final / analysis channels
    ids = server.post("/tokenize", {"messages": Q})["tokens"]
    raw = c.completions.create(model=model, prompt=ids, temperature=0, max_tokens=40)
    assert raw.choices[0].text == RAW_ANSWER


@pytest.mark.timeout(400)
def test_chat_stream_reasoning_deltas_then_content(server):
    c = client(server)
    model = c.models.list().data[0].id
    reasoning, content, order, finish = [], [], [], None
    for ch in c.chat.completions.create(model=model, messages=Q, temperature=0, max_tokens=40, stream=True,
                                        stream_options={"include_usage": True}):
        for choice in ch.choices:
            extra = choice.delta.model_extra or {}
            if extra.get("reasoning_content"):
                reasoning.append(extra["reasoning_content"])
                order.append("r")
            if choice.delta.content:
                content.append(choice.delta.content)
                order.append("c")
            if choice.finish_reason:
                finish = choice.finish_reason
    assert "".join(reasoning) == HF.EXPECTED_REASONING and "".join(content) == HF.EXPECTED_FINAL
    assert order == sorted(order, key=lambda x: x != "r") and finish == "stop"     # reasoning first


def logged_prompt(server, request_id: str, timeout: float = 10) -> str:
    """The prompt the server logged (--log-prompts) for one request: written when it finishes."""
    import re
    import time

    deadline = time.monotonic() + timeout
    while True:
        for line in server.output.splitlines():
            if request_id in line and " prompt=" in line:
                return re.search(r" prompt=('.*'|\".*\") completion=", line)[1]
        assert time.monotonic() < deadline, f"no prompt logged for {request_id}:\n{server.output[-3000:]}"
        time.sleep(0.1)


@pytest.mark.timeout(400)
def test_reasoning_effort_reaches_the_prompt_and_bad_values_are_refused(server):
    c = client(server)
    model = c.models.list().data[0].id
    low = c.chat.completions.create(model=model, messages=Q, temperature=0, max_tokens=40, reasoning_effort="low")
    assert low.choices[0].message.content == HF.EXPECTED_FINAL
    # the effort is in the system message the model saw (the log holds the prompt's repr)
    for r, effort in ((low, "low"),
                      (c.chat.completions.create(model=model, messages=Q, max_tokens=2, reasoning_effort="high"),
                       "high"),
                      (c.chat.completions.create(model=model, messages=Q, max_tokens=2), "medium")):
        prompt = logged_prompt(server, r.id)
        assert f"Reasoning: {effort}\\n" in prompt, (effort, prompt)
        assert sum(f"Reasoning: {e}" in prompt for e in ("low", "medium", "high")) == 1, prompt
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=model, messages=Q, max_tokens=4, reasoning_effort="maximal")
    assert e.value.body["param"] == "reasoning_effort"


def run(cmd: list[str], stdin: str | None = None, timeout: float = 300, env: dict | None = None):
    limit, note = budget(timeout)
    p = popen_job(cmd, mpi_env(env), ROOT, stdin=subprocess.PIPE if stdin is not None else None)
    try:
        out, err = p.communicate(stdin, timeout=limit)
    except subprocess.TimeoutExpired:
        kill_session(p)
        out, err = p.communicate()
        raise AssertionError(f"{cmd[-1]} hung for {limit:.0f}s{note}\n{out}\n{err}") from None
    finally:
        kill_session(p, grace=0)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


@pytest.mark.timeout(300)
def test_generate_prints_the_answer_and_reasoning_only_on_request(model_dir):
    base = mpirun_cmd(2) + [sys.executable, "-m", "mpillm.generate", "--model", str(model_dir), "--ctx-size", "512",
                            "--chat", "--prompt", "Capital of France?", "--max-tokens", "40", "--quiet"]
    r = run(base)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[0] == HF.EXPECTED_FINAL and "Hmm" not in r.stdout
    r = run(base + ["--show-reasoning", "--reasoning-effort", "low"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith(f"[reasoning]\n{HF.EXPECTED_REASONING}\n[answer]\n{HF.EXPECTED_FINAL}\n"), r.stdout


@pytest.mark.timeout(300)
def test_terminal_chat_shows_reasoning_apart_and_keeps_the_answer(model_dir):
    cmd = mpirun_cmd(1) + [sys.executable, "-m", "mpillm.chat", "--model", str(model_dir), "--ctx-size", "512",
                           "--temperature", "0", "--max-tokens", "40", "--no-stats"]
    r = run(cmd, "Capital of France?\nAnd again?\n/exit\n", env={"NO_COLOR": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("[")]
    assert lines == [f"[reasoning] {HF.EXPECTED_REASONING}", f"[answer] {HF.EXPECTED_FINAL}"] * 2, r.stdout
    # on a terminal the reasoning is dimmed (ANSI faint ... reset), the answer plain on the next line
    r = run(cmd, "Capital of France?\n/exit\n", env={"TERM": "xterm-256color"})
    assert f"\x1b[2m{HF.EXPECTED_REASONING}\x1b[0m\n{HF.EXPECTED_FINAL}\n" in r.stdout, repr(r.stdout)
    r = run(cmd + ["--hide-reasoning"], "Capital of France?\n/exit\n")
    assert r.returncode == 0 and "Hmm" not in r.stdout and HF.EXPECTED_FINAL in r.stdout, r.stdout


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"],
                   "additionalProperties": False}}}


@pytest.mark.timeout(400)
def test_harmony_tool_call_constrained_and_rendered(server):
    """tool_choice required on gpt-oss's format: the grammar (harmony's control tokens as special
    tokens, the arguments' schema) forces a commentary message to functions.get_weather, parsed
    into tool_calls; streamed pieces join to it; the call and its result render through harmony's
    renderer for the next turn. Control: without tools the same question gives no call."""
    import json

    c = client(server)
    model = c.models.list().data[0].id
    q = [{"role": "user", "content": "Weather in Paris?"}]
    r = c.chat.completions.create(model=model, messages=q, tools=[WEATHER], tool_choice="required", temperature=0,
                                  max_tokens=150)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls", ch
    call = ch.message.tool_calls[0]
    assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city"}
    args = ""
    for chunk in c.chat.completions.create(model=model, messages=q, tools=[WEATHER], tool_choice="required",
                                           temperature=0, max_tokens=150, stream=True):
        for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            args += d.function.arguments or ""
    assert args == call.function.arguments
    history = q + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    s = Server.__new__(Server)
    s.url, s.api_key = server.url, None
    text = s.post("/detokenize", {"tokens": s.post("/tokenize", {"messages": history, "tools": [WEATHER]})["tokens"]})
    assert "namespace functions" in text["prompt"] and "to=functions.get_weather" in text["prompt"]
    assert "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>sunny<|end|>" in text["prompt"]
    r = c.chat.completions.create(model=model, messages=q, temperature=0, max_tokens=40)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content == HF.EXPECTED_FINAL
