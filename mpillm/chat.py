"""Chat with a model in the terminal, across MPI ranks.

  mpirun -np 4 --hostfile hostfile python -m mpillm.chat [--model DIR] [--system "..."]

Multi-turn: each turn is rendered with the model's chat template, and the tokens of the
conversation so far (the previous prompt plus the tokens the model generated, exactly as
generated) are kept, so the service finds them in the slot's KV cache and only the new turn
is prefilled. Commands: /reset starts a new conversation, /exit (or end of input) leaves.
Rank 0 reads standard input (mpirun forwards it there) and prints the replies.

With ``--tools FILE`` (a JSON array of OpenAI function tools) the model may call them: a call
is shown as ``[tool call] NAME ARGUMENTS``, and ``/result TEXT`` gives its result back (the
oldest unanswered call first); once every call has one, the model goes on.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from mpi4py import MPI

from mpillm.runtime.errors import run
from mpillm.options import add_model_args, open_engine, parse_args_bcast

HELP = ("commands: /reset (new conversation), /exit (leave), /result TEXT (a tool call's result, with --tools); "
        "anything else is your next message")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mpillm.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--system", default=None, help="system message (default: the template's own)")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per reply at most (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0 = all")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold (default: %(default)s)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--no-stats", action="store_true", help="do not print the token counts and speed after a reply")
    p.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default=None,
                   help="harmony models (gpt-oss): the reasoning effort the system message asks for (default: medium)")
    p.add_argument("--tools", default=None, metavar="FILE",
                   help="a JSON file holding an array of OpenAI function tools the model may call")
    p.add_argument("--no-parallel-calls", dest="parallel_calls", action="store_false",
                   help="with --tools: at most one call per reply (OpenAI's parallel_tool_calls: false)")
    p.add_argument("--hide-reasoning", action="store_true",
                   help="harmony models: do not show the model's reasoning (it is shown dimmed before the answer)")
    return p


class Conversation:
    """The messages and the exact token ids of the conversation so far (for prefix reuse)."""

    def __init__(self, tok, system: str | None, reasoning_effort: str | None = None, tools: list[dict] | None = None,
                 parallel_calls: bool = True):
        from mpillm.serving import harmony

        self.tok, self.system = tok, system
        self.harmony = harmony.is_harmony(tok)
        self.effort = reasoning_effort
        self.tools, self.parallel_calls = tools, parallel_calls
        self.reset()

    def render(self) -> str:
        if self.tools:
            from mpillm.serving import tools

            return tools.render(self.tok, self.messages, self.tools, "auto", self.parallel_calls, self.effort)
        if self.harmony:
            from mpillm.serving import harmony

            return harmony.prompt_text(self.tok, self.messages, self.effort)
        return self.tok.apply_chat_template(self.messages, add_generation_prompt=True)

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.known_ids: list[int] = []     # prompt + generated ids of the last turn
        self.known_text = ""               # the text those ids decode to

    def pending(self) -> list[dict]:
        """The last reply's tool calls that have no result yet."""
        done = {m.get("tool_call_id") for m in self.messages if m["role"] == "tool"}
        last = next((m for m in reversed(self.messages) if m["role"] == "assistant"), None)
        return [c for c in (last or {}).get("tool_calls", []) if c["id"] not in done]

    def prompt_ids(self, user_text: str | None) -> list[int]:
        """The next prompt: the tokens already known, then only the new part of the rendered chat
        (when the template renders the history as a prefix of the new prompt, as chat templates do).
        ``user_text`` None: the model goes on after tool results."""
        if user_text is not None:
            self.messages.append({"role": "user", "content": user_text})
        full = self.render()
        if self.known_ids and full.startswith(self.known_text):
            return self.known_ids + self.tok.encode(full[len(self.known_text):], add_bos=False)
        return self.tok.encode(full, add_bos=False)

    def answered(self, prompt_ids: list[int], gen_ids: list[int], reply: str, calls: list[dict] | None = None) -> None:
        self.messages.append({"role": "assistant", "content": reply, **({"tool_calls": calls} if calls else {})})
        self.known_ids = list(prompt_ids) + list(gen_ids)
        self.known_text = self.tok.decode(self.known_ids)

    def undo(self) -> None:
        """Forget the last user message (its reply failed)."""
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()


class ReasoningView:
    """A harmony reply on the terminal: the reasoning (analysis channel) dimmed (or marked
    "[reasoning]" when the output is not a terminal) or hidden, then the final answer.
    ``show`` returns the final-answer text an output added (what the conversation keeps)."""

    DIM, RESET = "\x1b[2m", "\x1b[0m"

    def __init__(self, tok, out, styled: bool, show_reasoning: bool):
        from mpillm.serving.harmony import HarmonyParser

        self.parser, self.out, self.styled, self.show_reasoning = HarmonyParser(tok), out, styled, show_reasoning
        self.in_reasoning = False

    def _reasoning(self, on: bool) -> None:
        if on == self.in_reasoning:
            return
        if on:
            self.out.write(self.DIM if self.styled else "[reasoning] ")
        else:
            self.out.write(self.RESET + "\n" if self.styled else "\n[answer] ")
        self.in_reasoning = on

    def show(self, o) -> str:
        deltas = self.parser.feed_all(o.token_ids)
        if o.finish_reason is not None:
            deltas += self.parser.finish()
        final = []
        for d in deltas:
            if d.channel == "analysis":
                if self.show_reasoning:
                    self._reasoning(True)
                    self.out.write(d.text)
            elif d.channel == "final":
                self._reasoning(False)
                self.out.write(d.text)
                final.append(d.text)
        if o.finish_reason is not None and self.in_reasoning and self.styled:
            self.out.write(self.RESET)
        self.out.flush()
        return "".join(final)


class CallView:
    """A reply with tools on the terminal: its text, then each call as ``[tool call] NAME ARGS``
    with the arguments as they stream. ``show`` returns the text an output added."""

    def __init__(self, fmt: str, out):
        from mpillm.serving.tools import CallStream

        self.stream, self.out = CallStream(fmt), out
        self.after_call = False  # the last thing shown was a call: text after it starts a new line

    def show(self, o) -> str:
        text, deltas = self.stream.feed(o.text)
        if o.finish_reason is not None:
            more, late = self.stream.finish()
            text, deltas = text + more, deltas + late
        if text and self.after_call:
            self.out.write("\n")
        self.out.write(text)
        self.after_call = self.after_call and not text
        for d in deltas:
            if d.id is not None:
                self.out.write(f"\n[tool call] {d.name} ")
            self.out.write(d.arguments)
            self.after_call = True
        self.out.flush()
        return text

    def calls(self) -> list[dict]:
        return [{"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                for c in self.stream.calls()]


def load_tools(path: str | None) -> list[dict] | None:
    """--tools FILE: OpenAI function tools -> [{"name", "description", "parameters"}]."""
    if not path:
        return None
    import json

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of tools")
    out = []
    for t in data:
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"{path}: every tool needs a function name")
        out.append({"name": fn["name"], "description": fn.get("description", ""), "parameters": fn.get("parameters")})
    return out


def chat_loop(service, tok, args, inp=sys.stdin, out=sys.stdout) -> int:
    from mpillm.serving.sampling import SamplingParams

    tool_list = load_tools(getattr(args, "tools", None))
    parallel = getattr(args, "parallel_calls", True)
    conv = Conversation(tok, args.system, getattr(args, "reasoning_effort", None), tool_list, parallel)
    constraint_of = None
    if tool_list:
        from mpillm.serving import tools
        from mpillm.serving.grammar import Grammars

        fmt = tools.call_format(tok)
        grammar = tools.call_grammar(fmt, tool_list, "auto", parallel)
        grammars = Grammars(tok, service.vocab_size)
        constraint_of = (lambda: grammars.constraint(grammar)) if grammar else None
    # dim the reasoning with ANSI codes unless NO_COLOR is set or the terminal is dumb (under mpirun
    # rank 0's stdout is a pseudo-terminal even when mpirun's is a pipe, so isatty() cannot tell)
    styled = "NO_COLOR" not in os.environ and os.environ.get("TERM", "dumb") not in ("", "dumb")
    interactive = inp.isatty()
    out.write(f"mpillm chat: {HELP}\n")
    out.flush()
    while True:
        if interactive:
            out.write("\n> ")
            out.flush()
        line = inp.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        user_text: str | None = text
        if text.startswith("/result"):
            waiting = conv.pending()
            if not waiting:
                out.write("(no tool call is waiting for a result)\n")
                out.flush()
                continue
            conv.messages.append({"role": "tool", "tool_call_id": waiting[0]["id"], "name": waiting[0]["name"],
                                  "content": text[len("/result"):].strip()})
            if len(waiting) > 1:
                out.write(f"(result of {waiting[0]['name']} kept; {len(waiting) - 1} more call(s) to answer)\n")
                out.flush()
                continue
            user_text = None
        elif text == "/reset":
            conv.reset()
            out.write("(new conversation)\n")
            out.flush()
            continue
        if user_text is not None and text.startswith("/"):
            out.write(f"unknown command {text.split()[0]}; {HELP}\n")
            out.flush()
            continue
        ids = conv.prompt_ids(user_text)
        room = service.context_size - len(ids)
        if room < 1:
            conv.undo()
            out.write(f"(the conversation has {len(ids)} tokens, the context holds {service.context_size}: "
                      "/reset to start a new one)\n")
            out.flush()
            continue
        params = SamplingParams(max_tokens=min(args.max_tokens, room), temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                repetition_penalty=args.repetition_penalty, seed=args.seed)
        gen, parts, last = [], [], None
        view = ReasoningView(tok, out, styled, not getattr(args, "hide_reasoning", False)) if conv.harmony else None
        if tool_list:
            view = CallView(fmt, out)
        t0 = time.perf_counter()
        t_first = None
        try:
            for o in service.stream(ids, params, constraint_of() if constraint_of else None):
                if o.token_ids and t_first is None:
                    t_first = time.perf_counter()
                gen.extend(o.token_ids)
                if view is not None:
                    parts.append(view.show(o))
                elif o.text:
                    parts.append(o.text)
                    out.write(o.text)
                    out.flush()
                last = o
        except ValueError as e:
            conv.undo()
            out.write(f"(refused: {e})\n")
            out.flush()
            continue
        t1 = time.perf_counter()
        out.write("\n")
        if last is None or last.finish_reason not in ("stop", "length"):
            conv.undo()
            out.write(f"(the reply failed: {getattr(last, 'error', None) or getattr(last, 'finish_reason', '?')})\n")
            out.flush()
            continue
        conv.answered(ids, gen, "".join(parts), view.calls() if isinstance(view, CallView) else None)
        if not args.no_stats:
            n = last.completion_tokens
            rate = (n - 1) / (t1 - t_first) if t_first and n > 1 and t1 > t_first else 0.0
            out.write(f"[prompt {last.prompt_tokens} tokens, {last.cached_tokens} reused from the KV cache, "
                      f"{last.prompt_tokens - last.cached_tokens} prefilled | reply {n} tokens, {rate:.1f} tok/s | "
                      f"first token {(t_first or t1) - t0:.2f} s{' | cut at --max-tokens' if last.finish_reason == 'length' else ''}]\n")
        out.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args_bcast(parser(), argv)
    from mpillm.startup import make_drafter, prepare_model
    from mpillm.serving.service import Service
    from mpillm.formats.tokenizer import load_tokenizer

    comm = MPI.COMM_WORLD
    model_dir = prepare_model(args, comm)   # --verify, kernel warm-up
    engine = open_engine(args, model_dir, verbose=False)

    def rank0() -> int:
        tok = load_tokenizer(Path(model_dir))
        service = Service(engine, tok, drafter=make_drafter(args, engine, tok))
        return chat_loop(service, tok, args)

    return engine.drive(rank0)


if __name__ == "__main__":
    run(main, "mpillm.chat")
