"""Chat with a model in the terminal, across MPI ranks.

  mpirun -np 4 --hostfile hostfile python -m mpillm.chat [--model DIR] [--system "..."]

Multi-turn: each turn is rendered with the model's chat template, and the tokens of the
conversation so far (the previous prompt plus the tokens the model generated, exactly as
generated) are kept, so the service finds them in the slot's KV cache and only the new turn
is prefilled. Commands: /reset starts a new conversation, /exit (or end of input) leaves.
Rank 0 reads standard input (mpirun forwards it there) and prints the replies.
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

HELP = "commands: /reset (new conversation), /exit (leave); anything else is your next message"


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
    p.add_argument("--hide-reasoning", action="store_true",
                   help="harmony models: do not show the model's reasoning (it is shown dimmed before the answer)")
    return p


class Conversation:
    """The messages and the exact token ids of the conversation so far (for prefix reuse)."""

    def __init__(self, tok, system: str | None, reasoning_effort: str | None = None):
        from mpillm.serving import harmony

        self.tok, self.system = tok, system
        self.harmony = harmony.is_harmony(tok)
        self.effort = reasoning_effort
        self.reset()

    def render(self) -> str:
        if self.harmony:
            from mpillm.serving import harmony

            return harmony.prompt_text(self.tok, self.messages, self.effort)
        return self.tok.apply_chat_template(self.messages, add_generation_prompt=True)

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.known_ids: list[int] = []     # prompt + generated ids of the last turn
        self.known_text = ""               # the text those ids decode to

    def prompt_ids(self, user_text: str) -> list[int]:
        """The next prompt: the tokens already known, then only the new part of the rendered chat
        (when the template renders the history as a prefix of the new prompt, as chat templates do)."""
        self.messages.append({"role": "user", "content": user_text})
        full = self.render()
        if self.known_ids and full.startswith(self.known_text):
            return self.known_ids + self.tok.encode(full[len(self.known_text):], add_bos=False)
        return self.tok.encode(full, add_bos=False)

    def answered(self, prompt_ids: list[int], gen_ids: list[int], reply: str) -> None:
        self.messages.append({"role": "assistant", "content": reply})
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


def chat_loop(service, tok, args, inp=sys.stdin, out=sys.stdout) -> int:
    from mpillm.serving.sampling import SamplingParams

    conv = Conversation(tok, args.system, getattr(args, "reasoning_effort", None))
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
        if text == "/reset":
            conv.reset()
            out.write("(new conversation)\n")
            out.flush()
            continue
        if text.startswith("/"):
            out.write(f"unknown command {text.split()[0]}; {HELP}\n")
            out.flush()
            continue
        ids = conv.prompt_ids(text)
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
        t0 = time.perf_counter()
        t_first = None
        try:
            for o in service.stream(ids, params):
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
        conv.answered(ids, gen, "".join(parts))
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
