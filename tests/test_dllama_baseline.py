"""The distributed-llama baseline's own parts that run without root or its binary: reading its
output (benchmarks/dllama.py) and the GGUF -> Hugging Face export (scripts/gguf_to_hf.py)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from benchmarks import dllama

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# the root's stdout as v0.16.4 prints it (2 nodes, 3 prompt tokens, 3 generated)
OUT = """\
💿 Weights loaded
🚁 Network is in non-blocking mode
The capital
🔷️ Eval  281 ms Sync   12 ms | Sent   150 kB Recv   636 kB | (2 tokens)
🔶 Pred  100 ms Sync   81 ms | Sent    76 kB Recv   318 kB | River
🔶 Pred   98 ms Sync   90 ms | Sent    76 kB Recv   318 kB |  River
🔶 Pred   93 ms Sync   84 ms | Sent    77 kB Recv   318 kB | ~

Evaluation
   nBatches: 32
    nTokens: 2
   tokens/s: 6.84 (146.50 ms/tok)
Prediction
    nTokens: 3
   tokens/s: 5.47 (182.97 ms/tok)
"""


def test_parse_reads_its_summary_and_per_token_lines():
    r = dllama.parse(OUT)
    assert r["tok_s"] == 5.47 and r["ms_tok"] == 182.97 and r["n_tokens"] == 3
    assert r["comm_ms"] == pytest.approx(85.0) and r["compute_ms"] == pytest.approx(97.0)
    # its counters reset on every read: per token as printed, not differences
    assert r["kib_tok"] == pytest.approx(76.33, abs=0.01) and r["recv_kib_tok"] == 318.0
    assert r["prompt_tokens"] == 3


def test_parse_without_a_summary_is_a_failed_run():
    assert dllama.parse(OUT.split("Evaluation")[0]) is None
    assert dllama.parse("🚨 Critical error: Unsupported mode") is None


def test_commands_are_one_node_per_host_with_q80_sync():
    root = dllama.root_argv(Path("d"), Path("m.m"), Path("t.t"), ["10.213.57.2:9998"], "Hi", 40, turbo=False)
    assert root[:2] == ["d", "inference"]
    assert root[root.index("--buffer-float-type") + 1] == "q80" and root[root.index("--nthreads") + 1] == "1"
    assert root[root.index("--net-turbo") + 1] == "0" and root[-2:] == ["--workers", "10.213.57.2:9998"]
    w = dllama.worker_argv(Path("d"), "10.213.57.2")
    assert w[:2] == ["d", "worker"] and w[w.index("--host") + 1] == "10.213.57.2"
    assert dllama.steps_for("Hi", 32) == 35


def test_unpermute_undoes_llama_cpp_and_matches_our_converter():
    from convert.sources import _unpermute_rows

    g = _script("gguf_to_hf")
    rng = np.random.default_rng(0)
    for n_head, hd in ((4, 8), (3, 64)):
        w = rng.standard_normal((n_head * hd, 5)).astype(np.float32)
        assert np.array_equal(g.unpermute(g.permute(w, n_head), n_head), w)
        assert np.array_equal(g.unpermute(w, n_head), _unpermute_rows(w, n_head))
        assert not np.array_equal(g.permute(w, n_head), w)
    # one head of 4 rows [a0 a1 | b0 b1]: llama.cpp interleaves the halves
    h = np.arange(4.0).reshape(4, 1)
    assert g.permute(h, 1).ravel().tolist() == [0.0, 2.0, 1.0, 3.0]


def test_rope_freqs_are_recognized_as_llama_3_2_scaling():
    """make_baseline_ggufs.py writes the 1B shape's rope_freqs with its own formula; the export
    must name the rope_scaling that produced it."""
    g = _script("gguf_to_hf")
    mk = _script("make_baseline_ggufs")
    c = mk.LLAMA_32_1B
    div = mk.llama3_rope_factors(c)
    sc = g.rope_scaling_of(np.asarray(div, np.float64), c["rope_theta"], c["head_dim"])
    assert sc == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
    with pytest.raises(ValueError):
        g.rope_scaling_of(np.ones(c["head_dim"] // 2), c["rope_theta"], c["head_dim"])


def test_bf16_rounds_to_nearest_even():
    g = _script("gguf_to_hf")
    x = np.array([1.0, -2.5, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 3.0e38], np.float32)
    got = (g.to_dtype(x, "bf16").astype(np.uint32) << 16).view(np.float32)
    assert got[:2].tolist() == [1.0, -2.5]
    assert got[2] == 1.0                    # a tie goes to the even mantissa
    assert got[3] == 1.0 + 4 * 2 ** -8      # 1 + 3/256 rounds up to 1 + 4/256
    assert np.isfinite(got[4])
