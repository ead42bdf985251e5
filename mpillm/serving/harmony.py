"""gpt-oss's chat format (harmony): render a conversation, split the model's output into channels.

A harmony conversation is a run of messages ``<|start|>ROLE<|message|>TEXT<|end|>``; an assistant
message names its channel in the header, ``<|start|>assistant<|channel|>analysis<|message|>...``:

  analysis    the model's reasoning (kept apart from the answer: ``reasoning_content`` on the wire)
  final       the answer the user sees
  commentary  tool-call preambles and calls (``to=functions.NAME`` in the header)

A prompt ends with ``<|start|>assistant``; the model writes the rest of that header, its message,
and either ``<|end|>`` followed by another assistant message or ``<|return|>`` (done) or
``<|call|>`` (a tool call: done too).  ``<|end|>`` therefore ends a message, never a generation
(``Tokenizer.eos_ids`` leaves it out for a harmony vocabulary).

``render`` writes the prompt the way gpt-oss's own chat template does (the system message with
the reasoning effort, the first system/developer message as the developer's instructions, earlier
assistant turns as their final answers only); ``prompt_text`` prefers the model's own template when
it carries one.  ``HarmonyParser`` takes generated token ids one at a time and gives out
``Delta(channel, text)`` pieces as they become printable.  No MPI, no I/O.
"""
from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from typing import Iterable

__all__ = ["SPECIALS", "REASONING_EFFORTS", "is_harmony", "render", "prompt_text", "Delta", "Message",
           "HarmonyParser", "split_channels"]

# The harmony control tokens (their ids in gpt-oss's o200k_harmony vocabulary in the comments).
START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"   # 200006 200007 200008 200005
CONSTRAIN, RETURN, CALL = "<|constrain|>", "<|return|>", "<|call|>"                 # 200003 200002 200012
SPECIALS = (START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL)

# gpt-oss's named special tokens at their ids in o200k_harmony (vocabulary 201088; ids 199998 and up
# are special, the unnamed ones ``<|reserved_N|>``)
GPT_OSS_SPECIAL_TOKENS = {199998: "<|startoftext|>", 199999: "<|endoftext|>", 200002: RETURN, 200003: CONSTRAIN,
                          200005: CHANNEL, 200006: START, 200007: END, 200008: MESSAGE, 200012: CALL,
                          200018: "<|endofprompt|>"}
GPT_OSS_VOCAB, GPT_OSS_FIRST_SPECIAL = 201088, 199998

REASONING_EFFORTS = ("low", "medium", "high")
DEFAULT_EFFORT = "medium"
MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
KNOWLEDGE_CUTOFF = "2024-06"
VALID_CHANNELS = "# Valid channels: analysis, commentary, final. Channel must be included for every message."

ANALYSIS, FINAL, COMMENTARY = "analysis", "final", "commentary"


def is_harmony(tok) -> bool:
    """Whether the tokenizer's vocabulary speaks harmony (it has the channel and return tokens)."""
    return all(tok.token_to_id(t) is not None for t in (START, END, MESSAGE, CHANNEL, RETURN))


def check_effort(effort: str | None) -> str:
    effort = DEFAULT_EFFORT if effort is None else effort
    if effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning effort must be one of {', '.join(REASONING_EFFORTS)}, got {effort!r}")
    return effort


def _msg(role: str, text: str, channel: str | None = None) -> str:
    head = role if channel is None else f"{role}{CHANNEL}{channel}"
    return f"{START}{head}{MESSAGE}{text}{END}"


def _tools_section(tools: list[dict]) -> str:
    """The developer message's ``# Tools`` section: each function with its JSON-schema parameters."""
    lines = ["# Tools", "", "## functions", "", "namespace functions {", ""]
    for t in tools:
        if t.get("description"):
            lines.append(f"// {t['description']}")
        params = json.dumps(t.get("parameters") or {}, ensure_ascii=False)
        lines += [f"type {t['name']} = (_: {params}) => any;", ""]
    lines.append("} // namespace functions")
    return "\n".join(lines)


def render(messages: list[dict], *, reasoning_effort: str | None = None, date: str | None = None,
           add_generation_prompt: bool = True, model_identity: str = MODEL_IDENTITY,
           tools: list[dict] | None = None) -> str:
    """The harmony prompt for ``messages`` ([{"role", "content"}]; roles system, developer, user,
    assistant).  A leading system or developer message becomes the developer message's
    instructions; assistant turns are kept as their final answers (harmony drops earlier
    reasoning).  ``date`` defaults to today (UTC), as ``strftime_now`` gives the template.
    ``tools`` ([{"name", "description", "parameters"}]) go into the developer message as the
    ``functions`` namespace; assistant ``tool_calls`` become commentary messages to
    ``functions.NAME`` ending in ``<|call|>``, tool results messages from ``functions.NAME``."""
    effort = check_effort(reasoning_effort)
    date = date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    system = (f"{model_identity}\nKnowledge cutoff: {KNOWLEDGE_CUTOFF}\nCurrent date: {date}\n\n"
              f"Reasoning: {effort}\n\n{VALID_CHANNELS}")
    if tools:
        system += "\nCalls to these tools must go to the commentary channel: 'functions'."
    parts = [_msg("system", system)]
    rest = list(messages)
    dev = []
    if rest and rest[0].get("role") in ("system", "developer"):
        dev.append("# Instructions\n\n" + _content(rest.pop(0), 0))
    if tools:
        dev.append(_tools_section(tools))
    if dev:
        parts.append(_msg("developer", "\n\n".join(dev)))
    names: dict[str, str] = {}          # tool call id -> function name (for the results)
    for i, m in enumerate(rest):
        role = m.get("role")
        if role == "user":
            parts.append(_msg("user", _content(m, i)))
        elif role == "assistant" and m.get("tool_calls"):
            if m.get("content"):
                parts.append(_msg("assistant", m["content"], COMMENTARY))
            for c in m["tool_calls"]:
                names[c.get("id") or ""] = c["name"]
                parts.append(f"{START}assistant{CHANNEL}{COMMENTARY} to=functions.{c['name']} {CONSTRAIN}json"
                             f"{MESSAGE}{c['arguments']}{CALL}")
        elif role == "assistant":
            parts.append(_msg("assistant", _content(m, i), FINAL))
        elif role == "tool":
            name = m.get("name") or names.get(m.get("tool_call_id") or "", "tool")
            parts.append(f"{START}functions.{name} to=assistant{CHANNEL}{COMMENTARY}{MESSAGE}{_content(m, i)}{END}")
        elif role in ("system", "developer"):
            raise ValueError(f"message {i}: only the first message may be a {role} message in harmony")
        else:
            raise ValueError(f"message {i}: role {role!r} is not one of system, developer, user, assistant")
    if add_generation_prompt:
        parts.append(f"{START}assistant")
    return "".join(parts)


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if not isinstance(c, str):
        raise ValueError(f"message {i}: content must be a string")
    return c


def prompt_text(tok, messages: list[dict], reasoning_effort: str | None = None,
                tools: list[dict] | None = None) -> str:
    """The prompt text: the model's own chat template when it has one (given the reasoning effort,
    as gpt-oss's template reads it), else ``render``; ``render`` too for a conversation with tools."""
    effort = check_effort(reasoning_effort)
    if tools or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages):
        return render(messages, reasoning_effort=effort, tools=tools)
    if tok.chat_template:
        return tok.apply_chat_template(messages, add_generation_prompt=True, reasoning_effort=effort)
    return render(messages, reasoning_effort=effort)


# ----------------------------------------------------------------------------------------------
# Parsing the model's output

@dataclass
class Delta:
    channel: str          # "analysis", "final" or "commentary" (a message without a channel counts as final)
    text: str
    recipient: str | None = None


@dataclass
class Message:
    role: str
    channel: str
    text: str
    recipient: str | None = None
    constrain: str | None = None


@dataclass
class _Header:
    role: list[int] = field(default_factory=list)
    channel: list[int] = field(default_factory=list)
    constrain: list[int] = field(default_factory=list)
    seen_channel: bool = False


class HarmonyParser:
    """Feed generated ids (``feed``); get ``Delta``s of message text with their channel.

    The stream starts inside an assistant header (the prompt ended with ``<|start|>assistant``).
    ``done`` turns true at ``<|return|>`` or ``<|call|>`` (``stop`` says which); ids after that are
    ignored.  A special token split from its text (several ids for one header) is fine: headers are
    decoded whole at ``<|message|>``.  Text outside any message (after ``<|end|>`` without a new
    ``<|start|>``) is kept in ``stray`` and shown nowhere."""

    def __init__(self, tok, role: str = "assistant"):
        self.tok = tok
        ids = {t: tok.token_to_id(t) for t in SPECIALS}
        missing = [t for t in (START, END, MESSAGE, CHANNEL, RETURN) if ids[t] is None]
        if missing:
            raise ValueError(f"the tokenizer has no harmony token {missing[0]}: not a harmony model")
        self._id = ids
        self._kind = {i: t for t, i in ids.items() if i is not None}
        self.messages: list[Message] = []
        self.done = False
        self.stop: str | None = None            # "return" | "call" once done
        self.stray: list[int] = []
        self._start_role = role
        self._header: _Header | None = _Header()
        self._where = "role"                    # header part being read: role | channel | constrain
        self._msg: Message | None = None
        self._decoder = None
        self._parts: list[str] = []

    # header ------------------------------------------------------------------------------------
    def _open_header(self) -> None:
        self._header, self._where = _Header(), "role"

    def _begin_message(self) -> None:
        h = self._header
        text = lambda ids: self.tok.decode(ids).strip()  # noqa: E731
        role_words = text(h.role).split()
        chan_words = text(h.channel).split()
        role = role_words[0] if role_words else self._start_role
        recipient = None
        for w in role_words[1:] + chan_words[1:]:
            if w.startswith("to="):
                recipient = w[3:]
        channel = chan_words[0] if chan_words else FINAL
        constrain = text(h.constrain) or None
        self._msg = Message(role, channel, "", recipient, constrain)
        self._header = None
        self._decoder = self.tok.stream_decoder()
        self._parts = []
        self._start_role = "assistant"

    def _close_message(self, out: list[Delta]) -> None:
        if self._msg is None:
            return
        rest = self._decoder.flush()
        if rest:
            self._emit(rest, out)
        self._msg.text = "".join(self._parts)
        self.messages.append(self._msg)
        self._msg, self._decoder = None, None

    def _emit(self, text: str, out: list[Delta]) -> None:
        self._parts.append(text)
        out.append(Delta(self._msg.channel, text, self._msg.recipient))

    # feeding -----------------------------------------------------------------------------------
    def feed(self, token_id: int) -> list[Delta]:
        """One generated id; the text pieces it completes."""
        out: list[Delta] = []
        if self.done:
            return out
        t = int(token_id)
        kind = self._kind.get(t)
        if self._msg is not None:                        # inside a message body
            if kind in (END, RETURN, CALL):
                self._close_message(out)
                if kind != END:
                    self.done, self.stop = True, "return" if kind == RETURN else "call"
            elif kind in (START, CHANNEL):               # a header without <|end|> before it: close, reopen
                self._close_message(out)
                self._open_header()
                if kind == CHANNEL:
                    self._header.seen_channel, self._where = True, "channel"
            else:
                text = self._decoder.put(t)
                if text:
                    self._emit(text, out)
            return out
        if self._header is None:                         # between messages
            if kind == START:
                self._open_header()
            elif kind in (RETURN, CALL):
                self.done, self.stop = True, "return" if kind == RETURN else "call"
            else:
                self.stray.append(t)
            return out
        h = self._header                                 # inside a header
        if kind == CHANNEL:
            h.seen_channel, self._where = True, "channel"
        elif kind == CONSTRAIN:
            self._where = "constrain"
        elif kind == MESSAGE:
            self._begin_message()
        elif kind == START:
            self._open_header()
        elif kind in (RETURN, CALL):
            self.done, self.stop = True, "return" if kind == RETURN else "call"
        elif kind == END:
            self._header = None
        else:
            getattr(h, self._where).append(t)
        return out

    def feed_all(self, ids: Iterable[int]) -> list[Delta]:
        out: list[Delta] = []
        for t in ids:
            out += self.feed(t)
        return out

    def finish(self) -> list[Delta]:
        """The end of the stream (also when cut by max tokens): give out the open message's text."""
        out: list[Delta] = []
        self._close_message(out)
        return out

    def text(self, channel: str) -> str:
        """All text of one channel so far (completed messages and the open one)."""
        done = "".join(m.text for m in self.messages if m.channel == channel)
        if self._msg is not None and self._msg.channel == channel:
            done += "".join(self._parts)
        return done


def split_channels(tok, ids: Iterable[int]) -> tuple[str, str, str]:
    """(reasoning, final, commentary) text of a whole generated id sequence."""
    p = HarmonyParser(tok)
    p.feed_all(ids)
    p.finish()
    return p.text(ANALYSIS), p.text(FINAL), p.text(COMMENTARY)
