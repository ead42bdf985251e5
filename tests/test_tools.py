"""Tool calls and constrained decoding without a server: the per-family parsers on recorded
outputs (malformed calls stay text), streamed pieces joining to the whole call, the prompts, and
the grammar at the mask level (every token a constrained Sampler picks is one the grammar engine
allows; without the mask it is not). Each check has a control that shows it can fail."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mpillm.serving import tools as T

llg = pytest.importorskip("llguidance")

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                          "required": ["city", "days"], "additionalProperties": False}}

# recorded outputs, one per family
HERMES_OUT = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
              '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 1}}\n</tool_call>')
HARMONY_OUT = ("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
               'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris", "days": 2}<|call|>')
LLAMA_OUT = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}'
GENERIC_OUT = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]}'


@pytest.mark.parametrize("fmt,text,n", [(T.HERMES, HERMES_OUT, 2), (T.HARMONY, HARMONY_OUT, 1),
                                        (T.LLAMA, LLAMA_OUT, 1), (T.GENERIC, GENERIC_OUT, 1)])
def test_parsers_find_calls(fmt, text, n):
    p = T.parse(fmt, text)
    assert [c.name for c in p.calls] == ["get_weather"] * n
    assert json.loads(p.calls[0].arguments) == {"city": "Paris", "days": 2}
    if fmt == T.HERMES:
        assert p.content.strip() == "Let me check."
    if fmt == T.HARMONY:
        assert p.reasoning == "Need the weather." and p.content == ""
    # control: the same text read as another family finds no call
    other = T.GENERIC if fmt != T.GENERIC else T.HERMES
    assert T.parse(other, text).calls == []


@pytest.mark.parametrize("fmt,text", [
    (T.HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call>'),
    (T.HERMES, "<tool_call>\nnot json at all\n</tool_call>"),
    (T.HERMES, '<tool_call>\n{"name": "f", "arguments": {}} trailing\n</tool_call>'),
    (T.HARMONY, "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{oops<|call|>"),
    (T.LLAMA, '{"name": "get_weather", "parameters": {"city": '),
    (T.GENERIC, '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "P'),
    (T.GENERIC, '{"tool_calls": 7}'),
])
def test_malformed_calls_are_text(fmt, text):
    p = T.parse(fmt, text)
    assert p.calls == []
    assert p.content.strip(), "a malformed call is reported as text, not dropped"


def test_parse_never_raises(monkeypatch):
    """Whatever the model wrote, parse gives text; control: a parser that raises is contained."""
    def boom(text, final=True):
        raise RuntimeError("x")
    monkeypatch.setitem(T.PARSERS, T.HERMES, boom)
    assert T.parse(T.HERMES, "<tool_call>{").content == "<tool_call>{"


@pytest.mark.parametrize("fmt,text", [(T.HERMES, HERMES_OUT), (T.GENERIC, GENERIC_OUT), (T.HARMONY, HARMONY_OUT),
                                      (T.LLAMA, LLAMA_OUT)])
@pytest.mark.parametrize("step", [1, 3, 7])
def test_stream_pieces_join_to_the_whole(fmt, text, step):
    s = T.CallStream(fmt)
    content, args, names = "", {}, {}
    for i in range(0, len(text), step):
        c, deltas = s.feed(text[i:i + step])
        content += c
        for d in deltas:
            if d.id is not None:
                assert d.index not in names and d.arguments == ""   # id and name come first, alone
                names[d.index] = d.name
            args[d.index] = args.get(d.index, "") + d.arguments
    c, deltas = s.finish()
    content += c
    for d in deltas:
        if d.id is not None:
            names[d.index] = d.name
        args[d.index] = args.get(d.index, "") + d.arguments
    whole = T.parse(fmt, text)
    assert [names[i] for i in sorted(names)] == [c.name for c in whole.calls]
    assert [args[i] for i in sorted(args)] == [c.arguments for c in whole.calls]
    assert content == whole.content
    assert len(args) >= 1 and all(json.loads(a) for a in args.values())


def test_generic_response_streams_as_content():
    """The generic format's {"response": ...} answer streams as plain content, escapes decoded,
    piece by piece; an answer cut by max_tokens is the text so far, streamed or not. Control: an
    object that is no answer is given whole as text."""
    text = '{"response": "Hello \\"world\\" \\u00e9\\n!"}'
    s = T.CallStream(T.GENERIC)
    pieces = [s.feed(ch)[0] for ch in text] + [s.finish()[0]]
    assert "".join(pieces) == 'Hello "world" \u00e9\n!' and sum(1 for p in pieces if p) > 5
    assert not s.calls()
    bad = '{"response": "cut'
    s = T.CallStream(T.GENERIC)
    streamed = "".join(s.feed(ch)[0] for ch in bad)
    assert streamed + s.finish()[0] == "cut" == T.parse(T.GENERIC, bad).content
    assert T.parse(T.GENERIC, '{"answer": 1}').content == '{"answer": 1}'


def test_stream_splits_arguments():
    """The arguments come in several pieces (not all at the end): control for the test above."""
    s = T.CallStream(T.GENERIC)
    pieces = []
    for ch in GENERIC_OUT:
        pieces += [d.arguments for d in s.feed(ch)[1] if d.arguments]
    assert len(pieces) > 5


class FakeTok:
    chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

    def token_to_id(self, t):
        return None

    def apply_chat_template(self, messages, add_generation_prompt=True, **kw):
        import jinja2
        return jinja2.Template(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                          **kw)


def test_generic_fallback_prompt():
    tok = FakeTok()
    assert T.call_format(tok) == T.GENERIC
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "name": "get_weather",
                                                                "arguments": '{"city": "Paris", "days": 1}'}]},
            {"role": "tool", "content": "18 C", "tool_call_id": "c1"}]
    text = T.render(tok, msgs, [WEATHER], "auto", True)
    assert "get_weather" in text.split("<|im_start|>user")[0]          # the tools, in the system message
    assert '"tool_response"' in text and "18 C" in text and '"tool_calls"' in text
    prose = T.render(tok, msgs, [WEATHER], "none", True)      # no call may follow: prose, no JSON to imitate
    assert "Result of the tool call get_weather: 18 C" in prose and '"tool_calls"' not in prose
    assert "<|im_start|>tool" not in text      # the tool result goes in as a user message


def test_hermes_template_gets_tools():
    tok = FakeTok()
    tok.chat_template = ("{% if tools %}<tools>{% for t in tools %}{{ t.function.name }}{% endfor %}</tools>"
                         "<tool_call>{% endif %}{% for m in messages %}[{{ m.role }}]{{ m.content }}"
                         "{% for c in m.tool_calls or [] %}{{ c.function.arguments.city }}{% endfor %}{% endfor %}")
    assert T.call_format(tok) == T.HERMES
    msgs = [{"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "name": "get_weather",
                                                                "arguments": '{"city": "Oslo"}'}]},
            {"role": "tool", "content": "cold", "tool_call_id": "c1"}]
    text = T.render(tok, msgs, [WEATHER], "auto", True)
    assert "<tools>get_weather</tools>" in text and "Oslo" in text and "[tool]cold" in text
    assert "<tools>" not in T.render(tok, msgs, [WEATHER], "none", True)


# ---------------------------------------------------------------------------------------------
# the grammar at the mask level


@pytest.fixture(scope="module")
def grammars():
    from tokenizers import Tokenizer as HF

    from mpillm.formats.tokenizer import Tokenizer, _Backend
    from mpillm.serving.grammar import Grammars

    tokenizer_json = _tiny_tokenizer_json()

    class B(_Backend):
        def __init__(self):
            self.tk = HF.from_str(tokenizer_json)
            self.vocab_size = self.tk.get_vocab_size()

        def to_json(self):
            return self.tk.to_str()

        def token_to_id(self, t):
            return self.tk.token_to_id(t)

        def id_to_token(self, i):
            return self.tk.id_to_token(i)

        def decode(self, ids, skip):
            return self.tk.decode(ids, skip_special_tokens=skip)

        def encode(self, text):
            return self.tk.encode(text, add_special_tokens=False).ids

    be = B()
    eos = be.token_to_id("<eos>")
    tok = Tokenizer(be, {"tokenizer_kind": "tokenizers", "eos_token_ids": [eos], "eos_token_id": eos})
    return Grammars(tok, be.vocab_size + 7)      # the engine's vocabulary may be padded past the tokenizer's


def _tiny_tokenizer_json() -> str:
    """A byte-level BPE over every byte plus a few merges, and an <eos> special token."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    tk = HF(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ['{"city": "Paris", "days": 2}', '{"name": "x", "arguments": {}}', "the weather in paris is fine"] * 50
    tk.train_from_iterator(corpus, trainer)
    return tk.to_str()


SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "days": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["city", "days"], "additionalProperties": False}


def _generate(grammars, seed: int, steps: int = 80):
    """Constrained sampling from random logits; at every step check the kept token against an
    independent matcher of the same grammar. Returns (tokens, violations, finished)."""
    from mpillm.serving.sampling import Sampler, SamplingParams

    g = grammars.json_schema(SCHEMA)
    con = grammars.constraint(g)
    oracle = grammars.constraint(g)
    params = SamplingParams(max_tokens=steps, temperature=0.8, seed=seed)
    sampler = Sampler(params, grammars.vocab_size, (), con)
    rng = np.random.default_rng(seed)
    eos = set(grammars.tok.eos_ids)
    toks, bad = [], 0
    for _ in range(steps):
        logits = rng.normal(size=grammars.vocab_size).astype(np.float32) * 4
        t = sampler(logits)
        ok = oracle.allowed()
        if not ok[t]:
            bad += 1
            break
        toks.append(t)
        if t in eos:
            return toks, bad, True
        con.consume(t)
        oracle.consume(t)
        if con.done:
            return toks, bad, True
    return toks, bad, False


def test_every_constrained_token_is_allowed(grammars):
    for seed in range(5):
        toks, bad, finished = _generate(grammars, seed)
        assert bad == 0 and finished
        text = grammars.tok.decode([t for t in toks if t not in grammars.tok.eos_ids])
        import jsonschema
        jsonschema.validate(json.loads(text), SCHEMA)


def test_mask_control_skipping_the_mask_breaks_it(grammars, monkeypatch):
    """Control: with Constraint.apply a no-op the sampler soon picks a token the grammar forbids."""
    from mpillm.serving.grammar import Constraint

    monkeypatch.setattr(Constraint, "apply", lambda self, logits: None)
    assert any(_generate(grammars, seed)[1] for seed in range(5))


def test_padded_vocabulary_is_never_allowed(grammars):
    con = grammars.constraint(grammars.json_schema(SCHEMA))
    ok = con.allowed()
    assert ok.shape == (grammars.vocab_size,) and not ok[grammars.tok.vocab_size:].any() and ok.any()


@pytest.mark.parametrize("schema,needle", [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "strin"}, "strin"),
    ({"$ref": "#/nope"}, "nope"),
    ({"type": "object", "properties": {f"p{i}": {"enum": [f"v{i}_{j}" for j in range(40)]} for i in range(900)}},
     "the limit is"),
])
def test_bad_schemas_are_named(grammars, schema, needle):
    from mpillm.serving.grammar import GrammarError

    with pytest.raises(GrammarError) as e:
        f = "response_format.json_schema.schema"
        grammars.constraint(grammars.json_schema(schema, f), f)
    assert needle in str(e.value) and "response_format.json_schema.schema" in str(e.value)


def test_call_grammars_compile(grammars):
    """The forced-call grammar of every format compiles (hermes and harmony are Lark with %json)."""
    for fmt in (T.HERMES, T.LLAMA, T.GENERIC):
        for choice in ("required", "get_weather", "auto"):
            g = T.call_grammar(fmt, [WEATHER, dict(WEATHER, name="other")], choice, True)
            if g is not None:
                grammars.constraint(g)
    assert T.call_grammar(T.HERMES, [WEATHER], "auto", True) is None     # auto: the model decides
    assert T.call_grammar(T.GENERIC, [WEATHER], "none", True) is None
