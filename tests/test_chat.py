"""The terminal chat under mpirun: multi-turn with the KV cache reused between turns, /reset, /exit."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from mpiutil import ROOT, budget, kill_session, mpi_env, mpirun_cmd, popen_job

STATS = re.compile(r"\[prompt (\d+) tokens, (\d+) reused from the KV cache, (\d+) prefilled \| reply (\d+) tokens")


def run_chat(np_: int, text: str, timeout: float = 300, *extra: str) -> subprocess.CompletedProcess:
    cmd = mpirun_cmd(np_) + [sys.executable, "-m", "mpillm.chat", "--max-seq-len", "512", "--temperature", "0",
                             "--max-tokens", "12", *extra]
    limit, note = budget(timeout)
    p = popen_job(cmd, mpi_env(), ROOT, stdin=subprocess.PIPE)
    try:
        out, err = p.communicate(text, timeout=limit)
    except subprocess.TimeoutExpired:
        kill_session(p)
        out, err = p.communicate()
        raise AssertionError(f"mpillm.chat hung for {limit:.0f}s{note}\n{out}\n{err}") from None
    finally:
        kill_session(p, grace=0)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


@pytest.mark.parametrize("np_", [2])   # np 1 adds nothing here: the server tests run both
def test_chat_reuses_cache_and_resets(np_):
    r = run_chat(np_, "What is the capital of France?\nAnd of Italy?\n/bogus\n/reset\nWhat is the capital of France?\n"
                      "/exit\nthis line is never read\n")
    assert r.returncode == 0, r.stderr[-3000:]
    stats = [tuple(map(int, m)) for m in STATS.findall(r.stdout)]
    assert len(stats) == 3, r.stdout
    (p1, c1, f1, n1), (p2, c2, f2, n2), (p3, c3, f3, n3) = stats
    # turn 2 reuses the whole first exchange: only the new user turn is prefilled
    assert p2 > p1 + n1 and c2 >= p1 + n1 - 1 and f2 == p2 - c2 and f2 < p2 - p1, stats
    # after /reset the first question is asked again: the same prompt
    assert p3 == p1
    assert "unknown command /bogus" in r.stdout and "(new conversation)" in r.stdout
    replies = [b for b in r.stdout.split("\n") if b and not b.startswith(("[", "(", "mpillm chat", "unknown"))]
    assert len(replies) >= 3 and replies[0] == replies[-1], r.stdout   # greedy: the same answer after /reset


def test_chat_shows_tool_calls_and_takes_results(tmp_path):
    """--tools: the reply's call is shown as such (name, JSON arguments); /result gives the result
    back and the model goes on. Control: without --tools no call is shown and /result is refused."""
    import json

    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string",
                                                                                            "enum": ["c", "f"]}},
                       "required": ["city", "unit"], "additionalProperties": False}}}]
    f = tmp_path / "tools.json"
    f.write_text(json.dumps(tools))
    # one call per reply: the bundled model, allowed several, calls again and again until it is cut
    r = run_chat(1, "What is the weather in Paris?\n/result 18 C, sunny\n/exit\n", 300, "--tools", str(f),
                 "--max-tokens", "40", "--no-parallel-calls")
    assert r.returncode == 0, r.stderr[-3000:]
    calls = re.findall(r"\[tool call\] (\w+) (\{.*\})", r.stdout)
    assert calls and calls[0][0] == "get_weather", r.stdout
    assert len(re.findall(r"\[tool call\]", r.stdout.split("[prompt")[0])) == 1, r.stdout  # the first reply: one call
    assert set(json.loads(calls[0][1])) == {"city", "unit"}
    assert len(STATS.findall(r.stdout)) == 2, r.stdout          # the model answered after the result
    r = run_chat(1, "What is the weather in Paris?\n/result 18 C\n/exit\n", 300)
    assert "[tool call]" not in r.stdout and "no tool call is waiting" in r.stdout


def test_call_view_puts_text_after_a_call_on_its_own_line():
    """The reply's text after a tool call starts a new line, so ``[tool call] NAME ARGS`` stays a line
    of its own (a reply that went on after its call once ran the text onto the arguments)."""
    import io
    from types import SimpleNamespace

    from mpillm.chat import CallView

    out = io.StringIO()
    view = CallView("hermes", out)
    pieces = ['Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}', "</tool_call>", " and more"]
    for i, p in enumerate(pieces):
        view.show(SimpleNamespace(text=p, finish_reason="stop" if i == len(pieces) - 1 else None))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("Sure.")
    assert lines[1] == '[tool call] get_weather {"city": "Paris"}', lines
    assert lines[2].strip() == "and more", lines
