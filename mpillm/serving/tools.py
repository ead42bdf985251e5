"""Tool calling on rank 0: which call format a model speaks, the prompt with the tools in it, the
grammar a forced call follows, and the parser that finds calls in the output (whole or streamed).

Formats (``call_format``):

  hermes    the chat template renders ``tools`` and the model writes
            ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` (Qwen 2/2.5/3, Hermes)
  llama     the template renders ``tools``; the model writes ``{"name": ..., "parameters": {...}}``
            (Llama 3.1+ JSON calls)
  harmony   gpt-oss: ``<|channel|>commentary to=functions.NAME ... <|message|>{...}<|call|>``
  generic   the template knows nothing of tools: a system message describes them and the answer
            is constrained to ``{"tool_calls": [{"name": ..., "arguments": {...}}]}`` (or, with
            ``tool_choice`` auto, ``{"response": "..."}``), as llama.cpp's server does

Messages here are the protocol's parsed form: ``{"role", "content"}`` plus ``tool_calls``
(``[{"id", "name", "arguments"}]``, arguments a JSON string) on assistant messages and
``tool_call_id`` / ``name`` on tool messages. Arguments in parsed calls are the model's own JSON
text of the value (so streamed pieces join to exactly the non-streamed string). No MPI, no HTTP.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field

from mpillm.serving import harmony
from mpillm.serving.grammar import Grammars

HERMES, LLAMA, HARMONY, GENERIC = "hermes", "llama", "harmony", "generic"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


def call_format(tok) -> str:
    """The tool-call format of a tokenizer's model (see the module docstring)."""
    if harmony.is_harmony(tok):
        return HARMONY
    t = tok.chat_template or ""
    if "tools" not in t:
        return GENERIC
    if TOOL_OPEN in t:
        return HERMES
    if "<|start_header_id|>" in t or "<|python_tag|>" in t:
        return LLAMA
    return GENERIC


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


# ---------------------------------------------------------------------------------------------
# prompts

def _template_tools(tools: list[dict]) -> list[dict]:
    """Tools as Hugging Face chat templates expect them (the OpenAI shape)."""
    return [{"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                              "parameters": t.get("parameters") or {"type": "object",
                                                                                    "properties": {}}}}
            for t in tools]


def _arguments_value(s: str):
    try:
        return json.loads(s)
    except ValueError:
        return s


def _template_messages(messages: list[dict]) -> list[dict]:
    """Parsed messages -> Hugging Face's convention (tool calls with ``function`` and arguments as
    a mapping, which templates write with ``tojson``)."""
    out = []
    for m in messages:
        m2 = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("tool_calls"):
            m2["tool_calls"] = [{"id": c["id"], "type": "function",
                                 "function": {"name": c["name"], "arguments": _arguments_value(c["arguments"])}}
                                for c in m["tool_calls"]]
        for k in ("tool_call_id", "name"):
            if m.get(k) is not None:
                m2[k] = m[k]
        out.append(m2)
    return out


def _generic_system(tools: list[dict], choice, parallel: bool) -> str:
    lines = ["You can call these tools (JSON schema of each one's arguments):"]
    for t in tools:
        lines.append(json.dumps({"name": t["name"], "description": t.get("description", ""),
                                 "parameters": t.get("parameters") or {}}, ensure_ascii=False))
    many = "one or more calls" if parallel else "exactly one call"
    lines.append(f'To call tools, answer with JSON only: {{"tool_calls": [{{"name": "<tool name>", "arguments": '
                 f'{{...}}}}]}} ({many}).')
    if choice == "auto":
        lines.append('To answer without a tool, answer with JSON only: {"response": "<your answer>"}.')
    lines.append('A tool\'s result comes back as {"tool_response": ...}.')
    return "\n".join(lines)


def _generic_messages(messages: list[dict], tools: list[dict], choice, parallel: bool) -> list[dict]:
    """For a template without tools: the tool description joins the system message, calls become
    the assistant's JSON and tool results user messages ``{"tool_response": ...}``; when no call
    may follow (``none``), both in prose ('Result of the tool call NAME: ...'), which small models
    answer rather than imitate."""
    out = []
    if tools and choice != "none":
        sys_text = _generic_system(tools, choice, parallel)
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": messages[0]["content"] + "\n\n" + sys_text})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": sys_text})
    names: dict[str, str] = {}          # tool call id -> function name (for the results)
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            names.update((c["id"], c["name"]) for c in m["tool_calls"])
            calls = [{"name": c["name"], "arguments": _arguments_value(c["arguments"])} for c in m["tool_calls"]]
            if tools and choice != "none":
                text = json.dumps({"tool_calls": calls}, ensure_ascii=False)
            else:                        # a free answer follows: the history in prose, not JSON to imitate
                text = " ".join(f"I called the tool {c['name']} with {c['arguments']}." for c in m["tool_calls"])
            out.append({"role": "assistant", "content": ((m.get("content") or "") + " " + text).strip()})
        elif m["role"] == "tool":
            name = m.get("name") or names.get(m.get("tool_call_id") or "", "tool")
            if tools and choice != "none":      # the answer is JSON: the result too
                resp = {"tool_call_id": m.get("tool_call_id"), "name": name, "content": m.get("content") or ""}
                text = json.dumps({"tool_response": resp}, ensure_ascii=False)
            else:                               # a free answer follows: prose, not JSON to imitate
                text = f"Result of the tool call {name}: {m.get('content') or ''}"
            out.append({"role": "user", "content": text})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    return out


def render(tok, messages: list[dict], tools: list[dict] | None = None, choice="auto", parallel: bool = True,
           reasoning_effort: str | None = None, add_generation_prompt: bool = True) -> str:
    """The prompt text, with the tools in it, in the format the model speaks. ValueError when the
    template refuses the conversation."""
    fmt = call_format(tok)
    tools = tools or []
    if fmt == HARMONY:
        return harmony.prompt_text(tok, messages, reasoning_effort, tools=tools if choice != "none" else None)
    if fmt == GENERIC:
        return tok.apply_chat_template(_generic_messages(messages, tools, choice, parallel),
                                       add_generation_prompt=add_generation_prompt)
    kw = {"tools": _template_tools(tools)} if tools and choice != "none" else {}
    return tok.apply_chat_template(_template_messages(messages), add_generation_prompt=add_generation_prompt, **kw)


# ---------------------------------------------------------------------------------------------
# grammars

def _call_schema(t: dict, args_key: str = "arguments") -> dict:
    return {"type": "object", "properties": {"name": {"const": t["name"]},
                                             args_key: t.get("parameters") or {"type": "object"}},
            "required": ["name", args_key], "additionalProperties": False}


def _one_of_calls(tools: list[dict], args_key: str = "arguments") -> dict:
    schemas = [_call_schema(t, args_key) for t in tools]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def call_grammar(fmt: str, tools: list[dict], choice, parallel: bool) -> str | None:
    """The grammar of the answer, or None when it is free. ``choice``: "auto", "required", "none"
    or the name of the function that must be called. Raises GrammarError."""
    if choice == "none" or not tools:
        return None
    if choice not in ("auto", "required"):
        tools = [t for t in tools if t["name"] == choice]
    if fmt == GENERIC:
        calls = {"type": "array", "items": _one_of_calls(tools), "minItems": 1}
        if not parallel or choice not in ("auto", "required"):
            calls["maxItems"] = 1
        schema = {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"],
                  "additionalProperties": False}
        if choice == "auto":
            schema = {"anyOf": [schema, {"type": "object", "properties": {"response": {"type": "string"}},
                                         "required": ["response"], "additionalProperties": False}]}
        return Grammars.json_schema(schema, "tools")
    if choice == "auto":
        return None                      # the model decides; its calls are parsed from the text
    if fmt == HERMES:
        call = json.dumps(_one_of_calls(tools), ensure_ascii=False)
        rep = '("\\n" call)*' if parallel and choice == "required" else ""
        return Grammars.lark(f'start: call{rep}\ncall: "{TOOL_OPEN}\\n" %json {call} "\\n{TOOL_CLOSE}"\n')
    if fmt == LLAMA:
        return Grammars.json_schema(_one_of_calls(tools, "parameters"), "tools")
    if fmt == HARMONY:
        alts = " | ".join(
            f'<|channel|> "commentary to=functions.{t["name"]} " <|constrain|> "json" <|message|> '
            f'%json {json.dumps(t.get("parameters") or {"type": "object"}, ensure_ascii=False)} <|call|>'
            for t in tools)          # the control tokens unquoted: llguidance matches them as special tokens
        return Grammars.lark(f"start: {alts}\n")
    return None


# ---------------------------------------------------------------------------------------------
# parsing the output

@dataclass
class Call:
    name: str
    arguments: str           # JSON text (possibly incomplete while streaming)
    complete: bool = True


@dataclass
class Parsed:
    content: str
    calls: list[Call] = field(default_factory=list)
    reasoning: str = ""


_DEC = json.JSONDecoder()
_NAME_ARGS = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


def _held(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` could begin ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def _scan_call(s: str, pos: int = 0) -> tuple[Call | None, int | None]:
    """``{"name": ..., "arguments": ...}`` at ``s[pos:]`` (after whitespace) read in order, the
    arguments as their own JSON text: (call, index after its closing brace), (partial call, None)
    while it is incomplete, (None, None) when it is not such an object (yet)."""
    m = _NAME_ARGS.match(s, pos + len(s[pos:]) - len(s[pos:].lstrip()))
    if m is None:
        return None, None
    try:
        name = json.loads('"' + m.group(1) + '"')
    except ValueError:
        return None, None
    start = m.end()
    try:
        _, end = _DEC.raw_decode(s, start)
    except ValueError:
        return Call(name, s[start:], False), None
    k = end
    while k < len(s) and s[k].isspace():
        k += 1
    if k < len(s) and s[k] != "}":
        return None, None
    return Call(name, s[start:end], k < len(s)), (k + 1 if k < len(s) else None)


def _json_call(body: str, final: bool) -> Call | None:
    """One call object making up all of ``body``; partial while ``final`` is False; None when
    malformed (or, while not final, not recognizable yet)."""
    call, end = _scan_call(body)
    if call is not None:
        if end is not None:
            return call if not body[end:].strip() else None
        if final:
            return None
        return call
    if not final:
        return None
    try:                                  # the fields in another order: read the object whole
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return Call(obj["name"], json.dumps(args, ensure_ascii=False))


def parse_hermes(text: str, final: bool = True) -> Parsed:
    content, calls, pos = [], [], 0
    while True:
        i = text.find(TOOL_OPEN, pos)
        if i < 0:
            tail = text[pos:]
            content.append(tail if final else tail[:len(tail) - _held(tail, TOOL_OPEN)])
            break
        content.append(text[pos:i])
        j = text.find(TOOL_CLOSE, i)
        body = text[i + len(TOOL_OPEN):j if j >= 0 else len(text)]
        closed = j >= 0
        if not closed and not final:
            body = body[:len(body) - _held(body, TOOL_CLOSE)]
        call = _json_call(body, final or closed)
        if call is not None:
            calls.append(call)
        elif final or closed:
            content.append(text[i:j + len(TOOL_CLOSE)] if closed else text[i:])   # malformed: text
        if not closed:
            break
        pos = j + len(TOOL_CLOSE)
    return Parsed("".join(content), calls)


def parse_llama(text: str, final: bool = True) -> Parsed:
    s = text.lstrip()
    if not final and "<|python_tag|>".startswith(s):
        return Parsed("")                # could still become a call
    body = s.removeprefix("<|python_tag|>")
    if body.lstrip().startswith("{") or (not final and not body.strip()):
        call = _json_call(body, final)
        if call is not None:
            return Parsed("", [call])
        if not final:
            return Parsed("")
    return Parsed(text)


def _partial_string(raw: str) -> str:
    """The text of an unfinished JSON string body (no closing quote), up to its last whole escape."""
    for cut in range(len(raw), max(len(raw) - 6, -1), -1):
        try:
            return json.loads('"' + raw[:cut] + '"')
        except ValueError:
            continue
    return ""


_RESPONSE = re.compile(r'\{\s*"response"\s*:\s*"')


def parse_generic(text: str, final: bool = True) -> Parsed:
    s = text.lstrip()
    if not s.startswith("{"):
        return Parsed(text)
    m = _RESPONSE.match(s)
    if m is not None:
        try:
            v, end = _DEC.raw_decode(s, m.end() - 1)
            return Parsed(v)
        except ValueError:               # cut (max_tokens): the answer so far, as text
            return Parsed(_partial_string(s[m.end():]))
    m = re.match(r'\{\s*"tool_calls"\s*:\s*\[\s*', s)
    if m is None:
        if final:
            return Parsed(text)
        return Parsed("")
    calls, pos = [], m.end()
    while True:
        call, end = _scan_call(s, pos)
        if call is None:
            break
        calls.append(call)
        if end is None:
            break
        rest = s[end:].lstrip()
        if not rest.startswith(","):
            break
        pos = len(s) - len(rest) + 1
    if final:
        try:
            obj = json.loads(s)
            if not (isinstance(obj, dict) and isinstance(obj.get("tool_calls"), list)
                    and len(obj["tool_calls"]) == len(calls)):
                return Parsed(text)
        except ValueError:
            return Parsed(text)
    return Parsed("", calls)


_HARMONY_MSG = re.compile(r"(?:<\|start\|>assistant)?(?P<head>[^<]*)?<\|channel\|>(?P<channel>\w+)(?P<head2>[^<]*)"
                          r"(?:<\|constrain\|>\w*)?<\|message\|>(?P<body>.*?)(?P<end><\|end\|>|<\|call\|>|"
                          r"<\|return\|>|$)", re.S)
_HARMONY_TO = re.compile(r"to=functions\.([\w.-]+)")


def parse_harmony(text: str, final: bool = True) -> Parsed:
    """gpt-oss's raw output (special tokens as text): final channel -> content, analysis ->
    reasoning, commentary messages addressed ``to=functions.NAME`` -> calls."""
    content, reasoning, calls = [], [], []
    for m in _HARMONY_MSG.finditer(text):
        head = (m.group("head") or "") + (m.group("head2") or "")
        body, ended = m.group("body"), bool(m.group("end"))
        if not ended and not final:       # hold back what may be the start of a control token
            k = body.rfind("<")
            if k >= 0 and "|>" not in body[k:]:
                body = body[:k]
        to = _HARMONY_TO.search(head)
        if to is not None:
            b = body.strip()
            if ended or final:
                try:
                    json.loads(b)
                except ValueError:
                    content.append(body)             # malformed arguments: reported as text
                    continue
            calls.append(Call(to.group(1), b, ended or final))
        elif m.group("channel") == harmony.ANALYSIS:
            reasoning.append(body)
        else:
            content.append(body)
    if not calls and not content and not reasoning and "<|channel|>" not in text:
        return Parsed(text if final or not text.lstrip().startswith("<") else "")
    return Parsed("".join(content), calls, "".join(reasoning))


PARSERS = {HERMES: parse_hermes, LLAMA: parse_llama, GENERIC: parse_generic, HARMONY: parse_harmony}


def parse(fmt: str, text: str, final: bool = True) -> Parsed:
    """Content and calls in a model's output; malformed calls stay text (never an exception)."""
    try:
        return PARSERS[fmt](text, final)
    except Exception:  # noqa: BLE001 - whatever the model wrote, it is at worst text
        return Parsed(text if final else "")


# ---------------------------------------------------------------------------------------------
# streaming

@dataclass
class CallDelta:
    index: int
    id: str | None = None         # set (with name) on a call's first delta
    name: str | None = None
    arguments: str = ""


class CallStream:
    """Feeds output text, gives out content deltas and ``CallDelta`` pieces in OpenAI's stream
    order (a call's id and name first, its arguments in pieces). ``result`` is the whole answer;
    what was streamed joins to exactly it."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        self.text = ""
        self.sent_content = 0
        self.ids: list[str] = []
        self.sent_args: list[int] = []
        self.sent_reasoning = 0
        self.result = Parsed("")

    def feed(self, text: str, final: bool = False) -> tuple[str, list[CallDelta]]:
        self.text += text
        p = parse(self.fmt, self.text, final)
        self.result = p
        content = ""
        if len(p.content) > self.sent_content:
            content = p.content[self.sent_content:]
            self.sent_content = len(p.content)
        deltas = []
        for i, c in enumerate(p.calls):
            if i == len(self.ids):
                self.ids.append(new_call_id())
                self.sent_args.append(0)
                deltas.append(CallDelta(i, self.ids[i], c.name, ""))
            if len(c.arguments) > self.sent_args[i]:
                deltas.append(CallDelta(i, arguments=c.arguments[self.sent_args[i]:]))
                self.sent_args[i] = len(c.arguments)
        return content, deltas

    def take_reasoning(self) -> str:
        """Reasoning (harmony's analysis channel) found since the last call."""
        r = self.result.reasoning[self.sent_reasoning:]
        self.sent_reasoning = max(self.sent_reasoning, len(self.result.reasoning))
        return r

    def finish(self) -> tuple[str, list[CallDelta]]:
        return self.feed("", final=True)

    def calls(self) -> list[dict]:
        """The whole answer's calls in OpenAI's shape (after finish)."""
        return [{"id": self.ids[i] if i < len(self.ids) else new_call_id(), "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}} for i, c in enumerate(self.result.calls)]
