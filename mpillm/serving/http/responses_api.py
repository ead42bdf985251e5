"""OpenAI's Responses API (``POST /v1/responses``), stateless: its wire format over the same
request, job and tool-call machinery as chat completions.

``parse`` turns a request (``input`` as a string or items, ``instructions``, flat ``tools``,
``text.format``) into the chat path's ``Request`` and messages; ``respond`` answers a submitted
``Job`` with a response object or its event stream (``response.created``, ``...output_text.delta``,
``...function_call_arguments.delta``, ``response.completed``, with the item events between).
Nothing is stored: ``previous_response_id`` and ``conversation`` are refused by name.
"""
from __future__ import annotations

import json
import secrets
import time
from typing import Any

from starlette.responses import Response

from mpillm.serving.http import protocol as P
from mpillm.serving.http.jobs import DISCONNECTED, Job
from mpillm.serving.http.responses import EventStream, event_error, first_output

FIELDS = {"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "text", "temperature",
          "top_p", "max_output_tokens", "stream", "store", "metadata", "user", "reasoning", "truncation", "include",
          "previous_response_id", "conversation", "background", "service_tier", "stream_options", "top_logprobs",
          "prompt_cache_key", "safety_identifier", "max_tool_calls"}
STATEFUL = ("previous_response_id", "conversation", "background")


def _new(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def _content_text(c: Any, field: str) -> str:
    if isinstance(c, str):
        return P._text(c, field)
    if not isinstance(c, list):
        raise P.bad(field, f"{field} must be a string or an array of content parts")
    out = []
    for i, part in enumerate(c):
        f = f"{field}[{i}]"
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
            t = part.get("type") if isinstance(part, dict) else None
            raise P.bad(f"{f}.type", f"{f}.type {str(t)[:40]!r} is not supported (input_text, output_text)",
                        "unsupported_value")
        out.append(P._text(part.get("text"), f"{f}.text"))
    return "".join(out)


def input_messages(v: Any, instructions: str | None) -> list[dict]:
    """``input`` -> the chat path's messages; consecutive function_call items become one
    assistant message with tool_calls, function_call_output items tool messages."""
    msgs: list[dict] = [{"role": "system", "content": instructions}] if instructions else []
    if isinstance(v, str):
        return msgs + [{"role": "user", "content": P._text(v, "input")}]
    if not isinstance(v, list) or not v:
        raise P.bad("input", "input must be a string or a non-empty array of items")
    for i, it in enumerate(v):
        f = f"input[{i}]"
        if not isinstance(it, dict):
            raise P.bad(f, f"{f} must be an object")
        kind = it.get("type", "message")
        if kind == "message":
            role = it.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise P.bad(f"{f}.role", f"{f}.role must be user, system, developer or assistant")
            msgs.append({"role": "system" if role == "developer" else role,
                         "content": _content_text(it.get("content"), f"{f}.content")})
        elif kind == "function_call":
            call = {"id": P._text(it.get("call_id") or "", f"{f}.call_id"),
                    "name": P._tool_name(it.get("name"), f"{f}.name"),
                    "arguments": P._text(it.get("arguments", "{}"), f"{f}.arguments")}
            if msgs and msgs[-1]["role"] == "assistant" and msgs[-1].get("tool_calls") is not None:
                msgs[-1]["tool_calls"].append(call)
            else:
                msgs.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            out = it.get("output")
            msgs.append({"role": "tool", "tool_call_id": P._text(it.get("call_id"), f"{f}.call_id"),
                         "content": out if isinstance(out, str) else _content_text(out, f"{f}.output")})
        elif kind == "reasoning":
            continue                     # earlier reasoning is not part of the next prompt
        else:
            raise P.bad(f"{f}.type", f"{f}.type {str(kind)[:40]!r} is not supported (message, function_call, "
                        "function_call_output)", "unsupported_value")
    return msgs


def parse(body: dict) -> tuple[P.Request, list[dict]]:
    unknown = sorted(k for k in body if k not in FIELDS)
    if unknown:
        raise P.bad(unknown[0], f"unrecognized request field: {unknown[0]}")
    for f in STATEFUL:
        if body.get(f) not in (None, False):
            raise P.bad(f, f"{f} is not supported: this server keeps no state between responses (send the "
                        "whole conversation in input)", "unsupported_value")
    if body.get("input") is None:
        raise P.bad("input", "input is required")
    instructions = None if body.get("instructions") is None else P._text(body["instructions"], "instructions")
    messages = input_messages(body["input"], instructions)
    tools = P.parse_tools(body, flat=True)
    choice = P.parse_tool_choice(body.get("tool_choice"), tools, flat=True)
    text = body.get("text") or {}
    if not isinstance(text, dict):
        raise P.bad("text", "text must be an object")
    fmt = P.parse_response_format(text.get("format"), "text.format", flat=True)
    if fmt is not None and tools and choice != "none":
        raise P.bad("text.format", "text.format together with tools is not supported", "unsupported_value")
    reasoning = body.get("reasoning") or {}
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    if effort not in (None, *P.REASONING_EFFORTS):
        raise P.bad("reasoning.effort", f"reasoning.effort must be one of {', '.join(P.REASONING_EFFORTS)}")
    stream = P.get_bool(body, "stream")
    sampling, max_tokens = P._sampling({k: body.get(k) for k in ("temperature", "top_p")},
                                       ())
    max_tokens = P.get_int(body, "max_output_tokens", 1, P.INT64_MAX)
    req = P.Request("response", None, None, sampling, max_tokens, stream, False, False, 0, P._model(body), effort,
                    tools, choice, P.get_bool(body, "parallel_tool_calls", True), fmt)
    req.extra = {"instructions": instructions, "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice"),
                 "text": text or {"format": {"type": "text"}}, "metadata": body.get("metadata") or {},
                 "temperature": body.get("temperature"), "top_p": body.get("top_p"),
                 "max_output_tokens": body.get("max_output_tokens")}
    return req, messages


# ---------------------------------------------------------------------------------------------
# output


class Builder:
    """The response object of one request and the events that build it."""

    def __init__(self, req: P.Request, model: str):
        self.req, self.model = req, model
        self.id = _new("resp_")
        self.created = int(time.time())
        self.output: list[dict] = []
        self.seq = 0
        self.msg: dict | None = None          # the open message item (text streams into it)
        self.reason: dict | None = None
        self.calls: dict[int, dict] = {}      # tool-call index -> its function_call item

    def obj(self, status: str, usage: dict | None = None, incomplete: str | None = None) -> dict:
        x = self.req.extra
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "model": self.model, "output": self.output, "error": None,
                "incomplete_details": {"reason": incomplete} if incomplete else None,
                "instructions": x["instructions"], "metadata": x["metadata"], "tools": x["tools"],
                "tool_choice": x["tool_choice"] or "auto", "parallel_tool_calls": self.req.parallel_tool_calls,
                "temperature": x["temperature"], "top_p": x["top_p"], "max_output_tokens": x["max_output_tokens"],
                "text": x["text"], "previous_response_id": None, "reasoning": None, "store": False,
                "truncation": "disabled", "usage": usage}

    def event(self, kind: str, **kw) -> bytes:
        d = {"type": kind, "sequence_number": self.seq, **kw}
        self.seq += 1
        data = json.dumps(d, ensure_ascii=False, separators=(",", ":"))
        return f"event: {kind}\ndata: {data}\n\n".encode("utf-8")

    # ---- pieces as they come; each returns the events it makes
    def text(self, delta: str) -> list[bytes]:
        ev = []
        if self.msg is None:
            self.msg = {"type": "message", "id": _new("msg_"), "status": "in_progress", "role": "assistant",
                        "content": []}
            self.output.append(self.msg)
            ev.append(self.event("response.output_item.added", output_index=len(self.output) - 1,
                                 item=dict(self.msg, content=[])))
            self.msg["content"].append({"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            ev.append(self.event("response.content_part.added", item_id=self.msg["id"],
                                 output_index=len(self.output) - 1, content_index=0,
                                 part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}))
        self.msg["content"][0]["text"] += delta
        ev.append(self.event("response.output_text.delta", item_id=self.msg["id"],
                             output_index=self.output.index(self.msg), content_index=0, delta=delta, logprobs=[]))
        return ev

    def reasoning(self, delta: str) -> list[bytes]:
        ev = []
        if self.reason is None:
            self.reason = {"type": "reasoning", "id": _new("rs_"), "summary": [],
                           "content": [{"type": "reasoning_text", "text": ""}]}
            self.output.append(self.reason)
            ev.append(self.event("response.output_item.added", output_index=len(self.output) - 1,
                                 item=dict(self.reason, content=[])))
        self.reason["content"][0]["text"] += delta
        ev.append(self.event("response.reasoning_text.delta", item_id=self.reason["id"],
                             output_index=self.output.index(self.reason), content_index=0, delta=delta))
        return ev

    def call(self, d) -> list[bytes]:
        ev = []
        if d.id is not None:
            item = {"type": "function_call", "id": _new("fc_"), "call_id": d.id, "name": d.name, "arguments": "",
                    "status": "in_progress"}
            self.calls[d.index] = item
            self.output.append(item)
            ev.append(self.event("response.output_item.added", output_index=len(self.output) - 1, item=dict(item)))
        item = self.calls[d.index]
        if d.arguments:
            item["arguments"] += d.arguments
            ev.append(self.event("response.function_call_arguments.delta", item_id=item["id"],
                                 output_index=self.output.index(item), delta=d.arguments))
        return ev

    def close(self) -> list[bytes]:
        """The done events of every item, in output order."""
        ev = []
        for i, item in enumerate(self.output):
            item["status"] = "completed"
            if item is self.msg:
                part = item["content"][0]
                ev.append(self.event("response.output_text.done", item_id=item["id"], output_index=i,
                                     content_index=0, text=part["text"], logprobs=[]))
                ev.append(self.event("response.content_part.done", item_id=item["id"], output_index=i,
                                     content_index=0, part=part))
            elif item["type"] == "function_call":
                ev.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                                     name=item["name"], arguments=item["arguments"]))
            elif item is self.reason:
                item.pop("status", None)
                ev.append(self.event("response.reasoning_text.done", item_id=item["id"], output_index=i,
                                     content_index=0, text=item["content"][0]["text"]))
            ev.append(self.event("response.output_item.done", output_index=i, item=item))
        return ev


def usage(out) -> dict:
    return {"input_tokens": out.prompt_tokens, "input_tokens_details": {"cached_tokens": out.cached_tokens},
            "output_tokens": out.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": out.prompt_tokens + out.completion_tokens}


def _feed(b: Builder, job: Job, out) -> list[bytes]:
    text, thought, calls = job.split(out)
    ev = []
    if thought:
        ev += b.reasoning(thought)
    if text and (b.msg is not None or text.strip() or not calls):
        ev += b.text(text)
    for d in calls:
        ev += b.call(d)
    return ev


def _status(out) -> tuple[str, str | None]:
    return ("incomplete", "max_output_tokens") if out.finish_reason == "length" else ("completed", None)


async def respond(job: Job):
    """The Responses API's answer to a submitted job: a response object or its event stream."""
    first = await first_output(job)
    if first is DISCONNECTED:
        return Response(status_code=499)
    b = Builder(job.req, job.config.model_name)
    if job.req.stream:
        return EventStream(_stream(job, b, first))
    out = first
    try:
        while True:
            _feed(b, job, out)
            if out.finish_reason is not None:
                break
            out = await job.next()
            if out is DISCONNECTED:
                return Response(status_code=499)
    finally:
        job.cancel()
    if out.finish_reason not in ("stop", "length"):
        raise event_error(out)
    b.close()
    status, why = _status(out)
    return b.obj(status, usage(out), why)


async def _stream(job: Job, b: Builder, out):
    try:
        yield b.event("response.created", response=b.obj("in_progress"))
        yield b.event("response.in_progress", response=b.obj("in_progress"))
        while True:
            if out is DISCONNECTED:
                return
            if out.finish_reason is not None and out.finish_reason not in ("stop", "length"):
                yield b.event("response.failed", response=dict(b.obj("failed"), error={
                    "code": "server_error", "message": event_error(out).message}))
                return
            for e in _feed(b, job, out):
                yield e
            if out.finish_reason is not None:
                for e in b.close():
                    yield e
                status, why = _status(out)
                kind = "response.completed" if status == "completed" else "response.incomplete"
                yield b.event(kind, response=b.obj(status, usage(out), why))
                return
            try:
                out = await job.next()
            except P.APIError as e:
                yield b.event("error", code=e.code, message=e.message, param=e.param)
                return
    finally:
        job.cancel()
