"""The OpenAI-compatible server end to end: `mpirun -np 1|2 python -m mpillm.serve` with the bundled
model on a free 127.0.0.1 port, driven by the real `openai` client and by plain HTTP.

Every server is started and stopped by the test (tests/serveutil.py kills the process group),
every request has a timeout, and pytest-timeout bounds each test.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import time

import pytest

from serveutil import Server

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "test-key-0123456789"
Q = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module", params=[1, 2], ids=["np1", "np2"])
def server(request, tmp_path_factory):
    """np 1 without a key; np 2 with --api-key-file (so both ways of running are covered)."""
    np_ = request.param
    key = KEY if np_ == 2 else None
    s = Server(np_, "--parallel", "4", "--max-queue", "16", api_key=key, tmp=tmp_path_factory.mktemp("srv"))
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def client(s: Server, key: str | None = None):
    return openai.OpenAI(base_url=s.url + "/v1", api_key=key or s.api_key or "unused", max_retries=0, timeout=120)


def model_of(s: Server) -> str:
    return client(s).models.list().data[0].id


def chat_stream_text(c, model, **kw) -> tuple[str, str, list]:
    parts, finish, chunks = [], None, []
    for ch in c.chat.completions.create(model=model, stream=True, **kw):
        chunks.append(ch)
        for choice in ch.choices:
            if choice.delta.content:
                parts.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    return "".join(parts), finish, chunks


# ---------------------------------------------------------------------------------------------
# the openai client


def test_models_list(server):
    data = client(server).models.list().data
    assert len(data) == 1 and data[0].object == "model"
    assert data[0].id == "SmolLM2-135M-Instruct.Q4_1"


def test_chat_stream_equals_non_stream(server):
    c, m = client(server), model_of(server)
    r = c.chat.completions.create(model=m, messages=Q, temperature=0, max_tokens=24)
    text = r.choices[0].message.content
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and text.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    s_text, finish, chunks = chat_stream_text(c, m, messages=Q, temperature=0, max_tokens=24)
    assert s_text == text
    assert finish == r.choices[0].finish_reason
    assert len({ch.id for ch in chunks}) == 1
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.choices[0].finish_reason is None for ch in chunks[:-1])


def test_usage_chunk(server):
    c, m = client(server), model_of(server)
    # ignore_eos: the 8 tokens are reached whatever the model's greedy reply (a kernel change that
    # moves a logit's last bits may make it end sooner)
    text, finish, chunks = chat_stream_text(c, m, messages=Q, temperature=0, max_tokens=8,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 8 and finish == "length"
    assert all(ch.usage is None for ch in chunks[:-1])
    r = c.chat.completions.create(model=m, messages=Q, temperature=0, max_tokens=8)
    assert last.usage.prompt_tokens == r.usage.prompt_tokens


def test_completion_and_stop_strings(server):
    c, m = client(server), model_of(server)
    r = c.completions.create(model=m, prompt="The numbers from one to ten are: one, two, three,", temperature=0,
                             max_tokens=30)
    full = r.choices[0].text
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and full.strip()
    assert "," in full[1:], full
    stop_at = full.index(",", 1)
    r2 = c.completions.create(model=m, prompt="The numbers from one to ten are: one, two, three,", temperature=0,
                              max_tokens=30, stop=[","])
    assert r2.choices[0].finish_reason == "stop"
    assert r2.choices[0].text == full[:stop_at]
    # streamed completion: the same text, chunks of object text_completion
    parts = []
    for ch in c.completions.create(model=m, prompt="The numbers from one to ten are: one, two, three,",
                                   temperature=0, max_tokens=30, stop=[","], stream=True):
        assert ch.object == "text_completion"
        parts.append(ch.choices[0].text)
    assert "".join(parts) == full[:stop_at]


def test_max_tokens_length(server):
    c, m = client(server), model_of(server)
    story = [{"role": "user", "content": "Write a long story about a cat."}]
    # ignore_eos: the limit is reached whatever the model's greedy reply
    r = c.chat.completions.create(model=m, messages=story, temperature=0, max_tokens=5, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    r = c.chat.completions.create(model=m, messages=story, temperature=0, max_completion_tokens=3,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_multi_turn_and_system(server):
    c, m = client(server), model_of(server)
    msgs = [{"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name a color."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": [{"type": "text", "text": "Name another "}, {"type": "text", "text": "one."}]}]
    r = c.chat.completions.create(model=m, messages=msgs, temperature=0, max_tokens=8)
    assert r.choices[0].message.content
    tk = server.post("/tokenize", {"messages": msgs})
    assert tk["count"] == r.usage.prompt_tokens == len(tk["tokens"])
    assert server.post("/detokenize", {"tokens": tk["tokens"]})["prompt"].count("Blue.") == 1


def test_typed_errors(server):
    c, m = client(server), model_of(server)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=m, messages=Q, temperature=3)
    assert e.value.status_code == 400 and "temperature" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=m, messages=Q, n=2)
    assert "n must be 1" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:    # tools are served (tests/test_agents.py); a missing one is not
        c.chat.completions.create(model=m, messages=Q, tools=[{"type": "function", "function": {"name": "f"}}],
                                  tool_choice={"type": "function", "function": {"name": "g"}})
    assert e.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=m, messages=Q, response_format={"type": "regex", "pattern": "a+"})
    assert e.value.body["param"] == "response_format.type"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="no-such-model", messages=Q)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=m, prompt="word " * 600, max_tokens=4)
    msg = str(e.value)
    assert "512" in msg and "tokens" in msg, msg


def test_bad_key(server):
    if not server.api_key:      # the np1 server runs without --api-key: any key (or none) is accepted
        assert client(server, key="whatever").models.list().data
        assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 200
        return
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong-key").models.list()
    r = httpx.get(server.url + "/v1/models", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200   # /health stays open


# ---------------------------------------------------------------------------------------------
# plain HTTP


def test_sse_bytes(server):
    body = {"model": model_of(server), "messages": Q, "temperature": 0, "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}  # 6 tokens whatever the reply
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=server.headers(),
                      timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_raw())
    assert raw.endswith(b"\n\ndata: [DONE]\n\n")
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    objs = []
    for ev in events[:-2]:
        assert ev.startswith(b"data: {") and b"\n" not in ev, ev
        objs.append(json.loads(ev[len(b"data: "):]))
    assert len({o["id"] for o in objs}) == 1
    assert objs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = objs[1:-2]
    assert content and all(o["choices"][0]["finish_reason"] is None and o["choices"][0]["delta"]["content"]
                           for o in content)
    assert objs[-2]["choices"][0]["finish_reason"] == "length" and objs[-2]["choices"][0]["delta"] == {}
    assert objs[-1]["choices"] == [] and objs[-1]["usage"]["completion_tokens"] == 6
    assert all(o["usage"] is None for o in objs[:-1])


def _stream_text(url: str, headers: dict, body: dict) -> str:
    text = []
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, headers=headers,
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                obj = json.loads(line[6:])
                assert "error" not in obj, obj
                for ch in obj["choices"]:
                    text.append(ch["delta"].get("content") or "")
    return "".join(text)


def test_concurrent_streams_equal_alone(server):
    m = model_of(server)
    topics = ["the sea", "a mountain", "bread", "a robot", "winter", "a violin", "the moon", "a garden"]
    bodies = [{"model": m, "messages": [{"role": "user", "content": f"Write one sentence about {t}."}],
               "temperature": 0, "max_tokens": 20} for t in topics]
    alone = [server.post("/v1/chat/completions", b)["choices"][0]["message"]["content"] for b in bodies]
    before = server.metrics()
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        together = list(ex.map(lambda b: _stream_text(server.url, server.headers(), b), bodies))
    after = server.metrics()
    for t, a, b in zip(topics, alone, together):
        assert a == b, f"{t}: alone {a!r} != concurrent {b!r}"
    # they really ran together: one at a time, every generated token costs a step of its own
    # (the prefill step gives the first token, each decode step one more)
    steps = after["mpillm_engine_steps_total"] - before["mpillm_engine_steps_total"]
    tokens = after["mpillm_generation_tokens_total"] - before["mpillm_generation_tokens_total"]
    assert tokens >= len(bodies) and steps < tokens, f"{steps} engine steps for {tokens} generated tokens"


def test_disconnect_frees_slot(server):
    m = model_of(server)
    before = server.metrics()
    body = {"model": m, "messages": Q, "temperature": 0, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=server.headers(),
                      timeout=60) as r:
        it = r.iter_lines()
        got = 0
        for line in it:
            if line.startswith("data: {"):
                got += 1
                if got == 4:
                    break
        busy = server.metrics()["mpillm_slots_busy"]
    assert busy >= 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = server.metrics()
        if after["mpillm_slots_busy"] == 0 and after["mpillm_requests_finished_total"] > \
                before["mpillm_requests_finished_total"]:
            break
        time.sleep(0.1)
    assert after["mpillm_slots_busy"] == 0
    generated = after["mpillm_generation_tokens_total"] - before["mpillm_generation_tokens_total"]
    assert generated < 300, f"the cancelled request ran on: {generated} tokens"


def _raw(url: str, data: bytes, headers: dict | None = None, path: str = "/v1/chat/completions",
         method: str = "POST") -> tuple[int, dict]:
    """One raw HTTP/1.1 request over a socket (for bodies no client library would send)."""
    host, port = url.split("//")[1].split(":")
    h = {"Host": f"{host}:{port}", "Content-Type": "application/json", "Content-Length": str(len(data)),
         "Connection": "close", **(headers or {})}
    req = f"{method} {path} HTTP/1.1\r\n".encode() + b"".join(f"{k}: {v}\r\n".encode() for k, v in h.items()) + \
        b"\r\n" + data
    with socket.create_connection((host, int(port)), timeout=30) as s:
        try:
            s.sendall(req)
        except (BrokenPipeError, ConnectionResetError):
            pass                                   # the server answered 413 before reading everything
        buf = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        out, rest = b"", body
        while rest:
            n, _, rest = rest.partition(b"\r\n")
            n = int(n, 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    try:
        return status, json.loads(body)
    except ValueError:
        return status, {"raw": body[:200]}


def test_hostile_requests_then_good(server):
    m = model_of(server)
    auth = server.headers()
    good = json.dumps({"model": m, "prompt": "Hello", "max_tokens": 2, "temperature": 0}).encode()

    def chat(**kw):
        return json.dumps({"model": m, "messages": Q, **kw}).encode()

    cases = [  # (what, body bytes, expected status, field named in the error or None, extra headers, path)
        ("malformed JSON", b'{"model": ', 400, None, {}, None),
        ("not an object", b"[1, 2, 3]", 400, None, {}, None),
        ("empty body", b"", 400, None, {}, None),
        ("bad UTF-8", b'{"model": "\xff\xfe", "messages": []}', 400, None, {}, None),
        ("lone surrogate", chat(stop="\ud800"), 400, "stop", {}, None),
        ("deep nesting", b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400, None, {}, None),
        ("NaN", b'{"messages": [], "temperature": NaN}', 400, None, {}, None),
        ("huge integer", chat(max_tokens=10**30), 400, "max_tokens", {}, None),
        ("negative max_tokens", chat(max_tokens=-5), 400, "max_tokens", {}, None),
        ("max_tokens as string", chat(max_tokens="10"), 400, "max_tokens", {}, None),
        ("bool as int", chat(max_tokens=True), 400, "max_tokens", {}, None),
        ("temperature too high", chat(temperature=1e308), 400, "temperature", {}, None),
        ("top_p zero", chat(top_p=0), 400, "top_p", {}, None),
        ("wrong messages type", json.dumps({"model": m, "messages": "hi"}).encode(), 400, "messages", {}, None),
        ("no messages", json.dumps({"model": m}).encode(), 400, "messages", {}, None),
        ("bad role", json.dumps({"model": m, "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400,
         "messages[0].role", {}, None),
        ("image part", json.dumps({"model": m, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}]}).encode(), 400, "messages[0].content[0].type",
         {}, None),
        ("unknown field", chat(frobnicate=1), 400, "frobnicate", {}, None),
        ("n > 1", chat(n=3), 400, "n", {}, None),
        ("stop list too long", chat(stop=["a"] * 50), 400, "stop", {}, None),
        ("top_logprobs without logprobs", chat(top_logprobs=3), 400, "top_logprobs", {}, None),
        ("prompt over the context", json.dumps({"model": m, "prompt": "hello " * 2000}).encode(), 400, "prompt",
         {}, "/v1/completions"),
        ("token id out of range", json.dumps({"model": m, "prompt": [1, 10**9]}).encode(), 400, "prompt", {},
         "/v1/completions"),
        ("10 MB body", b'{"prompt": "' + b"a" * (10 << 20) + b'"}', 413, None, {}, "/v1/completions"),
        ("lying content-length", good, 413, None, {"Content-Length": str(1 << 30)}, "/v1/completions"),
        ("unknown route", good, 404, None, {}, "/v1/engines"),
        ("wrong method", b"", 405, None, {}, "/v1/chat/completions?GET"),
        ("unknown model", chat(model="gpt-17"), 404, "model", {}, None),
    ]
    assert len(cases) >= 20
    for what, data, status, param, extra, path in cases:
        method = "POST"
        if path and path.endswith("?GET"):
            path, method = path[:-4], "GET"
        hdrs = {**auth, **extra}
        if "Content-Length" in extra:
            code, obj = _raw_lying(server.url, data, hdrs, path)
        else:
            code, obj = _raw(server.url, data, hdrs, path or "/v1/chat/completions", method)
        assert code == status, f"{what}: {code} {obj}"
        assert set(obj.get("error", {})) == {"message", "type", "param", "code"}, f"{what}: {obj}"
        if param:
            assert obj["error"]["param"] == param, f"{what}: {obj}"
        code, obj = _raw(server.url, good, auth, "/v1/completions")
        assert code == 200 and obj["choices"][0]["text"] is not None, f"after {what}: {code} {obj}"
    if server.api_key:
        code, obj = _raw(server.url, good, {"Authorization": "Bearer " + "x" * 5000}, "/v1/completions")
        assert code == 401


def _raw_lying(url: str, data: bytes, headers: dict, path: str) -> tuple[int, dict]:
    """A request whose Content-Length promises more than it sends: refused from the header alone."""
    host, port = url.split("//")[1].split(":")
    h = {"Host": f"{host}:{port}", "Content-Type": "application/json", "Connection": "close", **headers}
    req = f"POST {path} HTTP/1.1\r\n".encode() + b"".join(f"{k}: {v}\r\n".encode() for k, v in h.items()) + \
        b"\r\n" + data
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(req)
        s.shutdown(socket.SHUT_WR)
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def test_health_and_metrics(server):
    r = httpx.get(server.url + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["ranks"] == server.np
    m = server.metrics()
    for name in ("mpillm_requests_total", "mpillm_prompt_tokens_total", "mpillm_generation_tokens_total",
                 "mpillm_queue_length", "mpillm_slots_busy", "mpillm_generation_tokens_per_second",
                 "mpillm_time_to_first_token_seconds_count"):
        assert name in m, name
    assert m["mpillm_slots"] >= 1
    # the counters move as two requests did: their usage, token for token
    m0 = server.metrics()
    body = {"model": model_of(server), "prompt": "The capital of France is", "temperature": 0, "max_tokens": 5,
            "ignore_eos": True}
    usage = [server.post("/v1/completions", body)["usage"] for _ in range(2)]
    m1 = server.metrics()
    moved = {k: m1[k] - m0[k] for k in ("mpillm_requests_total", "mpillm_prompt_tokens_total",
                                        "mpillm_cached_prompt_tokens_total", "mpillm_generation_tokens_total",
                                        "mpillm_time_to_first_token_seconds_count", "mpillm_engine_steps_total")}
    assert moved["mpillm_requests_total"] == 2, moved
    # prompt tokens run through the model, and those the slot's cache already held (the second request)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usage)
    assert moved["mpillm_cached_prompt_tokens_total"] == cached, (moved, usage)
    assert moved["mpillm_prompt_tokens_total"] == sum(u["prompt_tokens"] for u in usage) - cached, (moved, usage)
    assert moved["mpillm_generation_tokens_total"] == sum(u["completion_tokens"] for u in usage) == 10, (moved, usage)
    assert moved["mpillm_time_to_first_token_seconds_count"] == 2, moved
    assert 2 <= moved["mpillm_engine_steps_total"] <= 10, moved     # one at a time: a step per token at most
    assert m1["mpillm_slots_busy"] == 0 and m1["mpillm_queue_length"] == 0, m1


# ---------------------------------------------------------------------------------------------
# a rank dies during a stream


def test_rank_killed_during_stream(tmp_path):
    s = Server(2, "--parallel", "2")
    try:
        s.wait_ready()
        body = {"messages": Q, "temperature": 0, "max_tokens": 450, "ignore_eos": True, "stream": True}
        events, error = [], None
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            killed_at = None
            try:
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    events.append(line)
                    if line.startswith("data: {") and "error" in json.loads(line[6:]):
                        error = json.loads(line[6:])["error"]
                        break
                    if len(events) == 5 and killed_at is None:
                        os.kill(s.rank_pid(1), signal.SIGKILL)
                        killed_at = time.monotonic()
            except httpx.HTTPError as e:
                error = {"message": f"transport: {e}"}
        assert killed_at is not None
        assert error is not None and events[-1] != "data: [DONE]", events[-3:]
        assert "rank 1" in error["message"] or "MPI job" in error["message"], error
        deadline = killed_at + 10
        while time.monotonic() < deadline and (s.proc.poll() is None or s.pids()):
            time.sleep(0.1)
        assert s.proc.poll() is not None and not s.pids(), f"still running 10 s after the kill: {s.pids()}"
        assert s.proc.returncode != 0
        print(f"error event: {error['message']!r}; job gone {time.monotonic() - killed_at:.1f} s after the kill")
    finally:
        s.stop()


def test_bench_serve_smoke(server, tmp_path):
    """benchmarks.serve against the running server: every level answers, figures are filled in."""
    import benchmarks.serve as bench

    out = tmp_path / "bench.json"
    args = ["--url", server.url, "--clients", "1", "3", "--requests", "1", "--max-tokens", "6", "--json", str(out)]
    if server.api_key:
        args += ["--api-key", server.api_key]
    assert bench.main(args) == 0
    rep = json.loads(out.read_text())
    assert [lv["clients"] for lv in rep["levels"]] == [1, 3]
    for lv in rep["levels"]:
        assert lv["errors"] == 0 and lv["tokens"] == 6 * lv["clients"]
        assert lv["aggregate_tok_s"] > 0 and lv["ttft_ms_p50"] > 0 and lv["itl_ms_p99"] >= lv["itl_ms_p50"] > 0
    # --completions: plain text completions (models without a chat template), the same figures
    assert bench.main(args + ["--completions"]) == 0
    rep = json.loads(out.read_text())
    assert [lv["clients"] for lv in rep["levels"]] == [1, 3]
    for lv in rep["levels"]:
        assert lv["errors"] == 0 and lv["tokens"] == 6 * lv["clients"] and lv["ttft_ms_p50"] > 0


def test_bench_serve_compare_takes_ratios_within_each_round():
    """benchmarks.serve --against: a level's ratio uses that round's two servers only (a round on a
    slower machine must not pair with a faster round of the other server), then the median."""
    import statistics

    import benchmarks.serve as bench

    def lv(n, tok, ttft):
        return {"clients": n, "aggregate_tok_s": tok, "ttft_ms_p50": ttft}
    rounds = [{"mpillm": {"levels": [lv(8, 300.0, 40.0)]}, "llama_server": {"levels": [lv(8, 60.0, 100.0)]}},
              {"mpillm": {"levels": [lv(8, 120.0, 80.0)]}, "llama_server": {"levels": [lv(8, 40.0, 100.0)]}},
              {"mpillm": {"levels": [lv(8, 200.0, 50.0)]}, "llama_server": {"levels": [lv(8, 100.0, 100.0)]}}]
    r = bench.compare_rounds(rounds)["8"]
    assert r["tok_s_ratio_rounds"] == [5.0, 3.0, 2.0] and r["tok_s_ratio_median"] == 3.0
    assert r["ttft_p50_ratio_rounds"] == [0.4, 0.8, 0.5] and r["ttft_p50_ratio_median"] == 0.5
    # control: pooling the rounds first (median of all mpillm figures over median of all llama-server's)
    # pairs round 3's mpillm with round 1's llama-server and gives 200 / 60, not 3
    assert round(statistics.median([300.0, 120.0, 200.0]) / statistics.median([60.0, 40.0, 100.0]), 3) == 3.333


def test_queue_full_is_503_with_retry_after(server):
    """--parallel 4 --max-queue 16: of 24 requests at once, those beyond 16 waiting (4 of them, or a few
    more when requests arrive before the engine step that gives the first ones their slots) get
    503 + Retry-After at once; closing the others frees every slot and the queue."""
    import asyncio

    m = model_of(server)
    body = {"model": m, "messages": Q, "temperature": 0, "max_tokens": 300, "ignore_eos": True, "stream": True}

    async def go():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=40)) as c:
            async def one():
                async with c.stream("POST", server.url + "/v1/chat/completions", json=body,
                                    headers=server.headers()) as r:
                    return r.status_code, r.headers.get("retry-after"), (await r.aread())[:500]
            tasks = [asyncio.ensure_future(one()) for _ in range(24)]
            refused = []
            deadline = time.monotonic() + 60
            while len(refused) < 4 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                refused = [t.result() for t in tasks if t.done()]
            await asyncio.sleep(1.0)       # requests submitted before the engine's next step count as waiting
            refused = [t.result() for t in tasks if t.done()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return refused
    refused = asyncio.run(go())
    assert 4 <= len(refused) <= 8, refused     # 16 can always wait; 4 more once the slots are taken
    for status, retry, text in refused:
        assert status == 503 and retry and int(retry) >= 1, (status, retry, text)
        assert json.loads(text)["error"]["code"] == "queue_full"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m_ = server.metrics()
        if m_["mpillm_slots_busy"] == 0 and m_["mpillm_queue_length"] == 0:
            break
        time.sleep(0.2)
    assert m_["mpillm_slots_busy"] == 0 and m_["mpillm_queue_length"] == 0, m_


def test_logprobs(server):
    c, m = client(server), model_of(server)
    r = c.chat.completions.create(model=m, messages=Q, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens or (r.choices[0].finish_reason == "stop" and
                                                   len(lp) == r.usage.completion_tokens - 1)
    for t in lp:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].token == t.token and abs(t.top_logprobs[0].logprob - t.logprob) < 1e-6  # greedy
    assert "".join(t.token for t in lp).startswith(r.choices[0].message.content[:5])
    r = c.completions.create(model=m, prompt="The sky is", temperature=0, max_tokens=4, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == r.choices[0].text


def test_busy_port_fails_at_once(server):
    """A second server on the same port ends every rank at once, naming the address (no model load)."""
    from mpiutil import mpirun

    port = server.url.rsplit(":", 1)[1]
    t0 = time.monotonic()
    r = mpirun(2, ["-m", "mpillm.serve", "--port", port], timeout=120)
    assert r.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in r.stdout + r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 60


def test_queue_and_request_timeouts():
    """--queue-timeout: a request that waits for a slot too long gets 503 + Retry-After;
    --request-timeout: a stream that runs too long ends with an error event, a plain request with 504."""
    import threading

    s = Server(1, "--parallel", "1", "--queue-timeout", "2", "--request-timeout", "4", "--ctx-size", "2048")
    try:
        s.wait_ready()
        assert s.post("/v1/completions", {"prompt": "warm up", "max_tokens": 2})["choices"]
        long = {"messages": Q, "temperature": 0, "max_tokens": 2000, "ignore_eos": True}   # > 10 s of work
        events: list[str] = []
        started = threading.Event()

        def stream_a():
            with httpx.stream("POST", s.url + "/v1/chat/completions", json={**long, "stream": True},
                              timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line)
                        started.set()
            started.set()
        ta = threading.Thread(target=stream_a)
        ta.start()
        assert started.wait(30)
        r = httpx.post(s.url + "/v1/chat/completions", json={**long, "max_tokens": 4}, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        assert r.json()["error"]["code"] == "queue_timeout"
        ta.join(30)
        last = json.loads(events[-1][6:])
        assert "error" in last and last["error"]["code"] == "request_timeout", events[-2:]
        r = httpx.post(s.url + "/v1/chat/completions", json=long, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout", r.text
        deadline = time.monotonic() + 10
        while s.metrics()["mpillm_slots_busy"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert s.metrics()["mpillm_slots_busy"] == 0
    finally:
        s.stop()


# ---------------------------------------------------------------------------------------------
# speculative decoding: the draft counters reach /metrics


def test_draft_counters_in_metrics():
    """A server with --draft lookup: a greedy request whose answer repeats its prompt moves the
    draft counters on /metrics (drafted, accepted, decoding steps, seconds spent drafting), and
    fewer decoding steps than tokens shows that verified drafts gave several tokens per step."""
    s = Server(1, "--parallel", "2", "--draft", "lookup")
    try:
        s.wait_ready()
        before = s.metrics()
        for name in ("mpillm_draft_tokens_total", "mpillm_draft_accepted_tokens_total", "mpillm_decode_steps_total"):
            assert before[name] == 0, name
        prompt = "one two three four five six seven eight nine ten. " * 6
        r = s.post("/v1/completions", {"prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": True},
                   timeout=120)
        assert r["usage"]["completion_tokens"] == 40, r
        m = s.metrics()
        drafted, accepted = m["mpillm_draft_tokens_total"], m["mpillm_draft_accepted_tokens_total"]
        steps = m["mpillm_decode_steps_total"]
        assert 0 < accepted <= drafted, (accepted, drafted)
        assert m["mpillm_draft_seconds_total"] > before["mpillm_draft_seconds_total"]
        assert 0 < steps < 40, steps   # 40 tokens in fewer steps: accepted drafts came several per step
        assert m["mpillm_generation_tokens_total"] == 40
    finally:
        s.stop()
