"""The request handlers: OpenAI completions and models, tokenize, health, metrics, the chat page,
and the JSON answers to unknown routes and internal errors.

``Handlers`` holds what they share, given explicitly: the ``ServerConfig``, the ``State`` (service,
tokenizer; nothing while loading), the ``Metrics`` and the static directory. A handler wrapped in
``api`` checks the API key and turns ``APIError`` into an OpenAI error object.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from mpillm.serving import harmony, tools
from mpillm.serving.grammar import GrammarError, Grammars
from mpillm.serving.http import protocol as P
from mpillm.serving.http import responses_api
from mpillm.serving.http.jobs import Job
from mpillm.serving.http.metrics import Metrics
from mpillm.serving.http.responses import respond

log = logging.getLogger("mpillm.serve")
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def route_name(request: Request) -> str:
    r = request.scope.get("route")
    return getattr(r, "path", "other")


async def drain(request: Request, limit: int = 64 << 20, seconds: float = 5.0) -> None:
    """Read and drop the rest of an oversized body (up to ``limit`` bytes / ``seconds``), so that
    closing the connection does not reset it before the client has read the 413."""
    n, t_end = 0, time.monotonic() + seconds
    try:
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit or time.monotonic() > t_end:
                return
    except Exception:  # noqa: BLE001 - the client went away: nothing left to answer
        return


def api(fn: Callable[[Any, Request], Awaitable[Any]]):
    """Handler wrapper: auth, OpenAI error objects, a response counter."""
    async def handler(self: "Handlers", request: Request):
        try:
            self.check_auth(request)
            resp = await fn(self, request)
        except P.APIError as e:
            return self.error_response(e, request)
        if isinstance(resp, dict):
            resp = JSONResponse(resp)
        self.metrics.responses.labels(route_name(request), str(getattr(resp, "status_code", 200))).inc()
        return resp
    return handler


class Handlers:
    """The app's endpoints, as bound methods for Starlette routes."""

    def __init__(self, config: Any, state: Any, metrics: Metrics, static: Path):
        self.config, self.state, self.metrics, self.static = config, state, metrics, static
        self.key = config.api_key.encode("utf-8") if config.api_key else None
        self._grammars: Grammars | None = None

    # ---- request checks -----------------------------------------------------------------------
    def error_response(self, e: P.APIError, request: Request | None = None) -> JSONResponse:
        if request is not None:
            self.metrics.responses.labels(route_name(request), str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def check_auth(self, request: Request) -> None:
        if self.key is None:
            return
        h = request.headers.get("authorization", "")
        scheme, _, given = h.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8", "replace"), self.key)
        if not ok:
            raise P.APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                             "authentication_error", None, "invalid_api_key",
                             headers={"WWW-Authenticate": "Bearer"})

    def service_or_503(self):
        state = self.state
        if state.failed:
            raise P.APIError(503, f"the server is not serving: {state.failed}", "server_error", None,
                             "unavailable")
        if state.service is None:
            raise P.APIError(503, "the model is still loading", "server_error", None, "loading",
                             headers={"Retry-After": "5"})
        return state.service

    def too_large(self, size: str | None) -> P.APIError:
        what = f"has {size} bytes" if size else "is larger than that"
        return P.APIError(413, f"the request body {what}; the limit is {self.config.max_body_bytes} bytes "
                          "(--max-body-bytes)", code="body_too_large", headers={"Connection": "close"})

    async def read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        cl = request.headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > limit:
            if int(cl) <= 64 << 20:
                await drain(request)
            raise self.too_large(cl)
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                await drain(request)
                raise self.too_large(None)
            chunks.append(chunk)
        return b"".join(chunks)

    def check_model(self, name: str | None) -> None:
        served = self.config.model_name
        if name is not None and name != served:
            raise P.APIError(404, f"the model {name[:200]!r} does not exist; this server serves "
                             f"{served!r} (GET /v1/models)", param="model", code="model_not_found")

    # ---- prompts ------------------------------------------------------------------------------
    def chat_prompt_ids(self, messages: list[dict], reasoning_effort: str | None = None,
                        req: P.Request | None = None) -> list[int]:
        """The chat's prompt in the model's format, with the request's tools in it."""
        tok = self.state.tokenizer
        try:
            if req is not None and (req.tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)):
                text = tools.render(tok, messages, req.tools, req.tool_choice, req.parallel_tool_calls,
                                    reasoning_effort)
            elif harmony.is_harmony(tok):
                text = harmony.prompt_text(tok, messages, reasoning_effort)
            else:
                text = tok.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as e:
            raise P.bad("messages", str(e)) from None
        return tok.encode(text, add_bos=False)

    def grammars(self) -> Grammars:
        if self._grammars is None:
            self._grammars = Grammars(self.state.tokenizer, self.service_or_503().vocab_size)
        return self._grammars

    def call_format(self, req: P.Request) -> str | None:
        """The tool-call format the reply is parsed with; None when there are no tools to call."""
        return tools.call_format(self.state.tokenizer) if req.tools and req.tool_choice != "none" else None

    async def constraint(self, req: P.Request, call_format: str | None):
        """The grammar the reply must follow (response_format, or a forced tool call), compiled off
        the event loop; a schema the engine cannot compile is a 400 naming the field."""
        rf, field = req.response_format, "tools"
        try:
            if rf is not None:
                field = rf.get("field", "response_format")
                grammar = Grammars.json_schema(rf.get("schema") or {"type": "object"}, field)
            elif call_format is not None:
                grammar = tools.call_grammar(call_format, req.tools, req.tool_choice, req.parallel_tool_calls)
            else:
                return None
            if grammar is None:
                return None
            return await asyncio.to_thread(self.grammars().constraint, grammar, field)
        except GrammarError as e:
            if field == "tools":
                field = self.bad_tool(req) or field
            raise P.bad(field, str(e), "invalid_schema") from None

    def bad_tool(self, req: P.Request) -> str | None:
        """The field of the first tool whose parameters the grammar engine refuses."""
        key = "tools[{}].parameters" if req.kind == "response" else "tools[{}].function.parameters"
        for i, t in enumerate(req.tools or []):
            try:
                self.grammars().check(Grammars.json_schema(t.get("parameters") or {"type": "object"}))
            except GrammarError:
                return key.format(i)
        return None

    def check_ids(self, ids: list[int], field_name: str) -> None:
        v = self.state.tokenizer.vocab_size
        for i in ids:
            if not 0 <= i < v:
                raise P.bad(field_name, f"token id {i} is outside the vocabulary (size {v})")

    def sampling_params(self, req: P.Request, n_prompt: int, prompt_field: str):
        from mpillm.serving.sampling import SamplingParams

        ctx = self.state.context_size
        if n_prompt == 0:
            raise P.bad(prompt_field, "the prompt is empty")
        if n_prompt >= ctx:
            raise P.bad(prompt_field, f"the prompt has {n_prompt} tokens; the context size is {ctx} tokens "
                        "(prompt and completion together)", "context_length_exceeded")
        # A prompt that fits generates until max_tokens or the end of the context, whichever comes
        # first (finish_reason "length"), as llama.cpp's server does: a chat page's long history
        # should not turn a fixed max_tokens setting into an error.
        room = ctx - n_prompt
        max_tokens = room if req.max_tokens is None else min(req.max_tokens, room)
        params = SamplingParams(max_tokens=max_tokens, logprobs=req.logprobs, top_logprobs=req.top_logprobs,
                                **req.sampling)
        try:
            params.validate()
        except ValueError as e:
            msg = str(e)
            raise P.bad(msg.split(":", 1)[0] if ":" in msg else None, msg) from None
        return params

    async def run(self, request: Request, req: P.Request, prompt_ids: list[int], prompt_field: str,
                  call_format: str | None = None, answer=respond):
        """Submit the prompt to the service and answer with its completion (``answer``: the wire
        format's responder)."""
        service = self.service_or_503()
        params = self.sampling_params(req, len(prompt_ids), prompt_field)
        constraint = await self.constraint(req, call_format)
        job = Job(request, req, prompt_ids, params, config=self.config, state=self.state, metrics=self.metrics,
                  constraint=constraint, call_format=call_format)
        job.submit(service)
        return await answer(job)

    # ---- OpenAI routes ------------------------------------------------------------------------
    @api
    async def chat_completions(self, request: Request):
        body = P.parse_json_body(await self.read_body(request))
        req, messages = P.parse_chat(body)
        self.check_model(req.model)
        self.service_or_503()
        return await self.run(request, req, self.chat_prompt_ids(messages, req.reasoning_effort, req), "messages",
                              self.call_format(req))

    @api
    async def responses(self, request: Request):
        """The Responses API (stateless): the chat path under another wire format."""
        body = P.parse_json_body(await self.read_body(request))
        req, messages = responses_api.parse(body)
        self.check_model(req.model)
        self.service_or_503()
        return await self.run(request, req, self.chat_prompt_ids(messages, req.reasoning_effort, req), "input",
                              self.call_format(req), answer=responses_api.respond)

    @api
    async def completions(self, request: Request):
        body = P.parse_json_body(await self.read_body(request))
        req = P.parse_completion(body)
        self.check_model(req.model)
        self.service_or_503()
        if req.prompt_ids is not None:
            self.check_ids(req.prompt_ids, "prompt")
            ids = req.prompt_ids
        else:
            ids = self.state.tokenizer.encode(req.prompt_text)
        return await self.run(request, req, ids, "prompt")

    def model_card(self) -> dict:
        return {"id": self.config.model_name, "object": "model", "created": self.state.started,
                "owned_by": "mpillm", "max_model_len": self.state.context_size or None}

    @api
    async def models(self, request: Request):
        return {"object": "list", "data": [self.model_card()]}

    @api
    async def model_detail(self, request: Request):
        self.check_model(request.path_params["model"])
        return self.model_card()

    # ---- tokenizer routes ---------------------------------------------------------------------
    @api
    async def tokenize(self, request: Request):
        body = P.parse_tokenize(P.parse_json_body(await self.read_body(request)))
        self.service_or_503()
        tok = self.state.tokenizer
        if "prompt" in body:
            ids = tok.encode(body["prompt"], add_bos=None if body["add_special_tokens"] else False)
        elif body["tools"] or any(m.get("tool_calls") or m["role"] == "tool" for m in body["messages"]):
            try:            # tools: rendered as a chat request with them renders them
                text = tools.render(tok, body["messages"], body["tools"], "auto" if body["tools"] else "none",
                                    add_generation_prompt=body["add_generation_prompt"])
            except ValueError as e:
                raise P.bad("messages", str(e)) from None
            ids = tok.encode(text, add_bos=False)
        elif harmony.is_harmony(tok) and body["add_generation_prompt"]:
            ids = self.chat_prompt_ids(body["messages"])
        else:
            try:
                text = tok.apply_chat_template(body["messages"], add_generation_prompt=body["add_generation_prompt"])
            except ValueError as e:
                raise P.bad("messages", str(e)) from None
            ids = tok.encode(text, add_bos=False)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.state.context_size}

    @api
    async def detokenize(self, request: Request):
        body = P.parse_json_body(await self.read_body(request))
        self.service_or_503()
        ids = P.parse_detokenize(body, self.state.tokenizer.vocab_size)
        return {"prompt": self.state.tokenizer.decode(ids)}

    # ---- operations and the page ----------------------------------------------------------------
    async def health(self, request: Request):
        state = self.state
        if state.failed:
            return JSONResponse({"status": "failed", "error": state.failed}, status_code=503)
        if state.service is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
        return JSONResponse({"status": "ok", "model": self.config.model_name, "ranks": state.world_size,
                             "slots": state.service.metrics().get("slots_total")})

    @api
    async def metrics_route(self, request: Request):
        # not only from the once-a-second sampler: a scrape right after ready sees it
        self.metrics.service = self.state.service
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def page(self, request: Request):
        return FileResponse(self.static / "index.html", headers={"Content-Security-Policy": PAGE_CSP,
                                                                "X-Content-Type-Options": "nosniff",
                                                                "Cache-Control": "no-cache"})

    # ---- exception handlers -------------------------------------------------------------------
    async def not_found(self, request: Request, exc: HTTPException):
        status = exc.status_code
        msg = {404: f"no route {request.method} {request.url.path[:200]}",
               405: f"method {request.method} is not allowed on {request.url.path[:200]}"}.get(status, str(exc.detail))
        self.metrics.responses.labels("other", str(status)).inc()
        return JSONResponse(P.error_object(msg, "invalid_request_error", None, "not_found" if status == 404 else None),
                            status_code=status, headers=getattr(exc, "headers", None))

    async def server_error(self, request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(P.error_object(f"internal server error: {type(exc).__name__}", "server_error"),
                            status_code=500)
