"""Harmony (gpt-oss's chat format): the renderer against a harmony chat template, the streaming
channel parser on token streams (headers split over several ids, multi-byte text, stop tokens,
malformed streams), and the end-of-generation ids of a harmony vocabulary."""
from __future__ import annotations

import pytest

import harmony_fixture as HF
from mpillm.serving import harmony as H
from mpillm.formats.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(HF.write(tmp_path_factory.mktemp("harmony_tok"), model=False))


def ids_of(tok, text: str) -> list[int]:
    return tok.encode(text, add_bos=False)


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Capital of Italy?"}],
    [{"role": "developer", "content": "Be brief.\nNo lists."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? ünïcödé 日本"}],
]


def test_tokenizer_has_the_real_gpt_oss_ids(tok):
    assert tok.vocab_size == 201088
    for i, t in HF.NAMED.items():
        assert tok.token_to_id(t) == i and tok.id_to_token(i) == t
    assert H.is_harmony(tok)
    # <|end|> ends a message, not the generation; <|return|> and <|call|> do
    assert 200007 not in tok.eos_ids and {200002, 200012} <= tok.eos_ids


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_renderer_agrees_with_the_chat_template(tok, conv, effort):
    msgs = CONVERSATIONS[conv]
    date = "2026-01-31"
    ours = H.render(msgs, reasoning_effort=effort, date=date)
    theirs = tok.apply_chat_template(msgs, add_generation_prompt=True, reasoning_effort=effort, current_date=date)
    assert ours == theirs
    assert ours.endswith("<|start|>assistant") and f"Reasoning: {effort}\n" in ours
    assert ids_of(tok, ours)[-2:] == [200006, tok.token_to_id("assistant")]
    # prompt_text uses the model's template; without one, the renderer (today's date both ways)
    assert H.prompt_text(tok, msgs, effort) == H.render(msgs, reasoning_effort=effort)


# Renders pinned to OpenAI's harmony renderer (github.com/openai/harmony, src/encoding.rs:
# render_conversation_for_completion with a SystemContent of model identity, knowledge cutoff
# 2024-06, the date, the reasoning effort and the required channels analysis/commentary/final; a
# DeveloperContent with the instructions; next role assistant), written out by hand. Its system
# content joins "identity\ncutoff\ndate", "Reasoning: X" and "# Valid channels: ..." with blank lines;
# its developer content joins "# Instructions" and the text with one blank line and ends there.
# The chat_template.jinja shipped with the gpt-oss checkpoints writes the same system message but
# adds a blank line after the developer instructions ("...\n\n<|end|>"); render() follows the
# harmony library, the reference implementation of the format, and prompt_text() uses a model's own
# template when it has one.
SYSTEM_2026_01_31 = ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
                     "Knowledge cutoff: 2024-06\nCurrent date: 2026-01-31\n\nReasoning: {effort}\n\n"
                     "# Valid channels: analysis, commentary, final. Channel must be included for every message."
                     "<|end|>")
PINNED = [
    (0, "high", SYSTEM_2026_01_31.format(effort="high") + "<|start|>user<|message|>Hi<|end|><|start|>assistant"),
    (1, "low", SYSTEM_2026_01_31.format(effort="low") +
     "<|start|>developer<|message|># Instructions\n\nAnswer in French.<|end|>"
     "<|start|>user<|message|>Capital of Italy?<|end|><|start|>assistant"),
    (2, "medium", SYSTEM_2026_01_31.format(effort="medium") +
     "<|start|>developer<|message|># Instructions\n\nBe brief.\nNo lists.<|end|>"
     "<|start|>user<|message|>2+2?<|end|><|start|>assistant<|channel|>final<|message|>4<|end|>"
     "<|start|>user<|message|>And 3+3? ünïcödé 日本<|end|><|start|>assistant"),
]


@pytest.mark.parametrize("conv,effort,want", PINNED)
def test_renderer_matches_the_official_harmony_renders(conv, effort, want):
    assert H.render(CONVERSATIONS[conv], reasoning_effort=effort, date="2026-01-31") == want


def test_pinned_renders_catch_a_drifted_renderer(monkeypatch):
    """Negative control: the renderer and the project's own template drifting together (here the
    channel line) still agree with each other, but no longer with the pinned render."""
    conv, effort, want = PINNED[1]
    monkeypatch.setattr(H, "VALID_CHANNELS", "# Valid channels: analysis, final.")
    assert H.render(CONVERSATIONS[conv], reasoning_effort=effort, date="2026-01-31") != want
    monkeypatch.undo()
    # the gpt-oss chat_template.jinja's blank line after the instructions is a different prompt too
    hf_style = want.replace("Answer in French.<|end|>", "Answer in French.\n\n<|end|>")
    assert H.render(CONVERSATIONS[conv], reasoning_effort=effort, date="2026-01-31") != hf_style


def test_renderer_layout_and_refusals():
    text = H.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                     {"role": "assistant", "content": "A"}], date="2026-01-31", add_generation_prompt=False)
    assert text.startswith("<|start|>system<|message|>You are ChatGPT")
    assert "Current date: 2026-01-31\n\nReasoning: medium\n\n# Valid channels:" in text
    assert text.endswith("<|start|>developer<|message|># Instructions\n\nS<|end|><|start|>user<|message|>U<|end|>"
                         "<|start|>assistant<|channel|>final<|message|>A<|end|>")
    with pytest.raises(ValueError, match="only the first message"):
        H.render([{"role": "user", "content": "U"}, {"role": "system", "content": "S"}])
    with pytest.raises(ValueError, match="reasoning effort"):
        H.render([{"role": "user", "content": "U"}], reasoning_effort="extreme")


def stream(tok, text: str) -> list[int]:
    return ids_of(tok, text)


def test_parser_two_messages_and_return(tok):
    ids = stream(tok, "<|channel|>analysis<|message|>Think é 日本 step<|end|>"
                      "<|start|>assistant<|channel|>final<|message|>Answer: 42 ✓<|return|>")
    ids += stream(tok, "ignored after return")
    p = H.HarmonyParser(tok)
    deltas = []
    for i, t in enumerate(ids):
        deltas += p.feed(t)
        if t == 200007:                      # <|end|>: a message is done, the generation is not
            assert not p.done
    assert p.done and p.stop == "return"
    assert all("\ufffd" not in d.text for d in deltas)          # multi-byte characters never split
    assert "".join(d.text for d in deltas if d.channel == "analysis") == "Think é 日本 step"
    assert "".join(d.text for d in deltas if d.channel == "final") == "Answer: 42 ✓"
    assert [(m.role, m.channel) for m in p.messages] == [("assistant", "analysis"), ("assistant", "final")]
    # the reasoning streams before the answer
    first_final = next(i for i, d in enumerate(deltas) if d.channel == "final")
    assert all(d.channel == "analysis" for d in deltas[:first_final])
    assert H.split_channels(tok, ids) == ("Think é 日本 step", "Answer: 42 ✓", "")


def test_parser_tool_call_header_split_over_ids(tok):
    text = ("<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
            '{"city": "Oslo"}<|call|>')
    ids = stream(tok, text)
    # the header's text comes as many byte-level ids between the specials
    assert len(ids) > 12
    p = H.HarmonyParser(tok)
    deltas = p.feed_all(ids)
    assert p.done and p.stop == "call"
    m = p.messages[-1]
    assert (m.channel, m.recipient, m.constrain, m.text) == ("commentary", "functions.get_weather", "json",
                                                             '{"city": "Oslo"}')
    assert {d.channel for d in deltas} == {"commentary"}
    assert H.split_channels(tok, ids) == ("", "", '{"city": "Oslo"}')


def test_parser_recipient_in_role_and_message_without_channel(tok):
    p = H.HarmonyParser(tok)
    p.feed_all(stream(tok, "<|message|>plain<|end|><|start|>assistant to=functions.f<|channel|>commentary"
                           "<|message|>{}<|call|>"))
    assert [(m.channel, m.recipient, m.text) for m in p.messages] == [("final", None, "plain"),
                                                                      ("commentary", "functions.f", "{}")]


def test_parser_cut_by_max_tokens_flushes_the_open_message(tok):
    ids = stream(tok, "<|channel|>analysis<|message|>half a thou")
    p = H.HarmonyParser(tok)
    got = "".join(d.text for d in p.feed_all(ids))
    got += "".join(d.text for d in p.finish())
    assert got == "half a thou" and not p.done and p.text("analysis") == "half a thou"


def test_parser_malformed_streams(tok):
    # text outside a message is dropped; a <|start|> without <|end|> closes the open message
    ids = stream(tok, "<|channel|>analysis<|message|>a<|end|>junk between<|start|>assistant<|channel|>final"
                      "<|message|>b<|start|>assistant<|channel|>final<|message|>c<|return|>")
    p = H.HarmonyParser(tok)
    p.feed_all(ids)
    assert [(m.channel, m.text) for m in p.messages] == [("analysis", "a"), ("final", "b"), ("final", "c")]
    assert p.tok.decode(p.stray) == "junk between" and p.stop == "return"
    # <|return|> straight after a header also ends the stream
    p = H.HarmonyParser(tok)
    p.feed_all(stream(tok, "<|channel|>final<|return|>"))
    assert p.done and p.messages == []


def test_parser_refuses_a_vocabulary_without_harmony(tmp_path):
    from tokenizers import Tokenizer, models

    tk = Tokenizer(models.BPE(vocab={"a": 0, "<|end|>": 1}, merges=[]))
    tk.save(str(tmp_path / "tokenizer.json"))
    plain = load_tokenizer(tmp_path)
    assert not H.is_harmony(plain)
    with pytest.raises(ValueError, match="not a harmony model"):
        H.HarmonyParser(plain)


def test_fixture_model_chain_parses_to_the_expected_channels(tok):
    chain = HF.chain(tok._backend.tk)[1:]
    assert H.split_channels(tok, chain) == (HF.EXPECTED_REASONING, HF.EXPECTED_FINAL, "")
