"""The HTTP app (Starlette): OpenAI routes, the chat page, health, metrics, tokenize.

It runs on rank 0 in uvicorn's thread and never touches MPI: a request is validated
(``routes``), tokenized, and handed to ``Service.submit`` with a sink that moves each ``Output``
from the engine thread onto this event loop (``jobs``); its outputs become a JSON body or an
event stream (``responses``). A client that goes away becomes ``Service.cancel`` (its slot is
free at the next engine step). This module only wires them together.
"""
from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from mpillm.serving.http.jobs import end_all
from mpillm.serving.http.metrics import Metrics
from mpillm.serving.http.routes import Handlers

log = logging.getLogger("mpillm.serve")
STATIC = Path(__file__).resolve().parent / "static"


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
        end_all(self.loop, self.jobs, message)
        deadline = time.monotonic() + wait
        while self.jobs and time.monotonic() < deadline:
            time.sleep(0.02)
        if wait:
            time.sleep(min(0.2, wait))      # the last bytes of responses already complete


def routes(h: Handlers) -> list:
    return [
        Route("/v1/chat/completions", h.chat_completions, methods=["POST"]),
        Route("/v1/completions", h.completions, methods=["POST"]),
        Route("/v1/responses", h.responses, methods=["POST"]),
        Route("/v1/models", h.models, methods=["GET"]),
        Route("/v1/models/{model:path}", h.model_detail, methods=["GET"]),
        Route("/tokenize", h.tokenize, methods=["POST"]),
        Route("/detokenize", h.detokenize, methods=["POST"]),
        Route("/health", h.health, methods=["GET"]),
        Route("/metrics", h.metrics_route, methods=["GET"]),
        Route("/", h.page, methods=["GET"]),
        Mount("/static", StaticFiles(directory=h.static), name="static"),
    ]


def lifespan(state: State, metrics: Metrics):
    """The app's lifespan: note the event loop (``State.fail`` posts to it) and sample the service's
    gauges once a second while the server runs."""
    async def sample_metrics():
        while True:
            metrics.service = state.service
            metrics.sample()
            await asyncio.sleep(1.0)

    @asynccontextmanager
    async def run(app):
        state.loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(sample_metrics())
        try:
            yield
        finally:
            task.cancel()
    return run


def create_app(config: ServerConfig, state: State) -> Starlette:
    metrics = Metrics()
    h = Handlers(config, state, metrics, STATIC)
    middleware = []
    if config.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=config.cors_origins,
                                     allow_methods=["GET", "POST", "OPTIONS"],
                                     allow_headers=["Authorization", "Content-Type"], max_age=600))
    app = Starlette(routes=routes(h), middleware=middleware, lifespan=lifespan(state, metrics),
                    exception_handlers={HTTPException: h.not_found, Exception: h.server_error})
    app.state.metrics = metrics
    app.state.mpillm = state
    return app
