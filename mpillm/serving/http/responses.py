"""A submitted ``Job``'s outputs as an HTTP response: one OpenAI JSON body, or a server-sent
event stream. Either way the job is cancelled when the response ends early (client gone, error)."""
from __future__ import annotations

from starlette.responses import Response

from mpillm.serving.http import protocol as P
from mpillm.serving.http.jobs import DISCONNECTED, Job


def event_error(out) -> P.APIError:
    """The error an output that ended neither with "stop" nor "length" stands for."""
    if out.finish_reason == "error":
        return P.APIError(503, out.error or "the engine failed", "server_error", None, "engine_error")
    return P.APIError(500, f"the request ended unexpectedly ({out.finish_reason})", "server_error")


async def first_output(job: Job):
    """The job's first output, or DISCONNECTED when the client left first; an output that failed
    before its first token is raised as its HTTP error (a refusal keeps its status)."""
    try:
        first = await job.next()
    except BaseException:
        job.cancel()
        raise
    if first is not DISCONNECTED and first.finish_reason in ("error", "cancelled"):
        raise event_error(first)
    return first


async def respond(job: Job):
    """Wait for the job's first output, then answer: refusals before the first token keep their
    HTTP status; after it, a stream reports errors as events."""
    first = await first_output(job)
    if first is DISCONNECTED:
        return Response(status_code=499)
    if job.req.stream:
        return EventStream(stream(job, first))
    return await collect(job, first)


async def collect(job: Job, out) -> Response | dict:
    """The whole completion as one JSON body (a dict), or 499 if the client went away."""
    text, reasoning, lps = [], [], []
    try:
        while True:
            answer, thought, _ = job.split(out)
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
                         reasoning="".join(reasoning) if job.reasoning else None, tool_calls=job.tool_calls())


async def stream(job: Job, out):
    """The completion as SSE chunks (bytes), ending with ``data: [DONE]`` or an error event."""
    fmt = job.fmt
    try:
        head = fmt.first_chunk()
        if head is not None:
            yield P.sse(head)
        while True:
            if out is DISCONNECTED:
                return
            if out.finish_reason is not None and out.finish_reason not in ("stop", "length"):
                yield P.sse(event_error(out).body())
                return
            text, thought, calls = job.split(out)
            if text or thought or (out.logprobs and job.req.logprobs):
                job.text_parts.append(text)
                yield P.sse(fmt.delta_chunk(text, out.logprobs, reasoning=thought))
            if calls:
                yield P.sse(fmt.tool_chunk(calls))
            if out.finish_reason is not None:
                finish = "tool_calls" if out.finish_reason == "stop" and job.tool_calls() else out.finish_reason
                yield P.sse(fmt.delta_chunk("", None, finish))
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
