"""Bad input: each case names its cause (and rank), every rank exits non-zero, nothing hangs.

Each MPI job runs under a 60 s timeout (tests/mpiutil.py kills the job and fails the test).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mpiutil import ROOT, mpirun

FIX = ROOT / "tests" / "fixtures" / "llama"
TOKENS = ["1", "17", "305", "42"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from convert.__main__ import convert

    out = tmp_path_factory.mktemp("errs") / "llama"
    convert(FIX, out, [1, 2, 3], "q8_0", progress=False, tokenizer=False)
    return out


def fresh_copy(model: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "m"
    shutil.copytree(model, dst)
    return dst


def run_logits(np_: int, model: Path, tmp_path: Path, extra_env=None):
    t0 = time.monotonic()
    r = mpirun(np_, ["tests/scripts/logits.py", str(model), str(tmp_path / "out.npy"), *TOKENS], timeout=120,
               env=extra_env)
    return r, time.monotonic() - t0


def assert_failed(r, *needles):
    text = r.stdout + r.stderr
    assert r.returncode != 0, f"expected a failure, got exit 0:\n{text}"
    for n in needles:
        assert n in text, f"{n!r} not in output:\n{text[-3000:]}"
    assert "Traceback" not in text, f"an input error must not show a traceback:\n{text[-3000:]}"


def test_good_model_runs(model, tmp_path):
    r, _ = run_logits(2, model, tmp_path)
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "out.npy").shape == (4, 512)


def test_missing_shard(model, tmp_path):
    m = fresh_copy(model, tmp_path)
    (m / "ws3" / "rank1.h5").unlink()
    r, dt = run_logits(3, m, tmp_path)
    assert_failed(r, "rank 1", "missing")
    assert dt < 30


def test_wrong_world_size(model, tmp_path):
    r, _ = run_logits(4, model, tmp_path)
    assert_failed(r, "converted for world sizes [1, 2, 3]", "4 ranks")


def test_shard_of_another_world_size(model, tmp_path):
    m = fresh_copy(model, tmp_path)
    shutil.copy(m / "ws3" / "rank0.h5", m / "ws2" / "rank0.h5")
    r, _ = run_logits(2, m, tmp_path)
    assert_failed(r, "rank 0", "converted for world size 3 rank 0")


def test_truncated_shard(model, tmp_path):
    m = fresh_copy(model, tmp_path)
    p = m / "ws2" / "rank1.h5"
    size = p.stat().st_size
    with open(p, "r+b") as fh:
        fh.truncate(size // 2)
    r, _ = run_logits(2, m, tmp_path)
    assert_failed(r, "rank 1")
    assert "truncated" in r.stderr or "corrupt" in r.stderr


def test_corrupt_shard(model, tmp_path):
    m = fresh_copy(model, tmp_path)
    p = m / "ws2" / "rank0.h5"
    with open(p, "r+b") as fh:
        fh.seek(0)
        fh.write(b"\0" * 4096)
    r, _ = run_logits(2, m, tmp_path)
    assert_failed(r, "rank 0", "corrupt")


def test_not_a_model_dir(tmp_path):
    r, _ = run_logits(2, tmp_path, tmp_path)
    assert_failed(r, "not a converted mpillm model")


def test_more_ranks_than_heads(tmp_path):
    """The fixture has 6 query heads: 7 ranks cannot split it, at conversion or at run time."""
    from convert.__main__ import convert

    with pytest.raises(ValueError, match="exceeds the model's 6 query heads"):
        convert(FIX, tmp_path / "x", [7], "f32", progress=False, tokenizer=False)
    m = tmp_path / "m1"
    convert(FIX, m, [1], "f32", progress=False, tokenizer=False)
    r, _ = run_logits(7, m, tmp_path)
    assert_failed(r, "exceeds the model's 6 query heads")


def _convert_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convert", *map(str, args), "--no-progress"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_unknown_architecture(tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(FIX, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    r = _convert_cli(src, tmp_path / "out", "--world-size", "1")
    assert r.returncode != 0
    assert "unknown architecture 'GPT2LMHeadModel'" in r.stderr and "LlamaForCausalLM" in r.stderr


def test_unsupported_tensor_type(tmp_path):
    """A GGUF tensor in a type we do not store (Q5_0) is refused under auto, converted when asked."""
    import gguf

    src = gguf.GGUFReader(FIX / "model.gguf")
    path = tmp_path / "k.gguf"
    w = gguf.GGUFWriter(path, "llama")
    for f in src.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_array(f.name, f.contents())
        else:
            w.add_key_value(f.name, f.contents(), vt)
    for t in src.tensors:
        data = np.asarray(t.data)
        if t.name == "blk.1.attn_v.weight":
            q = gguf.quants.quantize(np.ascontiguousarray(data), gguf.GGMLQuantizationType.Q5_0)
            w.add_tensor(t.name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q5_0)
        else:
            w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = _convert_cli(path, tmp_path / "out", "--world-size", "1", "--no-tokenizer")
    assert r.returncode != 0
    assert "blk.1.attn_v" in r.stderr or "layers/1/wv" in r.stderr
    assert "Q5_0" in r.stderr and "--weight-type" in r.stderr
    r = _convert_cli(path, tmp_path / "out", "--world-size", "1", "--no-tokenizer", "--weight-type", "q8_0")
    assert r.returncode == 0, r.stderr


def test_prompt_longer_than_max_seq_len():
    t0 = time.monotonic()
    r = mpirun(2, ["-m", "mpillm.generate", "--max-seq-len", "8", "--quiet", "--prompt",
                   "one two three four five six seven eight nine ten eleven twelve"], timeout=120)
    assert_failed(r, "--max-seq-len 8")
    assert "tokens" in r.stderr
    assert time.monotonic() - t0 < 120
