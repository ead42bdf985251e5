"""The HTTP app (Starlette): OpenAI routes, the chat page, health, metrics, tokenize.

It runs on rank 0 in uvicorn's thread and never touches MPI: a request is validated
here, tokenized, and handed to ``Service.submit`` with a sink that moves each ``Output``
from the engine thread onto this event loop (``loop.call_soon_threadsafe``). A client
that goes away becomes ``Service.cancel`` (its slot is free at the next engine step).
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from mpillm.serving import harmony
from mpillm.serving.http import protocol as P
from mpillm.serving.http.metrics import Metrics

log = logging.getLogger("mpillm.serve")
STATIC = Path(__file__).resolve().parent / "static"
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
DISCONNECTED = object()   # put on a request's queue when its client goes away


@dataclass
class ServerConfig:
    model_name: str = "mpillm"
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = 4 << 20
    queue_timeout: float | None = None     # no token after this long (queue + prefill): 503
    request_timeout: float | None = None   # whole request
    log_prompts: bool = False
    retry_after: int = 1


class State:
    """What the app knows about the engine: nothing while loading, the service once ready,
    and the reason after a fatal error (rank lost, shutting down)."""

    def __init__(self):
        self.service = None
        self.tokenizer = None
        self.context_size = 0
        self.world_size = 0
        self.failed: str | None = None
        self.started = int(time.time())
        self.loop: asyncio.AbstractEventLoop | None = None   # the HTTP thread's event loop
        self.jobs: set = set()                               # requests with an open response

    def ready(self, service, tokenizer, world_size: int) -> None:
        self.tokenizer, self.world_size = tokenizer, world_size
        self.context_size = service.context_size
        self.service = service

    def fail(self, message: str, wait: float = 0.0) -> None:
        """Thread-safe: refuse new requests and end every open one with an error event carrying
        ``message``; wait up to ``wait`` seconds for their responses to go out."""
        self.failed = message
        if self.service is not None:
            try:
                self.service.fail_all(message)
            except Exception:  # noqa: BLE001 - the HTTP side below does not depend on it
                log.exception("Service.fail_all")
        item = SimpleNamespace(request_id="", token_ids=[], text="", logprobs=None, finish_reason="error",
                               error=message, prompt_tokens=0, completion_tokens=0, cached_tokens=0)

        def push() -> None:
            for job in list(self.jobs):
                job.q.put_nowait(item)
        if self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(push)
            except RuntimeError:
                pass
        deadline = time.monotonic() + wait
        while self.jobs and time.monotonic() < deadline:
            time.sleep(0.02)
        if wait:
            time.sleep(min(0.2, wait))      # the last bytes of responses already complete


def create_app(config: ServerConfig, state: State) -> Starlette:
    metrics = Metrics()
    key = config.api_key.encode("utf-8") if config.api_key else None

    def route_name(request: Request) -> str:
        r = request.scope.get("route")
        return getattr(r, "path", "other")

    def error_response(e: P.APIError, request: Request | None = None) -> JSONResponse:
        if request is not None:
            metrics.responses.labels(route_name(request), str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def check_auth(request: Request) -> None:
        if key is None:
            return
        h = request.headers.get("authorization", "")
        scheme, _, given = h.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8", "replace"), key)
        if not ok:
            raise P.APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                             "authentication_error", None, "invalid_api_key",
                             headers={"WWW-Authenticate": "Bearer"})

    def service_or_503():
        if state.failed:
            raise P.APIError(503, f"the server is not serving: {state.failed}", "server_error", None,
                             "unavailable")
        if state.service is None:
            raise P.APIError(503, "the model is still loading", "server_error", None, "loading",
                             headers={"Retry-After": "5"})
        return state.service

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

    def too_large(size: str | None) -> P.APIError:
        what = f"has {size} bytes" if size else "is larger than that"
        return P.APIError(413, f"the request body {what}; the limit is {config.max_body_bytes} bytes "
                          "(--max-body-bytes)", code="body_too_large", headers={"Connection": "close"})

    async def read_body(request: Request) -> bytes:
        cl = request.headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > config.max_body_bytes:
            if int(cl) <= 64 << 20:
                await drain(request)
            raise too_large(cl)
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > config.max_body_bytes:
                await drain(request)
                raise too_large(None)
            chunks.append(chunk)
        return b"".join(chunks)

    def check_model(name: str | None) -> None:
        if name is not None and name != config.model_name:
            raise P.APIError(404, f"the model {name[:200]!r} does not exist; this server serves "
                             f"{config.model_name!r} (GET /v1/models)", param="model", code="model_not_found")

    def api(fn: Callable[[Request], Awaitable[Any]]):
        """Route wrapper: auth, OpenAI error objects, a response counter."""
        async def handler(request: Request):
            try:
                check_auth(request)
                resp = await fn(request)
            except P.APIError as e:
                return error_response(e, request)
            if isinstance(resp, dict):
                resp = JSONResponse(resp)
            metrics.responses.labels(route_name(request), str(getattr(resp, "status_code", 200))).inc()
            return resp
        return handler

    # ---- prompts ------------------------------------------------------------------------------
    def chat_prompt_ids(messages: list[dict], reasoning_effort: str | None = None) -> list[int]:
        tok = state.tokenizer
        try:
            if harmony.is_harmony(tok):
                text = harmony.prompt_text(tok, messages, reasoning_effort)
            else:
                text = tok.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as e:
            raise P.bad("messages", str(e)) from None
        return tok.encode(text, add_bos=False)

    def check_ids(ids: list[int], field_name: str) -> None:
        v = state.tokenizer.vocab_size
        for i in ids:
            if not 0 <= i < v:
                raise P.bad(field_name, f"token id {i} is outside the vocabulary (size {v})")

    def sampling_params(req: P.Request, n_prompt: int, prompt_field: str):
        from mpillm.serving.sampling import SamplingParams

        ctx = state.context_size
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

    # ---- running one request ------------------------------------------------------------------
    class Job:
        def __init__(self, request: Request, req: P.Request, prompt_ids: list[int], params):
            self.request, self.req = request, req
            self.fmt = P.Formatter(req, config.model_name)
            self.q: asyncio.Queue = asyncio.Queue()
            self.t0 = time.monotonic()
            self.deadline = self.t0 + config.request_timeout if config.request_timeout else None
            self.first_deadline = self.t0 + config.queue_timeout if config.queue_timeout else None
            self.t_last: float | None = None
            self.done = False
            self.handle = None
            self.watcher: asyncio.Task | None = None
            self.prompt_ids, self.params = prompt_ids, params
            self.text_parts: list[str] = []
            # a harmony model's chat reply: reasoning (analysis channel) apart from the answer (final)
            self.parser = (harmony.HarmonyParser(state.tokenizer)
                           if req.kind == "chat" and harmony.is_harmony(state.tokenizer) else None)

        def split(self, out) -> tuple[str, str]:
            """(answer text, reasoning text) an output adds."""
            if self.parser is None:
                return out.text, ""
            deltas = self.parser.feed_all(out.token_ids)
            if out.finish_reason is not None:
                deltas += self.parser.finish()
            return ("".join(d.text for d in deltas if d.channel == harmony.FINAL),
                    "".join(d.text for d in deltas if d.channel == harmony.ANALYSIS))

        def submit(self, service) -> None:
            from mpillm.serving.service import QueueFull

            loop = asyncio.get_running_loop()
            q = self.q

            def sink(out) -> None:           # engine thread
                try:
                    loop.call_soon_threadsafe(q.put_nowait, out)
                except RuntimeError:         # the event loop is closed: the server is going down
                    pass
            try:
                self.handle = service.submit(self.prompt_ids, self.params, sink)
            except QueueFull:
                raise P.APIError(503, "the server is busy: the request queue is full; retry later", "server_error",
                                 None, "queue_full", headers={"Retry-After": str(config.retry_after)}) from None
            except ValueError as e:
                raise P.bad("messages" if self.req.kind == "chat" else "prompt", str(e)) from None
            state.jobs.add(self)
            self.watcher = asyncio.ensure_future(self._watch_disconnect())

        async def _watch_disconnect(self) -> None:
            receive = self.request.receive
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    self.q.put_nowait(DISCONNECTED)
                    return

        async def next(self):
            """The next Output; DISCONNECTED; or APIError on a timeout (the request is cancelled)."""
            dl = self.deadline
            first = self.t_last is None
            if first and self.first_deadline is not None:
                dl = self.first_deadline if dl is None else min(dl, self.first_deadline)
            try:
                if dl is None:
                    item = await self.q.get()
                else:
                    item = await asyncio.wait_for(self.q.get(), max(dl - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                self.cancel()
                if first and self.first_deadline is not None and dl == self.first_deadline:
                    raise P.APIError(503, f"no slot became free within {config.queue_timeout:g} s; retry later",
                                     "server_error", None, "queue_timeout",
                                     headers={"Retry-After": str(config.retry_after)}) from None
                raise P.APIError(504, f"the request took longer than the server's limit of "
                                 f"{config.request_timeout:g} s", "server_error", None, "request_timeout") from None
            if item is DISCONNECTED:
                self.cancel()
                return item
            now = time.monotonic()
            if item.token_ids:
                if self.t_last is None:
                    metrics.ttft.observe(now - self.t0)
                else:
                    metrics.itl.observe((now - self.t_last) / len(item.token_ids))
                self.t_last = now
            elif self.t_last is None and item.finish_reason is None:
                self.t_last = now
            if item.finish_reason is not None:
                self.finish(item)
            return item

        def cancel(self) -> None:
            """Cancel the request unless it has finished; either way its response is over."""
            if not self.done and self.handle is not None:
                self.done = True
                state.service.cancel(self.handle.request_id)
            self.close()
            state.jobs.discard(self)

        def close(self) -> None:
            if self.watcher is not None:
                self.watcher.cancel()
                self.watcher = None

        def finish(self, out) -> None:
            self.done = True
            self.close()
            dur = time.monotonic() - self.t0
            metrics.duration.observe(dur)
            extra = ""
            if config.log_prompts:
                extra = f" prompt={state.tokenizer.decode(self.prompt_ids)!r} completion={''.join(self.text_parts)!r}"
            log.info("%s %s prompt=%d cached=%d completion=%d finish=%s %.2fs%s", self.fmt.id, self.req.kind,
                     out.prompt_tokens, out.cached_tokens, out.completion_tokens, out.finish_reason, dur, extra)

    def event_error(out) -> P.APIError:
        if out.finish_reason == "error":
            return P.APIError(503, out.error or "the engine failed", "server_error", None, "engine_error")
        return P.APIError(500, f"the request ended unexpectedly ({out.finish_reason})", "server_error")

    async def run_job(request: Request, req: P.Request, prompt_ids: list[int], prompt_field: str):
        service = service_or_503()
        params = sampling_params(req, len(prompt_ids), prompt_field)
        job = Job(request, req, prompt_ids, params)
        job.submit(service)
        try:
            first = await job.next()       # refusals before the first token keep their HTTP status
        except BaseException:
            job.cancel()
            raise
        if first is DISCONNECTED:
            return Response(status_code=499)
        if first.finish_reason in ("error", "cancelled"):
            raise event_error(first)
        if req.stream:
            return EventStream(stream_job(job, first))
        return await collect_job(job, first)

    async def collect_job(job: Job, out) -> Response | dict:
        text, reasoning, lps = [], [], []
        try:
            while True:
                answer, thought = job.split(out)
                text.append(answer)
                reasoning.append(thought)
                if out.logprobs:
                    lps.extend(out.logprobs)
                if out.finish_reason is not None:
                    break
                out = await job.next()
                if out is DISCONNECTED:
                    return Response(status_code=499)
        finally:
            job.cancel()
        if out.finish_reason not in ("stop", "length"):
            raise event_error(out)
        job.text_parts = text
        return job.fmt.final("".join(text), out.finish_reason, lps,
                             P.usage(out.prompt_tokens, out.completion_tokens, out.cached_tokens),
                             reasoning="".join(reasoning) if job.parser is not None else None)

    async def stream_job(job: Job, out):
        fmt = job.fmt
        try:
            head = fmt.first_chunk()
            if head is not None:
                yield P.sse(head)
            while True:
                if out is DISCONNECTED:
                    return
                if out.finish_reason is not None and out.finish_reason not in ("stop", "length"):
                    e = event_error(out)
                    yield P.sse(e.body())
                    return
                text, thought = job.split(out)
                if text or thought or (out.logprobs and job.req.logprobs):
                    job.text_parts.append(text)
                    yield P.sse(fmt.delta_chunk(text, out.logprobs, reasoning=thought))
                if out.finish_reason is not None:
                    yield P.sse(fmt.delta_chunk("", None, out.finish_reason))
                    if job.req.include_usage:
                        yield P.sse(fmt.usage_chunk(P.usage(out.prompt_tokens, out.completion_tokens,
                                                            out.cached_tokens)))
                    yield P.SSE_DONE
                    return
                try:
                    out = await job.next()
                except P.APIError as e:
                    yield P.sse(e.body())
                    return
        finally:
            job.cancel()

    # ---- routes ---------------------------------------------------------------------------------
    @api
    async def chat_completions(request: Request):
        body = P.parse_json_body(await read_body(request))
        req, messages = P.parse_chat(body)
        check_model(req.model)
        service_or_503()
        return await run_job(request, req, chat_prompt_ids(messages, req.reasoning_effort), "messages")

    @api
    async def completions(request: Request):
        body = P.parse_json_body(await read_body(request))
        req = P.parse_completion(body)
        check_model(req.model)
        service_or_503()
        if req.prompt_ids is not None:
            check_ids(req.prompt_ids, "prompt")
            ids = req.prompt_ids
        else:
            ids = state.tokenizer.encode(req.prompt_text)
        return await run_job(request, req, ids, "prompt")

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": state.started, "owned_by": "mpillm",
                "max_model_len": state.context_size or None}

    @api
    async def models(request: Request):
        return {"object": "list", "data": [model_card()]}

    @api
    async def model_detail(request: Request):
        check_model(request.path_params["model"])
        return model_card()

    @api
    async def tokenize(request: Request):
        body = P.parse_tokenize(P.parse_json_body(await read_body(request)))
        service_or_503()
        tok = state.tokenizer
        if "prompt" in body:
            ids = tok.encode(body["prompt"], add_bos=None if body["add_special_tokens"] else False)
        else:
            if harmony.is_harmony(tok) and body["add_generation_prompt"]:
                ids = chat_prompt_ids(body["messages"])
            else:
                try:
                    text = tok.apply_chat_template(body["messages"],
                                                   add_generation_prompt=body["add_generation_prompt"])
                except ValueError as e:
                    raise P.bad("messages", str(e)) from None
                ids = tok.encode(text, add_bos=False)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.context_size}

    @api
    async def detokenize(request: Request):
        body = P.parse_json_body(await read_body(request))
        service_or_503()
        ids = P.parse_detokenize(body, state.tokenizer.vocab_size)
        return {"prompt": state.tokenizer.decode(ids)}

    async def health(request: Request):
        if state.failed:
            return JSONResponse({"status": "failed", "error": state.failed}, status_code=503)
        if state.service is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
        return JSONResponse({"status": "ok", "model": config.model_name, "ranks": state.world_size,
                             "slots": state.service.metrics().get("slots_total")})

    @api
    async def metrics_route(request: Request):
        metrics.service = state.service   # not only from the once-a-second sampler: a scrape right after ready sees it
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def page(request: Request):
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP,
                                                           "X-Content-Type-Options": "nosniff",
                                                           "Cache-Control": "no-cache"})

    async def not_found(request: Request, exc: HTTPException):
        status = exc.status_code
        msg = {404: f"no route {request.method} {request.url.path[:200]}",
               405: f"method {request.method} is not allowed on {request.url.path[:200]}"}.get(status, str(exc.detail))
        metrics.responses.labels("other", str(status)).inc()
        return JSONResponse(P.error_object(msg, "invalid_request_error", None, "not_found" if status == 404 else None),
                            status_code=status, headers=getattr(exc, "headers", None))

    async def server_error(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(P.error_object(f"internal server error: {type(exc).__name__}", "server_error"),
                            status_code=500)

    async def sample_metrics():
        while True:
            metrics.service = state.service
            metrics.sample()
            await asyncio.sleep(1.0)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        state.loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(sample_metrics())
        try:
            yield
        finally:
            task.cancel()

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model_detail, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_route, methods=["GET"]),
        Route("/", page, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = []
    if config.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=config.cors_origins,
                                     allow_methods=["GET", "POST", "OPTIONS"],
                                     allow_headers=["Authorization", "Content-Type"], max_age=600))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={HTTPException: not_found, Exception: server_error})
    app.state.metrics = metrics
    app.state.mpillm = state
    return app


class EventStream:
    """A ``text/event-stream`` response from an async iterator of bytes; a send to a client that is
    gone ends it (the iterator's ``finally`` cancels the request)."""

    headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]

    def __init__(self, body):
        self.body = body
        self.status_code = 200

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            async for chunk in self.body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass                     # the client went away
        finally:
            await self.body.aclose()
