#!/usr/bin/env python3
"""A minimal agent against mpillm's server: the openai client's tool-calling loop with a tool this
script runs itself (arithmetic on a small expression language, safe to evaluate).

    scripts/serve.sh &                                   # or: python -m mpillm.serve --port 8080
    python scripts/agent_loop.py [--url http://127.0.0.1:8080/v1] [--question "..."]

Each turn: send the conversation with the tool; if the reply calls the tool, run it, append the
call and its result, and ask again; stop at a reply without calls (the answer) or after
``--max-turns``. A call repeated with the same arguments is not run again: the next request
asks for the answer (``tool_choice: none``), a guard small models need. The bundled SmolLM2 has no tool template: the server's generic fallback
describes the tool to it and constrains its reply to a call or an answer.
"""
from __future__ import annotations

import argparse
import ast
import json
import operator

import openai

CALC = {"type": "function", "function": {
    "name": "calculate",
    "description": "Evaluate an arithmetic expression with + - * / ** and parentheses, e.g. '12 * (3 + 4)'",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string", "pattern": "^[0-9][0-9 +*/().-]{0,79}$"}},
                   "required": ["expression"], "additionalProperties": False}}}

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expression: str) -> str:
    """The tool: numbers and + - * / ** only (no names, no calls), so the model cannot run code."""
    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            right = ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](ev(node.left), right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"not allowed: {ast.dump(node)[:60]}")
    try:
        return str(ev(ast.parse(expression, mode="eval").body))
    except (ValueError, SyntaxError, ZeroDivisionError, TypeError) as e:
        return f"error: {e}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8080/v1")
    p.add_argument("--api-key", default="unused")
    p.add_argument("--question", default="What is 1234 * 5678? Use the calculator.")
    p.add_argument("--max-turns", type=int, default=4)
    args = p.parse_args()
    client = openai.OpenAI(base_url=args.url, api_key=args.api_key, max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": args.question}]
    print(f"user: {args.question}")
    done: set[tuple[str, str]] = set()      # calls already run: a repeat asks for the answer instead
    choice = "auto"
    for _ in range(args.max_turns):
        # one call per turn: a 135M model asked for several repeats the same call until max_tokens
        r = client.chat.completions.create(model=model, messages=messages, tools=[CALC], tool_choice=choice,
                                           temperature=0, max_tokens=200, parallel_tool_calls=False)
        msg = r.choices[0].message
        if msg.tool_calls and all((c.function.name, c.function.arguments) in done for c in msg.tool_calls):
            print("(the model repeats a call it has the result of: asking for the answer, tool_choice none)")
            choice = "none"
            continue
        if not msg.tool_calls:
            print(f"assistant: {msg.content}  [finish_reason={r.choices[0].finish_reason}]")
            return 0
        messages.append({"role": "assistant", "content": msg.content, "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in msg.tool_calls]})
        for c in msg.tool_calls:
            result = calculate(json.loads(c.function.arguments).get("expression", "")) \
                if c.function.name == "calculate" else f"error: no tool {c.function.name}"
            print(f"tool call: {c.function.name}({c.function.arguments}) -> {result}")
            done.add((c.function.name, c.function.arguments))
            messages.append({"role": "tool", "tool_call_id": c.id, "content": result})
    print("(stopped after --max-turns turns)")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
