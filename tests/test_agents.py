"""Agents end to end: tool calls, schema-constrained output and the Responses API through the real
`openai` client against a real server (tests/serveutil.py) at 1 and 2 ranks.

Two chat formats, one server per (format, ranks), all at ``--buffer-type f64`` so that greedy
output is the same at 1 and 2 ranks:

  generic  the bundled SmolLM2 (its ChatML template knows nothing of tools: the generic fallback)
  hermes   the same weights with a Qwen-style template that renders ``tools`` and ``<tool_call>``
           (the tiny fixtures have no chat template; this one is written here)

Every test has a control: a request or check that shows the assertion can fail.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mpiutil import mpirun
from serveutil import Server

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pydantic = pytest.importorskip("pydantic")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]
RESULTS: dict = {}           # (format, ranks) -> greedy constrained outputs, compared across ranks

HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}{% else %}You are a helpful assistant.{% endif %}

# Tools

You may call one or more functions. Their signatures are within <tools></tools> XML tags:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>

For each call, return a JSON object with the function name and arguments within <tool_call></tool_call> tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'system' and loop.first %}
{%- elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{% if m.content %}{{ m.content }}
{% endif %}{% for c in m.tool_calls %}<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>
{% endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def bundled_dir(np_: int):
    """The bundled model's converted directory for ``np_`` ranks (converted now if it is not yet)."""
    code = ("from mpi4py import MPI; from mpillm.startup import resolve_model; "
            "d = resolve_model(None, MPI.COMM_WORLD); MPI.COMM_WORLD.Get_rank() or print(d)")
    r = mpirun(np_, ["-c", code], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return Path(r.stdout.strip().splitlines()[-1])


def hermes_dir(src, tmp):
    """The bundled weights (linked) with the Qwen-style tools template in tokenizer_config.json."""
    out = tmp / "hermes"
    out.mkdir()
    for p in src.iterdir():
        if p.name != "tokenizer_config.json":
            os.symlink(p, out / p.name)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = HERMES_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module", params=[("generic", 1), ("generic", 2), ("hermes", 1), ("hermes", 2)],
                ids=["generic-np1", "generic-np2", "hermes-np1", "hermes-np2"])
def server(request, tmp_path_factory):
    fmt, np_ = request.param
    args = ["--parallel", "4", "--buffer-type", "f64"]
    if fmt == "hermes":
        args += ["--model", str(hermes_dir(bundled_dir(np_), tmp_path_factory.mktemp("m")))]
    s = Server(np_, *args)
    try:
        s.wait_ready()
        s.fmt = fmt
        yield s
    finally:
        s.stop()


def client(s):
    return openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(s, **kw):
    c = client(s)
    kw.setdefault("max_tokens", 80)
    return c.chat.completions.create(model=c.models.list().data[0].id, temperature=0, **kw)


def parallel(s) -> bool:
    """parallel_tool_calls for a forced call: SmolLM2's weights never learned the hermes format, so
    after one call it goes on writing more until max_tokens; the generic fallback closes its list."""
    return s.fmt == "generic"


def params_of(tool):
    return tool["function"]["parameters"]


def check_call(call, tool):
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == tool["function"]["name"]
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, params_of(tool))
    return args


# ---------------------------------------------------------------------------------------------

def test_required_call(server):
    r = chat(server, messages=ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=parallel(server))
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) >= 1
    check_call(ch.message.tool_calls[0], WEATHER)
    RESULTS[(server.fmt, server.np, "required")] = [c.function.arguments for c in ch.message.tool_calls]
    # control: tool_choice none, same prompt: no call, and the text is not a valid call either
    r = chat(server, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=30)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


def test_named_function(server):
    for tool in (TIME, WEATHER):            # control: naming the other tool gives the other call
        r = chat(server, messages=ASK, tools=[WEATHER, TIME],
                 tool_choice={"type": "function", "function": {"name": tool["function"]["name"]}})
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1
        check_call(calls[0], tool)
    with pytest.raises(jsonschema.ValidationError):   # control: the validator rejects a wrong call
        jsonschema.validate({"city": "Paris"}, params_of(WEATHER))


def test_second_turn_renders_tool_result(server):
    call = chat(server, messages=ASK, tools=[WEATHER], tool_choice="required").choices[0].message.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "21 degrees and sunny"}]
    ids = server.post("/tokenize", {"messages": history, "tools": [WEATHER]})["tokens"]
    prompt = server.post("/detokenize", {"tokens": ids})["prompt"]
    assert "21 degrees and sunny" in prompt and call.function.name in prompt
    marker = "<tool_response>" if server.fmt == "hermes" else '"tool_response"'
    assert marker in prompt
    # control: without the tool message the result is not in the prompt
    ids0 = server.post("/tokenize", {"messages": history[:2], "tools": [WEATHER]})["tokens"]
    assert "21 degrees" not in server.post("/detokenize", {"tokens": ids0})["prompt"]
    r = chat(server, messages=history, tools=[WEATHER], max_tokens=40)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_stream_reassembles_to_the_call(server):
    whole = chat(server, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                 parallel_tool_calls=parallel(server)).choices[0].message.tool_calls
    c = client(server)
    calls, pieces, finish = {}, 0, None
    for ch in c.chat.completions.create(model=c.models.list().data[0].id, messages=ASK, tools=[WEATHER, TIME],
                                        tool_choice="required", temperature=0, max_tokens=80, stream=True,
                                        parallel_tool_calls=parallel(server)):
        for choice in ch.choices:
            finish = choice.finish_reason or finish
            for d in choice.delta.tool_calls or []:
                if d.id is not None:                     # id, type and name come first
                    assert d.index not in calls and d.function.name and d.type == "function"
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""}
                else:
                    calls[d.index]["arguments"] += d.function.arguments
                    pieces += 1
    assert finish == "tool_calls"
    assert [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)] == \
        [(t.function.name, t.function.arguments) for t in whole]
    assert pieces > 1           # control: the arguments really came in pieces, not as one string


class City(pydantic.BaseModel):
    name: str
    country: str
    population_millions: float


def test_parse_pydantic(server):
    c = client(server)
    m = c.models.list().data[0].id
    msgs = [{"role": "user", "content": "Describe Paris (name, country, population in millions) as JSON."}]
    r = c.chat.completions.parse(model=m, messages=msgs, response_format=City, temperature=0, max_tokens=80)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(r.choices[0].message.parsed, City)
    RESULTS[(server.fmt, server.np, "parse")] = r.choices[0].message.content
    # control: the same request unconstrained does not give a valid City
    free = c.chat.completions.create(model=m, messages=msgs, temperature=0, max_tokens=80).choices[0].message.content
    with pytest.raises((pydantic.ValidationError, ValueError)):
        City.model_validate_json(free)


def test_responses_api(server):
    c = client(server)
    m = c.models.list().data[0].id
    flat = [dict(WEATHER["function"], type="function")]
    r = c.responses.create(model=m, input=ASK[0]["content"], tools=flat, tool_choice="required", temperature=0,
                           max_output_tokens=80, parallel_tool_calls=parallel(server))
    assert r.status == "completed" and r.output[0].type == "function_call"
    jsonschema.validate(json.loads(r.output[0].arguments), params_of(WEATHER))
    events, args = [], ""
    with c.responses.stream(model=m, input=ASK[0]["content"], tools=flat, tool_choice="required", temperature=0,
                            max_output_tokens=80, parallel_tool_calls=parallel(server)) as s:
        for e in s:
            events.append(e.type)
            if e.type == "response.function_call_arguments.delta":
                args += e.delta
        final = s.get_final_response()
    assert events[0] == "response.created" and events[-1] == "response.completed"
    assert args == final.output[0].arguments == r.output[0].arguments
    # text output, schema-constrained, streamed
    text = ""
    for e in c.responses.create(model=m, input="Describe Paris as JSON.", temperature=0, max_output_tokens=80,
                                text={"format": {"type": "json_schema", "name": "city",
                                                 "schema": City.model_json_schema(), "strict": True}}, stream=True):
        if e.type == "response.output_text.delta":
            text += e.delta
    City.model_validate_json(text)
    # control: state is refused by name
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model=m, input="hi", previous_response_id="resp_123")
    assert e.value.body["param"] == "previous_response_id"


def test_greedy_constrained_same_at_1_and_2_ranks(server):
    """At 2 ranks: the greedy constrained outputs equal the 1-rank server's (the module's servers
    run in order, 1 rank first). At 1 rank: the same request twice gives the same call."""
    if server.np == 1:
        again = chat(server, messages=ASK, tools=[WEATHER], tool_choice="required",
                     parallel_tool_calls=parallel(server)).choices[0].message.tool_calls
        assert [c.function.arguments for c in again] == RESULTS[(server.fmt, 1, "required")]
    else:
        for what in ("required", "parse"):
            one = RESULTS.get((server.fmt, 1, what))
            assert one is not None, "the 1-rank server's results are missing: run the whole module"
            assert RESULTS[(server.fmt, 2, what)] == one
    # control: a different question gives a different call, so equality is not vacuous
    other = chat(server, messages=[{"role": "user", "content": "Weather in Tokyo, in fahrenheit?"}], tools=[WEATHER],
                 tool_choice="required", parallel_tool_calls=parallel(server)).choices[0].message.tool_calls
    assert [c.function.arguments for c in other] != RESULTS[(server.fmt, server.np, "required")]


def test_unsatisfiable_within_max_tokens_is_length(server):
    long = {"type": "object", "properties": {"story": {"type": "string", "minLength": 400}}, "required": ["story"],
            "additionalProperties": False}
    r = chat(server, messages=ASK, max_tokens=20,
             response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": long}})
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(ValueError):
        json.loads(r.choices[0].message.content)
    # control: a schema that fits ends with stop and valid JSON
    short = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
             "additionalProperties": False}
    r = chat(server, messages=ASK, max_tokens=20,
             response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": short}})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content)["ok"], bool)


def test_hostile_inputs_then_serving(server):
    c = client(server)
    m = c.models.list().data[0].id

    def refused(param_start: str, needle: str, **kw):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=m, messages=ASK, max_tokens=8, **kw)
        assert (e.value.body["param"] or "").startswith(param_start), e.value.body
        assert needle in e.value.body["message"], e.value.body

    big = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 300}
                                            for i in range(3500)}}
    assert len(json.dumps(big)) > 1 << 20
    refused("response_format.json_schema.schema", "limit",
            response_format={"type": "json_schema", "json_schema": {"name": "b", "schema": big}})
    deep: dict = {"type": "string"}
    for _ in range(200):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=m, messages=ASK, max_tokens=8,
                                  response_format={"type": "json_schema", "json_schema": {"name": "d", "schema": deep}})
    assert "nested" in e.value.body["message"]
    refused("response_format.json_schema.schema", "uniqueItems",
            response_format={"type": "json_schema", "json_schema": {"name": "u", "schema": {
                "type": "array", "uniqueItems": True}}})
    refused("tools[1].function.name", "duplicate", tools=[WEATHER, WEATHER])
    refused("tools[0].function.parameters", "Invalid type", tools=[
        {"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}], tool_choice="required")
    # a schema that recurses for ever compiles (llguidance takes $ref cycles) but no finite value
    # satisfies it: the engine leaves only EOS, and the answer ends with length, never as complete
    forever = {"$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}}, "required": ["c"],
                               "additionalProperties": False}}, "$ref": "#/$defs/n"}
    r = chat(server, messages=ASK, max_tokens=24,
             response_format={"type": "json_schema", "json_schema": {"name": "f", "schema": forever}})
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(ValueError):
        json.loads(r.choices[0].message.content)
    # control and liveness: a good request right after is served
    r = chat(server, messages=ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    assert r.choices[0].finish_reason == "tool_calls"
