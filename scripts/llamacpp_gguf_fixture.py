#!/usr/bin/env python3
"""Convert the deepseek2 test fixtures to GGUF with llama.cpp's own converter.

tests/fixtures/deepseek_v3/model.gguf is written by our fixture script in llama.cpp's naming; this
script makes the file llama.cpp itself writes from the same Hugging Face checkpoint, so the test
(tests/test_deepseek.py, tests/mpi/test_deepseek_mpi.py) checks our reading of the converter's real
output: the kv_b split into attn_k_b / attn_v_b, the stacked experts, exp_probs_b, the gating
function, leading_dense_block_count and the YaRN keys.

Run it with the fixtures venv (torch and transformers: the converter imports them) and llama.cpp's
sources (convert_hf_to_gguf.py, conversion/, gguf-py/):

    /work/fixtures-venv/bin/python scripts/llamacpp_gguf_fixture.py --llamacpp /path/to/llama.cpp

It writes tests/fixtures/deepseek_v3/llamacpp-{f32,q8_0}.gguf and llamacpp.json (the llama.cpp
version and the sha256 of the converter files used, the command, the sizes).

The converter runs in this process on its own code, with one substitution: the tokenizer. It
identifies a BPE pre-tokenizer by the hash of a test string's token ids against a table of
published models (the table convert_hf_to_gguf_update.py regenerates), and refuses any other; the
fixture's 512-token toy vocabulary cannot be in it. So the staged checkpoint gets a tokenizer.json of
that toy vocabulary (the one tests/fixtures/make_fixtures.py writes into its own GGUFs) and the lookup
answers "default" (llama.cpp's default pre-tokenizer) for it. The vocabulary plays no part in the
logits; every tensor and every other key is the converter's.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
# the fixtures converted, and the output types: f32 (the exact test) and q8_0 (the converter's own
# quantization: what a downloaded Q8_0 file holds)
JOBS = [("deepseek_v3", "f32"), ("deepseek_v3", "q8_0")]
# the converter's files whose content decides the output (recorded by hash)
CONVERTER_FILES = ["convert_hf_to_gguf.py", "conversion/base.py", "conversion/deepseek.py",
                   "gguf-py/gguf/constants.py", "gguf-py/gguf/gguf_writer.py", "gguf-py/gguf/quants.py",
                   "gguf-py/gguf/tensor_mapping.py"]


def llamacpp_version(src: Path) -> dict:
    """What identifies the llama.cpp sources: the llama-cpp-python release they are vendored in (when
    they are), the version strings in their build files, gguf-py's version, the files' hashes."""
    info: dict = {}
    for key, path in (("llama.cpp", src / "CMakeLists.txt"), ("ggml", src / "ggml" / "CMakeLists.txt")):
        prefix = "LLAMA" if key == "llama.cpp" else "GGML"
        parts = {}
        for line in path.read_text().splitlines():
            for p in ("MAJOR", "MINOR", "PATCH"):
                if line.startswith(f"set({prefix}_VERSION_{p} "):
                    parts[p] = line.split()[1].rstrip(")")
        info[key] = ".".join(parts.get(p, "?") for p in ("MAJOR", "MINOR", "PATCH"))
    for line in (src / "gguf-py" / "pyproject.toml").read_text().splitlines():
        if line.startswith("version"):
            info["gguf-py"] = line.split("=", 1)[1].strip().strip('"')
    for p in (src.parent, src.parent.parent):
        for tgz in sorted(p.glob("llama_cpp_python-*.tar.gz")):
            info["vendored_in"] = tgz.name.removesuffix(".tar.gz")
    info["sha256"] = {f: hashlib.sha256((src / f).read_bytes()).hexdigest() for f in CONVERTER_FILES}
    return info


def write_tokenizer(d: Path, vocab_size: int) -> None:
    """tokenizer.json / tokenizer_config.json of make_fixtures.tiny_gpt2_vocab: 256 byte tokens, two-letter
    merges, three control tokens at the end, byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    sys.path.insert(0, str(FIXTURES))
    from make_fixtures import SPECIAL_TOKENS, tiny_gpt2_vocab

    tokens, _, merges = tiny_gpt2_vocab(vocab_size)
    n = vocab_size - len(SPECIAL_TOKENS)
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens[:n])}, merges=[tuple(m.split(" ")) for m in merges])
    tk = Tokenizer(bpe)
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(SPECIAL_TOKENS)
    assert tk.get_vocab_size() == vocab_size and tk.token_to_id(SPECIAL_TOKENS[-1]) == vocab_size - 1
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "add_bos_token": False, "model_max_length": 4096}, indent=2) + "\n")


def convert(src: Path, fixture: str, outtype: str, out: Path) -> None:
    """llama.cpp's converter (its main(), its argument parsing) on a staged copy of the fixture."""
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / fixture
        stage.mkdir()
        for f in ("config.json", "model.safetensors"):
            os.symlink(FIXTURES / fixture / f, stage / f)
        write_tokenizer(stage, json.loads((FIXTURES / fixture / "config.json").read_text())["vocab_size"])
        argv = sys.argv
        sys.argv = ["convert_hf_to_gguf.py", str(stage), "--outtype", outtype, "--outfile", str(out),
                    "--model-name", f"mpillm-fixture-{fixture}"]
        try:
            import convert_hf_to_gguf
            convert_hf_to_gguf.main()
        finally:
            sys.argv = argv


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llamacpp", type=Path, required=True,
                    help="llama.cpp's source directory (convert_hf_to_gguf.py, conversion/, gguf-py/)")
    args = ap.parse_args()
    src = args.llamacpp.resolve()
    if not (src / "convert_hf_to_gguf.py").exists() or not (src / "conversion" / "deepseek.py").exists():
        ap.error(f"{src}: no convert_hf_to_gguf.py / conversion/deepseek.py (a llama.cpp source tree of 2026 "
                 f"or later, where the converter is split into conversion/)")
    # llama.cpp's own gguf-py, ahead of any installed gguf, as convert_hf_to_gguf.py itself arranges
    sys.path[:0] = [str(src), str(src / "gguf-py")]
    import gguf
    assert Path(gguf.__file__).resolve().is_relative_to(src), f"gguf imported from {gguf.__file__}, not {src}"
    from conversion.base import TextModel

    # the one substitution (see the module docstring): the toy vocabulary's pre-tokenizer
    TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"

    record = {"llama.cpp": llamacpp_version(src), "files": {}}
    for fixture, outtype in JOBS:
        out = FIXTURES / fixture / f"llamacpp-{outtype}.gguf"
        convert(src, fixture, outtype, out)
        record["files"][str(out.relative_to(ROOT))] = {
            "command": f"convert_hf_to_gguf.py {fixture} --outtype {outtype}", "bytes": out.stat().st_size,
            "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}
        print(f"{out.relative_to(ROOT)}: {out.stat().st_size / 1e6:.3f} MB", flush=True)
    (FIXTURES / "deepseek_v3" / "llamacpp.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
