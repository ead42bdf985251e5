"""The OpenAI wire format: request validation, response objects, server-sent events, errors.

Pure functions and small classes, no HTTP framework and no MPI: ``app.py`` calls them.
Every refusal is an ``APIError`` that becomes OpenAI's error object
``{"error": {"message", "type", "param", "code"}}`` with an HTTP status; a validation
error names the field (``param``) and what is wrong with it.
"""
from __future__ import annotations

import json
import math
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

# Python's json raises RecursionError on deeply nested input; refuse nesting far below that.
MAX_JSON_DEPTH = 64
MAX_STOP = 8            # stop strings per request (OpenAI allows 4)
MAX_STOP_LEN = 256      # characters per stop string
INT64_MAX = 2**63 - 1


class APIError(Exception):
    """A refused request: HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_object(self.message, self.type, self.param, self.code)


def error_object(message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---------------------------------------------------------------------------------------------
# JSON body


def _depth_ok(obj: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if d > limit:
            return False
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return True


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    if not raw:
        raise bad(None, "the request body is empty: expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(None, f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise bad(None, "the request body is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, integers with too many digits
        raise bad(None, f"the request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise bad(None, f"the request body must be a JSON object, not {_json_type(obj)}")
    if not _depth_ok(obj):
        raise bad(None, f"the request body is nested more than {MAX_JSON_DEPTH} levels deep")
    return obj


# JSON's name for each type json.loads makes; bool before int (a bool is an int to isinstance)
_JSON_TYPES = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
               (list, "an array"), (dict, "an object"))


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    return next((name for t, name in _JSON_TYPES if isinstance(v, t)), type(v).__name__)


# ---------------------------------------------------------------------------------------------
# typed field readers: each names the field and the allowed range


def _text(v: Any, field: str) -> str:
    if not isinstance(v, str):
        raise bad(field, f"{field} must be a string, not {_json_type(v)}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(field, f"{field} contains an unpaired UTF-16 surrogate (\\ud800-\\udfff)") from None
    return v


def get_int(body: dict, field: str, lo: int, hi: int, default: int | None = None) -> int | None:
    v = body.get(field)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise bad(field, f"{field} must be an integer, not {_json_type(v)}")
    v = int(v)
    if not lo <= v <= hi:
        raise bad(field, f"{field} must be in [{lo}, {hi}], got {v}")
    return v


def get_float(body: dict, field: str, lo: float, hi: float, default: float | None = None,
              lo_open: bool = False) -> float | None:
    v = body.get(field)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(field, f"{field} must be a number, not {_json_type(v)}")
    v = float(v)
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        raise bad(field, f"{field} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v:g}")
    return v


def get_bool(body: dict, field: str, default: bool = False) -> bool:
    v = body.get(field)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(field, f"{field} must be a boolean, not {_json_type(v)}")
    return v


def get_stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list):
        raise bad("stop", f"stop must be a string or an array of strings, not {_json_type(v)}")
    if len(items) > MAX_STOP:
        raise bad("stop", f"stop holds at most {MAX_STOP} strings, got {len(items)}")
    out = []
    for i, s in enumerate(items):
        s = _text(s, f"stop[{i}]" if isinstance(v, list) else "stop")
        if not s:
            raise bad("stop", "stop strings must not be empty")
        if len(s) > MAX_STOP_LEN:
            raise bad("stop", f"a stop string is at most {MAX_STOP_LEN} characters, got {len(s)}")
        out.append(s)
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# requests

# Fields the server reads; fields that OpenAI clients commonly send and that change nothing here
# (refused only when set to something the server cannot do); anything else is refused by name.
SAMPLING_FIELDS = {"max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "ignore_eos", "stream", "stream_options", "model",
                   "n", "user", "metadata", "store", "service_tier", "logit_bias"}
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools",
                                 "tool_choice", "functions", "function_call", "parallel_tool_calls",
                                 "response_format", "reasoning_effort", "modalities"}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "logprobs", "echo", "suffix", "best_of"}


@dataclass
class Request:
    """A validated request: what the service needs plus how to answer."""
    kind: str                          # "chat", "completion" or "response" (the Responses API)
    prompt_text: str | None            # None when the prompt came as token ids
    prompt_ids: list[int] | None       # set for a token-id prompt (completions)
    sampling: dict                     # keyword arguments of SamplingParams
    max_tokens: int | None             # None: until the context is full
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    model: str | None
    reasoning_effort: str | None = None
    tools: list[dict] | None = None    # [{"name", "description", "parameters"}]
    tool_choice: str = "auto"          # "auto" | "none" | "required" | the name of a function to call
    parallel_tool_calls: bool = True
    response_format: dict | None = None  # {"type": "json_object"} | {"type": "json_schema", "schema", "name"}
    extra: dict | None = None          # what a Responses API answer echoes back (responses_api)


def _check_unknown(body: dict, allowed: set[str]) -> None:
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise bad(unknown[0], f"unrecognized request field: {unknown[0]}"
                  + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))


def _check_unsupported(body: dict) -> None:
    n = get_int(body, "n", 1, 128, 1)
    if n != 1:
        raise bad("n", f"n must be 1: this server returns one choice per request (got {n})", "unsupported_value")
    if body.get("best_of") not in (None, 1):
        raise bad("best_of", "best_of must be 1 (or left out)", "unsupported_value")
    for field in ("functions", "function_call"):
        if body.get(field) not in (None, [], "none", "auto"):
            raise bad(field, f"{field} (the deprecated function-calling API) is not supported: use tools and "
                      "tool_choice", "unsupported_value")
    lb = body.get("logit_bias")
    if lb not in (None, {}):
        raise bad("logit_bias", "logit_bias is not supported by this server", "unsupported_value")
    mods = body.get("modalities")
    if mods not in (None, ["text"]):
        raise bad("modalities", "only the text modality is supported", "unsupported_value")
    if body.get("echo") not in (None, False):
        raise bad("echo", "echo is not supported by this server", "unsupported_value")
    if body.get("suffix") not in (None, ""):
        raise bad("suffix", "suffix (insertion) is not supported by this server", "unsupported_value")
    for field in ("user", "reasoning_effort", "service_tier"):
        if body.get(field) is not None:
            _text(body[field], field)
    if body.get("reasoning_effort") not in (None, *REASONING_EFFORTS):
        raise bad("reasoning_effort", f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got "
                  f"{body['reasoning_effort'][:40]!r}", "unsupported_value")
    if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
        raise bad("metadata", f"metadata must be an object, not {_json_type(body['metadata'])}")
    if body.get("store") is not None:
        get_bool(body, "store")
    if body.get("parallel_tool_calls") is not None:
        get_bool(body, "parallel_tool_calls")


def _sampling(body: dict, max_tokens_fields: tuple[str, ...]) -> tuple[dict, int | None]:
    max_tokens = None
    for f in max_tokens_fields:
        v = get_int(body, f, 1, INT64_MAX)
        if v is not None:
            max_tokens = v if max_tokens is None else min(max_tokens, v)
    top_k = get_int(body, "top_k", -1, 1 << 30, 0)
    kw = dict(
        temperature=get_float(body, "temperature", 0.0, 2.0, 1.0),
        top_p=get_float(body, "top_p", 0.0, 1.0, 1.0, lo_open=True),
        top_k=max(top_k, 0),                       # -1 (vLLM, llama.cpp) and 0 both mean off
        min_p=get_float(body, "min_p", 0.0, 1.0, 0.0),
        seed=_seed(get_int(body, "seed", -INT64_MAX - 1, 2**64 - 1)),
        presence_penalty=get_float(body, "presence_penalty", -2.0, 2.0, 0.0),
        frequency_penalty=get_float(body, "frequency_penalty", -2.0, 2.0, 0.0),
        repetition_penalty=get_float(body, "repetition_penalty", 0.0, 10.0, 1.0, lo_open=True),
        stop=get_stop(body),
        ignore_eos=get_bool(body, "ignore_eos"),
    )
    return kw, max_tokens


def _seed(v: int | None) -> int | None:
    """OpenAI's seed is a signed 64-bit integer; the sampler takes its two's-complement bits."""
    return None if v is None else v % 2**64


def _stream_options(body: dict, stream: bool) -> bool:
    so = body.get("stream_options")
    if so is None:
        return False
    if not isinstance(so, dict):
        raise bad("stream_options", f"stream_options must be an object, not {_json_type(so)}")
    if not stream:
        raise bad("stream_options", "stream_options is only allowed when stream is true")
    unknown = sorted(set(so) - {"include_usage", "continuous_usage_stats", "include_obfuscation"})
    if unknown:
        raise bad(f"stream_options.{unknown[0]}", f"unrecognized field stream_options.{unknown[0]}")
    return get_bool(so, "include_usage")


def _model(body: dict) -> str | None:
    m = body.get("model")
    return None if m is None else _text(m, "model")


def message_text(content: Any, field: str) -> str:
    """A message's content: a string, or an array of text parts."""
    if isinstance(content, str):
        return _text(content, field)
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            f = f"{field}[{i}]"
            if not isinstance(part, dict):
                raise bad(f, f"{f} must be an object with type 'text', not {_json_type(part)}")
            if part.get("type") != "text":
                raise bad(f"{f}.type", f"{f}.type {part.get('type')!r} is not supported (only 'text' parts)",
                          "unsupported_value")
            parts.append(_text(part.get("text"), f"{f}.text"))
        return "".join(parts)
    raise bad(field, f"{field} must be a string or an array of text parts, not {_json_type(content)}")


ROLES = {"system", "developer", "user", "assistant", "tool"}
REASONING_EFFORTS = ("low", "medium", "high")   # harmony's levels (gpt-oss); other models ignore the field
MAX_TOOLS = 128
MAX_SCHEMA_BYTES = 256 << 10
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _tool_name(v: Any, field: str) -> str:
    name = _text(v, field)
    if not TOOL_NAME.match(name):
        raise bad(field, f"{field} must be 1 to 64 letters, digits, '_', '.' or '-', got {name[:80]!r}")
    return name


def _schema(v: Any, field: str) -> dict:
    if not isinstance(v, dict):
        raise bad(field, f"{field} must be a JSON schema object, not {_json_type(v)}")
    size = len(json.dumps(v))
    if size > MAX_SCHEMA_BYTES:
        raise bad(field, f"{field} is {size} bytes of JSON; the limit is {MAX_SCHEMA_BYTES}", "schema_too_large")
    return v


def parse_tool_calls(v: Any, field: str) -> list[dict]:
    """An assistant message's tool_calls -> [{"id", "name", "arguments"}]."""
    if not isinstance(v, list):
        raise bad(field, f"{field} must be an array, not {_json_type(v)}")
    out = []
    for i, c in enumerate(v):
        f = f"{field}[{i}]"
        if not isinstance(c, dict) or not isinstance(c.get("function"), dict):
            raise bad(f, f"{f} must be an object with a 'function' object")
        if c.get("type", "function") != "function":
            raise bad(f"{f}.type", f"{f}.type must be 'function'", "unsupported_value")
        fn = c["function"]
        args = fn.get("arguments", "{}")
        if not isinstance(args, str):
            raise bad(f"{f}.function.arguments", f"{f}.function.arguments must be a string (JSON text)")
        out.append({"id": _text(c.get("id", ""), f"{f}.id"), "name": _tool_name(fn.get("name"), f"{f}.function.name"),
                    "arguments": args})
    return out


def parse_messages(v: Any) -> list[dict]:
    """messages -> [{"role", "content"}] for the chat template ('developer' is the newer name of
    'system'); assistant messages may carry ``tool_calls``, tool messages ``tool_call_id``."""
    if v is None:
        raise bad("messages", "messages is required")
    if not isinstance(v, list):
        raise bad("messages", f"messages must be an array, not {_json_type(v)}")
    if not v:
        raise bad("messages", "messages must hold at least one message")
    out = []
    for i, m in enumerate(v):
        f = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f, f"{f} must be an object, not {_json_type(m)}")
        role = m.get("role")
        if not isinstance(role, str):
            raise bad(f"{f}.role", f"{f}.role must be a string")
        if role not in ROLES:
            raise bad(f"{f}.role", f"{f}.role {role[:40]!r} is not supported (one of: system, developer, user, "
                      "assistant, tool)", "unsupported_value")
        extra = sorted(set(m) - {"role", "content", "name", "refusal", "tool_calls", "reasoning_content",
                                 "tool_call_id"})
        if extra:
            raise bad(f"{f}.{extra[0]}", f"unrecognized field {f}.{extra[0]}")
        msg: dict = {"role": "system" if role == "developer" else role}
        calls = m.get("tool_calls")
        if calls:
            if role != "assistant":
                raise bad(f"{f}.tool_calls", f"{f}.tool_calls: only assistant messages carry tool calls")
            msg["tool_calls"] = parse_tool_calls(calls, f"{f}.tool_calls")
        if "content" not in m or m["content"] is None:
            if not calls:
                raise bad(f"{f}.content", f"{f}.content is required")
            msg["content"] = ""
        else:
            msg["content"] = message_text(m["content"], f"{f}.content")
        if m.get("name") is not None:
            msg["name"] = _text(m["name"], f"{f}.name")
        if role == "tool":
            msg["tool_call_id"] = _text(m.get("tool_call_id"), f"{f}.tool_call_id")
        elif m.get("tool_call_id") is not None:
            raise bad(f"{f}.tool_call_id", f"{f}.tool_call_id: only tool messages carry a tool_call_id")
        out.append(msg)
    return out


def parse_tools(body: dict, field: str = "tools", flat: bool = False) -> list[dict] | None:
    """tools -> [{"name", "description", "parameters", "strict"}]; duplicate names are refused.
    ``flat``: the Responses API's shape (name, parameters beside type, no 'function' object)."""
    v = body.get(field)
    if v is None or v == []:
        return None
    if not isinstance(v, list):
        raise bad(field, f"{field} must be an array, not {_json_type(v)}")
    if len(v) > MAX_TOOLS:
        raise bad(field, f"{field} holds at most {MAX_TOOLS} tools, got {len(v)}")
    out, seen = [], {}
    for i, t in enumerate(v):
        f = f"{field}[{i}]"
        if not isinstance(t, dict):
            raise bad(f, f"{f} must be an object, not {_json_type(t)}")
        if t.get("type") != "function":
            raise bad(f"{f}.type", f"{f}.type {str(t.get('type'))[:40]!r} is not supported (only 'function' tools)",
                      "unsupported_value")
        fn, ff = (t, f) if flat else (t.get("function"), f"{f}.function")
        if not isinstance(fn, dict):
            raise bad(ff, f"{ff} must be an object")
        name = _tool_name(fn.get("name"), f"{ff}.name")
        if name in seen:
            raise bad(f"{ff}.name", f"{ff}.name: duplicate tool name {name!r} (also {field}[{seen[name]}])")
        seen[name] = i
        params = fn.get("parameters")
        tool = {"name": name, "description": _text(fn.get("description") or "", f"{ff}.description"),
                "parameters": None if params is None else _schema(params, f"{ff}.parameters")}
        out.append(tool)
    return out


def parse_tool_choice(v: Any, tools: list[dict] | None, field: str = "tool_choice", flat: bool = False) -> str:
    if v is None:
        return "auto" if tools else "none"
    if isinstance(v, str):
        if v not in ("auto", "none", "required"):
            raise bad(field, f"{field} must be 'auto', 'none', 'required' or a function, got {v[:40]!r}")
        if v == "required" and not tools:
            raise bad(field, f"{field} 'required' needs tools")
        return v
    if isinstance(v, dict) and v.get("type") == "function":
        fn = v if flat else v.get("function")
        if not isinstance(fn, dict):
            raise bad(field, f"{field} must name a function: {{'type': 'function', 'function': {{'name': ...}}}}")
        name = _text(fn.get("name"), f"{field}.function.name" if not flat else f"{field}.name")
        if not tools or name not in {t["name"] for t in tools}:
            raise bad(field, f"{field} names the function {name[:64]!r}, which is not in tools")
        return name
    raise bad(field, f"{field} must be 'auto', 'none', 'required' or {{'type': 'function', ...}}",
              "unsupported_value")


def parse_response_format(v: Any, field: str = "response_format", flat: bool = False) -> dict | None:
    """response_format (chat) or text.format (Responses, ``flat``) -> None for text, else
    {"type": "json_object"} or {"type": "json_schema", "name", "schema", "strict"}."""
    if v is None:
        return None
    if not isinstance(v, dict) or not isinstance(v.get("type"), str):
        raise bad(field, f"{field} must be an object with a string field 'type'")
    kind = v["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise bad(f"{field}.type", f"{field}.type {kind[:40]!r} is not supported (text, json_object, json_schema)",
                  "unsupported_value")
    js, jf = (v, field) if flat else (v.get("json_schema"), f"{field}.json_schema")
    if not isinstance(js, dict):
        raise bad(jf, f"{jf} must be an object with 'name' and 'schema'")
    name = _text(js.get("name", "response"), f"{jf}.name")
    schema = _schema(js.get("schema", {}), f"{jf}.schema")
    if js.get("strict") is not None:
        get_bool(js, "strict")
    return {"type": "json_schema", "name": name, "schema": schema, "strict": bool(js.get("strict")),
            "field": f"{jf}.schema"}


def parse_chat(body: dict) -> tuple[Request, list[dict]]:
    _check_unknown(body, CHAT_FIELDS)
    _check_unsupported(body)
    messages = parse_messages(body.get("messages"))
    tools = parse_tools(body)
    choice = parse_tool_choice(body.get("tool_choice"), tools)
    fmt = parse_response_format(body.get("response_format"))
    if fmt is not None and tools and choice != "none":
        raise bad("response_format", "response_format together with tools is not supported: the answer follows "
                  "either the tool-call grammar or the schema", "unsupported_value")
    stream = get_bool(body, "stream")
    include_usage = _stream_options(body, stream)
    sampling, max_tokens = _sampling(body, ("max_tokens", "max_completion_tokens"))
    logprobs = get_bool(body, "logprobs")
    top = get_int(body, "top_logprobs", 0, 20, 0)
    if top and not logprobs:
        raise bad("top_logprobs", "top_logprobs needs logprobs: true")
    req = Request("chat", None, None, sampling, max_tokens, stream, include_usage, logprobs, top, _model(body),
                  body.get("reasoning_effort"), tools, choice, get_bool(body, "parallel_tool_calls", True), fmt)
    return req, messages


def parse_completion(body: dict) -> Request:
    _check_unknown(body, COMPLETION_FIELDS)
    _check_unsupported(body)
    p = body.get("prompt")
    text, ids = None, None
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]                       # a batch of one prompt
    if isinstance(p, str):
        text = _text(p, "prompt")
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        ids = [int(t) for t in p]
    elif p is None:
        raise bad("prompt", "prompt is required")
    elif isinstance(p, list) and p and all(isinstance(t, (str, list)) for t in p):
        raise bad("prompt", f"prompt holds {len(p)} prompts: this server takes one per request",
                  "unsupported_value")
    else:
        raise bad("prompt", "prompt must be a string or a non-empty array of token ids")
    stream = get_bool(body, "stream")
    include_usage = _stream_options(body, stream)
    sampling, max_tokens = _sampling(body, ("max_tokens",))
    if "max_tokens" not in body:
        max_tokens = 16                # the completions API's default; an explicit null means "until the context is full"
    lp = get_int(body, "logprobs", 0, 20)
    req = Request("completion", text, ids, sampling, max_tokens, stream, include_usage, lp is not None,
                  lp or 0, _model(body))
    return req


def parse_tokenize(body: dict) -> dict:
    _check_unknown(body, {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt", "tools"})
    _model(body)
    if ("prompt" in body) == ("messages" in body):
        raise bad("prompt", "give exactly one of prompt (a string) or messages (a chat)")
    out = {"add_special_tokens": get_bool(body, "add_special_tokens", True),
           "add_generation_prompt": get_bool(body, "add_generation_prompt", True)}
    if "prompt" in body:
        out["prompt"] = _text(body["prompt"], "prompt")
    else:
        out["messages"] = parse_messages(body["messages"])
        out["tools"] = parse_tools(body)
    return out


def parse_detokenize(body: dict, vocab_size: int) -> list[int]:
    _check_unknown(body, {"model", "tokens"})
    _model(body)
    t = body.get("tokens")
    if not isinstance(t, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in t):
        raise bad("tokens", "tokens must be an array of integers")
    for i in t:
        if not 0 <= i < vocab_size:
            raise bad("tokens", f"token id {i} is outside the vocabulary (size {vocab_size})")
    return t


# ---------------------------------------------------------------------------------------------
# responses


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def sse(obj: Any) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + data.encode("utf-8") + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", "replace"))


def chat_logprobs(lps: list) -> dict:
    """TokenLogprob list -> the chat API's ``logprobs`` object."""
    return {"content": [
        {"token": t.text, "logprob": t.logprob, "bytes": _token_bytes(t.text),
         "top_logprobs": [{"token": s, "logprob": lp, "bytes": _token_bytes(s)} for _, s, lp in t.top]}
        for t in lps]}


def completion_logprobs(lps: list, offset: int) -> dict:
    """TokenLogprob list -> the legacy completions API's ``logprobs`` object (text offsets from ``offset``)."""
    offsets, o = [], offset
    for t in lps:
        offsets.append(o)
        o += len(t.text)
    return {"tokens": [t.text for t in lps], "token_logprobs": [t.logprob for t in lps],
            "top_logprobs": [{s: lp for _, s, lp in t.top} for t in lps], "text_offset": offsets}


class Formatter:
    """Builds the response objects of one request (one id, one ``created`` time)."""

    def __init__(self, req: Request, model: str):
        self.req, self.model = req, model
        self.id = new_id(req.kind)
        self.created = int(time.time())
        self.text_len = 0       # characters sent so far (completion logprob offsets)

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    # ---- non-streaming
    def final(self, text: str, finish_reason: str, lps: list | None, u: dict, reasoning: str | None = None,
              tool_calls: list[dict] | None = None) -> dict:
        """``reasoning``: a reasoning model's reasoning, apart from the answer in ``content`` (the
        ``reasoning_content`` field llama.cpp's server and vLLM use); None leaves the field out.
        ``tool_calls``: the calls found in the output ([{"id", "type", "function"}]); with them a
        finished answer's finish_reason is "tool_calls" and blank text is a null content."""
        if self.req.kind == "chat":
            d = self._base("chat.completion")
            message = {"role": "assistant", "content": text, "refusal": None}
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            if tool_calls:
                message["tool_calls"] = tool_calls
                if not text.strip():
                    message["content"] = None
                finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
            d["choices"] = [{"index": 0, "message": message,
                             "logprobs": chat_logprobs(lps) if self.req.logprobs else None,
                             "finish_reason": finish_reason}]
        else:
            d = self._base("text_completion")
            d["choices"] = [{"index": 0, "text": text,
                             "logprobs": completion_logprobs(lps, 0) if self.req.logprobs else None,
                             "finish_reason": finish_reason}]
        d["usage"] = u
        return d

    # ---- streaming
    def _chunk(self, choice: dict) -> dict:
        d = self._base("chat.completion.chunk" if self.req.kind == "chat" else "text_completion")
        d["choices"] = [choice]
        if self.req.include_usage:
            d["usage"] = None
        return d

    def first_chunk(self) -> dict | None:
        """The chat stream's first chunk carries the role (completions have none)."""
        if self.req.kind != "chat":
            return None
        return self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None})

    def delta_chunk(self, text: str, lps: list | None, finish_reason: str | None = None,
                    reasoning: str | None = None) -> dict:
        if self.req.kind == "chat":
            delta = {"content": text} if text or finish_reason is None else {}
            if reasoning:
                delta = {"reasoning_content": reasoning, **({"content": text} if text else {})}
            lp = chat_logprobs(lps) if self.req.logprobs and lps else None
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
        else:
            lp = completion_logprobs(lps, self.text_len) if self.req.logprobs and lps else None
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish_reason}
        self.text_len += len(text)
        return self._chunk(choice)

    def tool_chunk(self, deltas: list) -> dict:
        """A chat stream chunk of tool-call pieces (mpillm.serving.tools.CallDelta): a call's index,
        id, type and name on its first piece, its arguments in later ones."""
        calls = []
        for dl in deltas:
            c: dict = {"index": dl.index}
            if dl.id is not None:
                c.update(id=dl.id, type="function", function={"name": dl.name, "arguments": dl.arguments})
            else:
                c["function"] = {"arguments": dl.arguments}
            calls.append(c)
        return self._chunk({"index": 0, "delta": {"tool_calls": calls}, "logprobs": None, "finish_reason": None})

    def usage_chunk(self, u: dict) -> dict:
        d = self._base("chat.completion.chunk" if self.req.kind == "chat" else "text_completion")
        d["choices"] = []
        d["usage"] = u
        return d
