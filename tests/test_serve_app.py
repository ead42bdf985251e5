"""The HTTP app in-process (no MPI, no model): loading state, auth, CORS, the page's safety, the
wire-format helpers. The end-to-end behaviour with a real engine is in test_serve.py."""
from __future__ import annotations

import asyncio
import json

import pytest

from mpillm.serving.http import protocol as P
from mpillm.serving.http.app import STATIC, ServerConfig, State, create_app

httpx = pytest.importorskip("httpx")


def call(app, method: str, path: str, **kw) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.request(method, path, **kw)
    return asyncio.run(go())


CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def test_loading_then_failed():
    state = State()
    app = create_app(ServerConfig(model_name="m"), state)
    r = call(app, "GET", "/health")
    assert r.status_code == 503 and r.json() == {"status": "loading"} and r.headers["retry-after"]
    r = call(app, "POST", "/v1/chat/completions", json=CHAT)
    assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
    # validation still answers while loading: a bad request is a 400, not a 503
    r = call(app, "POST", "/v1/chat/completions", json={"messages": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    state.fail("the MPI job is ending: lost rank 1 (pid 1 on h)")
    r = call(app, "GET", "/health")
    assert r.status_code == 503 and "rank 1" in r.json()["error"]
    r = call(app, "POST", "/v1/completions", json={"prompt": "x"})
    assert r.status_code == 503 and "rank 1" in r.json()["error"]["message"]


def test_api_key():
    app = create_app(ServerConfig(model_name="m", api_key="s3cret"), State())
    assert call(app, "GET", "/v1/models").status_code == 401
    r = call(app, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"
    assert call(app, "GET", "/v1/models", headers={"Authorization": "Basic s3cret"}).status_code == 401
    assert call(app, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert call(app, "GET", "/metrics").status_code == 401
    assert call(app, "GET", "/health").status_code == 503            # open (and loading)
    assert call(app, "GET", "/").status_code == 200                   # the page itself holds no data


def test_cors_only_when_asked():
    pre = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    closed = create_app(ServerConfig(model_name="m"), State())
    r = call(closed, "OPTIONS", "/v1/chat/completions", headers=pre)
    assert "access-control-allow-origin" not in r.headers
    r = call(closed, "GET", "/v1/models", headers={"Origin": "http://ui.example"})
    assert "access-control-allow-origin" not in r.headers
    open_ = create_app(ServerConfig(model_name="m", cors_origins=["http://ui.example"]), State())
    r = call(open_, "OPTIONS", "/v1/chat/completions", headers=pre)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ui.example"
    r = call(open_, "OPTIONS", "/v1/chat/completions", headers={**pre, "Origin": "http://evil.example"})
    assert r.headers.get("access-control-allow-origin") != "http://evil.example"


def test_page_is_local_and_never_renders_html():
    app = create_app(ServerConfig(model_name="m"), State())
    r = call(app, "GET", "/")
    assert r.status_code == 200 and "script-src 'self'" in r.headers["content-security-policy"]
    html = r.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in html and call(app, "GET", asset).status_code == 200
    text = "".join(p.read_text() for p in STATIC.iterdir())
    assert "http://" not in text and "https://" not in text            # no CDN, nothing from outside
    js = (STATIC / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in js, sink
    assert "textContent" in js


def test_unknown_route_and_method_are_openai_errors():
    app = create_app(ServerConfig(model_name="m"), State())
    r = call(app, "GET", "/v2/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = call(app, "DELETE", "/v1/models")
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_json_body_errors():
    for raw, needle in ((b"", "empty"), (b"\xff", "UTF-8"), (b"[" * 50000 + b"]" * 50000, "nested"),
                        (b'{"a": Infinity}', "JSON"), (b'{"a": ' + b"9" * 5000 + b"}", "JSON"), (b"3", "object")):
        with pytest.raises(P.APIError) as e:
            P.parse_json_body(raw)
        assert e.value.status == 400 and needle in e.value.message, (raw[:20], e.value.message)
    deep = json.dumps({"messages": [{"role": "user", "content": [[[[[[[[]]]]]]]]}]}).encode()
    assert P.parse_json_body(deep)      # modest nesting is fine; the fields are checked later


def test_sse_event_format():
    assert P.sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert P.SSE_DONE == b"data: [DONE]\n\n"


def test_chat_request_fields():
    req, msgs = P.parse_chat({"messages": [{"role": "developer", "content": "be brief"},
                                           {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                        {"type": "text", "text": "b"}]}],
                              "max_tokens": 9, "max_completion_tokens": 7, "stop": "x", "seed": -1,
                              "stream": True, "stream_options": {"include_usage": True}, "top_k": -1})
    assert msgs == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    assert req.max_tokens == 7 and req.sampling["stop"] == ("x",) and req.sampling["seed"] == 2**64 - 1
    assert req.include_usage and req.sampling["top_k"] == 0
    with pytest.raises(P.APIError) as e:
        P.parse_chat({**CHAT, "stream_options": {"include_usage": True}})
    assert e.value.param == "stream_options"
    c = P.parse_completion({"prompt": [1, 2, 3]})
    assert c.prompt_ids == [1, 2, 3] and c.max_tokens == 16
    assert P.parse_completion({"prompt": "x", "max_tokens": None}).max_tokens is None
