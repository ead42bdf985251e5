"""The bridge between the engine thread and the HTTP event loop: one ``Job`` per request.

``Job.submit`` hands the prompt to ``Service.submit`` with a sink that the engine thread calls
for each ``Output``; the sink moves it onto the job's ``asyncio.Queue`` with
``loop.call_soon_threadsafe``. ``Job.next`` reads that queue under the request's deadlines. A
client that goes away puts ``DISCONNECTED`` on the queue, and ``Job.cancel`` turns it into
``Service.cancel`` (the slot is free at the next engine step). ``end_all`` ends every open job
from any thread when the engine has failed.
"""
from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace
from typing import Any

from starlette.requests import Request

from mpillm.serving import harmony, tools
from mpillm.serving.http import protocol as P
from mpillm.serving.http.metrics import Metrics

log = logging.getLogger("mpillm.serve")
DISCONNECTED = object()   # put on a request's queue when its client goes away


def end_all(loop: asyncio.AbstractEventLoop | None, jobs: set, message: str) -> None:
    """Thread-safe: put an error output carrying ``message`` on the queue of every job in ``jobs``
    (from ``loop``'s thread, which owns the queues); nothing if the loop is not running."""
    item = SimpleNamespace(request_id="", token_ids=[], text="", logprobs=None, finish_reason="error",
                           error=message, prompt_tokens=0, completion_tokens=0, cached_tokens=0)

    def push() -> None:
        for job in list(jobs):
            job.q.put_nowait(item)
    if loop is not None:
        try:
            loop.call_soon_threadsafe(push)
        except RuntimeError:
            pass


class Job:
    """One request between ``Service.submit`` and the end of its response.

    ``config`` is the server's ``ServerConfig`` (model name, timeouts, logging), ``state`` its
    ``State`` (service, tokenizer, the set of open jobs), ``metrics`` the latency histograms."""

    def __init__(self, request: Request, req: P.Request, prompt_ids: list[int], params: Any, *,
                 config: Any, state: Any, metrics: Metrics, constraint: Any = None, call_format: str | None = None):
        self.request, self.req = request, req
        self.config, self.state, self.metrics = config, state, metrics
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
        self.constraint = constraint      # mpillm.serving.grammar.Constraint or None
        # tool calls in the reply, found as it streams (call_format: mpillm.serving.tools' formats)
        self.calls = tools.CallStream(call_format) if call_format is not None else None
        # a harmony model's chat reply: reasoning (analysis channel) apart from the answer (final)
        self.parser = (harmony.HarmonyParser(state.tokenizer)
                       if req.kind in ("chat", "response") and harmony.is_harmony(state.tokenizer) and self.calls is None
                       else None)
        self.reasoning = self.parser is not None or call_format == tools.HARMONY

    def split(self, out) -> tuple[str, str, list]:
        """(answer text, reasoning text, tool-call pieces) an output adds."""
        if self.calls is not None:
            text, deltas = self.calls.feed(out.text)
            if out.finish_reason is not None:
                more, late = self.calls.finish()
                text, deltas = text + more, deltas + late
            return text, self.calls.take_reasoning(), deltas
        if self.parser is None:
            return out.text, "", []
        deltas = self.parser.feed_all(out.token_ids)
        if out.finish_reason is not None:
            deltas += self.parser.finish()
        return ("".join(d.text for d in deltas if d.channel == harmony.FINAL),
                "".join(d.text for d in deltas if d.channel == harmony.ANALYSIS), [])

    def tool_calls(self) -> list[dict] | None:
        """The reply's tool calls in OpenAI's shape (once it is complete), None without tools."""
        return (self.calls.calls() or None) if self.calls is not None else None

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
            if self.constraint is None:
                self.handle = service.submit(self.prompt_ids, self.params, sink)
            else:
                self.handle = service.submit(self.prompt_ids, self.params, sink, constraint=self.constraint)
        except QueueFull:
            raise P.APIError(503, "the server is busy: the request queue is full; retry later", "server_error",
                             None, "queue_full", headers={"Retry-After": str(self.config.retry_after)}) from None
        except ValueError as e:
            raise P.bad({"chat": "messages", "response": "input"}.get(self.req.kind, "prompt"), str(e)) from None
        self.state.jobs.add(self)
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
            queued = first and self.first_deadline is not None and dl == self.first_deadline
            raise self._timeout_error(queued) from None
        if item is DISCONNECTED:
            self.cancel()
            return item
        self._observe(item)
        if item.finish_reason is not None:
            self.finish(item)
        return item

    def _timeout_error(self, queued: bool) -> P.APIError:
        """503 when no token came before the queue timeout, 504 when the whole request ran too long."""
        if queued:
            return P.APIError(503, f"no slot became free within {self.config.queue_timeout:g} s; retry later",
                              "server_error", None, "queue_timeout",
                              headers={"Retry-After": str(self.config.retry_after)})
        return P.APIError(504, f"the request took longer than the server's limit of "
                          f"{self.config.request_timeout:g} s", "server_error", None, "request_timeout")

    def _observe(self, item) -> None:
        """Time to first token and inter-token latency."""
        now = time.monotonic()
        if item.token_ids:
            if self.t_last is None:
                self.metrics.ttft.observe(now - self.t0)
            else:
                self.metrics.itl.observe((now - self.t_last) / len(item.token_ids))
            self.t_last = now
        elif self.t_last is None and item.finish_reason is None:
            self.t_last = now

    def cancel(self) -> None:
        """Cancel the request unless it has finished; either way its response is over."""
        if not self.done and self.handle is not None:
            self.done = True
            self.state.service.cancel(self.handle.request_id)
        self.close()
        self.state.jobs.discard(self)

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
            self.watcher = None

    def finish(self, out) -> None:
        self.done = True
        self.close()
        dur = time.monotonic() - self.t0
        self.metrics.duration.observe(dur)
        extra = ""
        if self.config.log_prompts:
            extra = (f" prompt={self.state.tokenizer.decode(self.prompt_ids)!r}"
                     f" completion={''.join(self.text_parts)!r}")
        log.info("%s %s prompt=%d cached=%d completion=%d finish=%s %.2fs%s", self.fmt.id, self.req.kind,
                 out.prompt_tokens, out.cached_tokens, out.completion_tokens, out.finish_reason, dur, extra)
