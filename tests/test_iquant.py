"""The IQ4 weight types (iq4_nl, iq4_xs, and iq4_xs_32 for column cuts inside super-blocks):
layouts, dequantization, kernels in every path this CPU runs.

- split_ggml / join_ggml are lossless on random GGML blocks, and our dequantization is
  bit-identical to gguf.quants'; controls: one table entry changed, or the 32 of the 6-bit
  scales dropped, no longer match;
- every kernel path against two float64 references of the same sum (our dequantization and
  gguf's, on the kernel's own q8_0 activations); control: the reference with one table entry
  changed is far outside the tolerance;
- the extremes (codes -127 and 113 against activations +-127, the largest scales): exactly the
  integer sums (no i16 saturation on AVX2's vpmaddubsw, see mpillm.kernels.iquant);
- a row's result does not depend on its batch; the float64 kernels; shape errors;
- the portable lookup lowers to AArch64's tbl, with sdot for the dot products.
(The converter and the model forward: tests/kquant_gguf.py has IQ4 tensors, used by
tests/test_kquant.py and tests/mpi/test_kquant_mpi.py.)
"""
from __future__ import annotations

import numpy as np
import pytest

from avx2only import not_on_avx2_only, run_on_avx2_only
from mpillm import kernels
from mpillm.formats import quant

gguf = pytest.importorskip("gguf")
TYPES = ["iq4_nl", "iq4_xs"]
ALL = TYPES + ["iq4_xs_32"]
SHAPES = [(1, 7, 512), (3, 9, 768), (5, 6, 352)]  # (T, N, K): 352 = 11 sub-blocks (partial groups)


def _qt(wtype):
    return getattr(gguf.GGMLQuantizationType, quant.base_type(wtype).upper())


def _path(name):
    try:
        return kernels.get_path(name)
    except RuntimeError as e:
        pytest.skip(str(e))


def _arrays(wtype, N, K, rng):
    """Random arrays of a type; iq4_xs_32 at any multiple of 32 columns: an iq4_xs matrix in its
    per-32 form, its columns cut as the converter cuts a row-parallel slice."""
    if wtype != "iq4_xs_32":
        return quant.random_arrays(wtype, N, K, rng)
    Kf = -(-K // 256) * 256
    a, _ = quant.to_per32(quant.random_arrays("iq4_xs", N, Kf, rng), "iq4_xs")
    return {k: np.ascontiguousarray(v[:, :v.shape[1] * K // Kf]) for k, v in a.items()}


@pytest.mark.parametrize("wtype", TYPES)
def test_ggml_round_trip_and_dequantize(wtype):
    rng = np.random.default_rng(1)
    rows, cols = 6, 768
    raw = quant.random_ggml(wtype, rows, cols, rng)
    a = quant.split_ggml(raw, wtype, rows, cols)
    for k, (shape, dt) in quant.array_shapes(wtype, rows, cols).items():
        assert a[k].shape == shape and a[k].dtype == np.dtype(dt), k
    assert np.array_equal(quant.join_ggml(a, wtype), raw)
    ref = gguf.quants.dequantize(raw, _qt(wtype)).reshape(rows, cols).astype(np.float32)
    ours = quant.dequantize(a, wtype)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    if wtype == "iq4_xs":
        assert a["sc"].min() == -32 and a["sc"].max() == 31  # every 6-bit scale seen
        b, t32 = quant.to_per32(a, wtype)
        assert t32 == "iq4_xs_32"
        assert np.array_equal(quant.dequantize(b, t32).view(np.uint32), ours.view(np.uint32))


def test_dequantize_controls(monkeypatch):
    """Negative controls of the test above: a changed table entry, and the scales read as ls
    instead of ls - 32, no longer match gguf."""
    rng = np.random.default_rng(1)
    raw = quant.random_ggml("iq4_xs", 4, 512, rng)
    ref = gguf.quants.dequantize(raw, _qt("iq4_xs")).reshape(4, 512)
    a = quant.split_ggml(raw, "iq4_xs", 4, 512)
    assert np.array_equal(quant.dequantize(a, "iq4_xs"), ref)
    assert not np.array_equal(quant.dequantize(dict(a, sc=(a["sc"] + 32).astype(np.int8)), "iq4_xs"), ref)
    kv = quant.IQ4_KVALUES.copy()
    kv[5] += 1
    monkeypatch.setattr(quant, "IQ4_KVALUES", kv)
    assert not np.array_equal(quant.dequantize(a, "iq4_xs"), ref)


def test_no_quantizer():
    with pytest.raises(ValueError, match="no quantizer for iq4_nl"):
        quant.quantize(np.zeros((2, 256), np.float32), "iq4_nl")


def _acts(T, K, rng):
    nb = K // 32
    x = rng.standard_normal((T, K)).astype(np.float32)
    xq, xd, xs = np.empty((T, K), np.int8), np.empty((T, nb), np.float32), np.empty((T, nb), np.int32)
    kernels.get_path("portable").quantize_q8_0(x, xq, xd, xs)
    xf = (xq.reshape(T, nb, 32).astype(np.float64) * xd[..., None]).reshape(T, K)
    return (xq, xd, xs), xf


def _refs(a, wtype, xf, kv=None):
    """float64 sums with our dequantized weights and with gguf's (or with the table ``kv``), and
    sum |terms| for the tolerance."""
    W = quant.dequantize(a, wtype).astype(np.float64)
    if kv is not None:  # the same weights through another table
        q = quant.codes(a, wtype)
        W = W / quant.IQ4_KVALUES[q].reshape(W.shape) * kv[q].reshape(W.shape)
    Wg = W
    if quant.base_type(wtype) == wtype and kv is None:
        Wg = gguf.quants.dequantize(quant.join_ggml(a, wtype), _qt(wtype)).reshape(W.shape).astype(np.float64)
    return xf @ W.T, xf @ Wg.T, np.abs(xf) @ np.abs(W).T


def _run(path, wtype, a, acts, out):
    path.matmul(wtype, a, *acts, None, out)


CASES = [(w, T, N, K) for w in ALL for T, N, K in SHAPES if not (w == "iq4_xs" and K % 256)]


@pytest.mark.parametrize("path_name", kernels.PATHS)
@pytest.mark.parametrize("wtype,T,N,K", CASES)
def test_matmul(path_name, wtype, T, N, K):
    path = _path(path_name)
    rng = np.random.default_rng(0)
    a = _arrays(wtype, N, K, rng)
    acts, xf = _acts(T, K, rng)
    ref, ref_gguf, mag = _refs(a, wtype, xf)
    out = np.full((T, N), np.nan, np.float32)
    _run(path, wtype, a, acts, out)
    assert (np.abs(out - ref) <= 2e-6 * mag + 1e-30).all(), np.abs(out - ref).max()
    assert (np.abs(out - ref_gguf) <= 2e-6 * mag + 1e-30).all()
    # the raw jitted kernel the fused blocks call: same numbers from uint16 views of fp16
    out2 = np.full((T, N), np.nan, np.float32)
    fn = getattr(path.jit, f"matmul_{quant.base_type(wtype)}_q8_0")
    fn(*(v.view(np.uint16) if v.dtype == np.float16 else v for v in (a[k] for k, _ in quant.ARRAYS[wtype])),
       *acts, out2)
    assert np.array_equal(out, out2)
    if (T, N, K) == SHAPES[0]:  # control: the reference through a table with one entry changed
        kv = quant.IQ4_KVALUES.astype(np.float64)
        kv[3] += 1
        wrong, _, _ = _refs(a, wtype, xf, kv)
        assert not (np.abs(out - wrong) <= 2e-6 * mag + 1e-30).all()


def _extreme_case(wtype, T, N, K, rng):
    """Codes 0 (-127) and 15 (113) only, activations +-127 with xd = 1, d = 1 (iq4_xs: scales
    +-1, so that the sums stay exact in float32): every pair of byte products at or near the i16
    limit of vpmaddubsw."""
    nb = K // 32
    q = rng.choice(np.array([0, 15], np.uint8), (N, nb, 32))
    q[0] = 0  # row 0: every product 127 * 127 in magnitude (pairs of 32258)
    a = {"qs": (q[..., :16] | (q[..., 16:] << 4)).reshape(N, -1)}
    if wtype == "iq4_nl":
        a["d"] = np.ones((N, nb), np.float16)
    else:
        a["sc"] = rng.choice(np.array([-1, 1], np.int8), (N, nb))
        a["d"] = np.ones((N, K // 256), np.float16)
    xq = rng.choice(np.array([-127, 127], np.int8), (T, K))
    xq[0] = 127
    xq[1, :K // 2] = -127
    xd = np.ones((T, nb), np.float32)
    xs = xq.reshape(T, nb, 32).astype(np.int32).sum(-1, dtype=np.int32)
    exact = xq.astype(np.int64) @ quant.dequantize(a, wtype).astype(np.int64).T  # integers, < 2^24
    return a, (xq, xd, xs), exact


@pytest.mark.parametrize("path_name", kernels.PATHS)
@pytest.mark.parametrize("wtype", TYPES)
def test_extremes_exact(path_name, wtype):
    path = _path(path_name)
    T, N, K = 3, 6, 512
    a, acts, exact = _extreme_case(wtype, T, N, K, np.random.default_rng(7))
    assert np.abs(exact).max() < 2 ** 24
    for t in (T, 1):  # the prefill and the decode tiles
        out = np.full((t, N), np.nan, np.float32)
        _run(path, wtype, a, tuple(v[:t] for v in acts), out)
        np.testing.assert_array_equal(out, exact[:t].astype(np.float32))


def test_extremes_would_saturate_unsigned_codes():
    """Control: the codes as unsigned bytes kv + 128 through vpmaddubsw's saturating pair sums
    (numpy model of the instruction) lose the extremes above; the kernels' |kv| x sign(kv) x
    does not."""
    T, N, K = 3, 6, 512
    a, (xq, _, xs), exact = _extreme_case("iq4_nl", T, N, K, np.random.default_rng(7))
    kv = quant.IQ4_KVALUES[quant.codes(a, "iq4_nl").reshape(N, K)].astype(np.int64)

    def maddubs(u, s):  # u (N, K) unsigned bytes, s (T, N, K) signed: pair sums saturated to i16
        p = u[None] * s
        return np.clip(p[..., 0::2] + p[..., 1::2], -32768, 32767).sum(-1)

    x = np.broadcast_to(xq.astype(np.int64)[:, None, :], (T, N, K))
    sign_trick = maddubs(np.abs(kv), x * np.sign(kv))
    unsigned = maddubs(kv + 128, x) - 128 * xs.sum(-1)[:, None]
    assert np.array_equal(sign_trick, exact)
    assert not np.array_equal(unsigned, exact)


@pytest.mark.parametrize("path_name", kernels.PATHS)
@pytest.mark.parametrize("wtype", ALL)
def test_row_does_not_depend_on_its_batch(path_name, wtype):
    """A token's output row is bit-identical alone (T = 1, the decode tiles) and in batches of
    any size, at any position; with N = 11, rows run in full row tiles and in the leftovers."""
    path = _path(path_name)
    rng = np.random.default_rng(5)
    K = 768 if wtype == "iq4_xs" else 352
    a = _arrays(wtype, 11, K, rng)
    (xq, xd, xs), _ = _acts(9, K, rng)
    alone = np.empty((9, 11), np.float32)
    for t in range(9):
        path.matmul(wtype, a, xq[t:t + 1], xd[t:t + 1], xs[t:t + 1], None, alone[t:t + 1])
    for T in (2, 3, 5, 9):
        out = np.full((T, 11), np.nan, np.float32)
        path.matmul(wtype, a, xq[:T], xd[:T], xs[:T], None, out)
        np.testing.assert_array_equal(out, alone[:T], err_msg=f"{path_name} {wtype}: batch of {T}")


@pytest.mark.parametrize("wtype", ALL)
def test_f64_kernels(wtype):
    from mpillm.kernels import exact

    T, N, K = 3, 9, 768
    rng = np.random.default_rng(3)
    a = _arrays(wtype, N, K, rng)
    acts, xf = _acts(T, K, rng)
    ref, _, mag = _refs(a, wtype, xf)
    out = np.zeros((T, N), np.float64)
    exact.KERNELS[wtype](*(v.view(np.uint16) if v.dtype == np.float16 else v
                           for v in (a[k] for k, _ in quant.ARRAYS[wtype])), *acts, out)
    assert (np.abs(out - ref) <= 1e-12 * mag).all()


def test_shape_errors():
    p = kernels.get_path("portable")
    rng = np.random.default_rng(0)
    a = _arrays("iq4_xs", 4, 512, rng)
    acts, _ = _acts(2, 512, rng)
    out = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="do not match"):
        p.matmul("iq4_xs", dict(a, sc=a["sc"][:, :-1]), *acts, None, out)
    with pytest.raises(ValueError, match="out must be"):
        p.matmul("iq4_xs", a, *acts, None, np.zeros((2, 5), np.float32))


def test_portable_lookup_lowers_to_tbl_and_sdot():
    """The portable path's IR as built on an aarch64 host (tbl lookups, Emit.sdot) lowered for a
    Cortex-A76: tbl for the table, sdot for the dot products, nothing x86."""
    import re

    import llvmlite.binding as llvm
    from llvmlite import ir

    from mpillm.kernels import iquant
    from mpillm.kernels.irgen import I8, I32, I64, vec

    mod = ir.Module("lut")
    fn = ir.Function(mod, ir.FunctionType(I32, [I64, I64]), "dot")
    b = ir.IRBuilder(fn.append_basic_block())
    e = iquant._IE(b, "portable")
    w = e.load(fn.args[0], None, vec(I8, 16))
    x0, x1 = e.load(fn.args[1], None, vec(I8, 16)), e.load(fn.args[1], e.i64(16), vec(I8, 16))
    lo = e.lut16(iquant.KV, b.and_(w, e.splat_const(I8, 16, 15)), "aarch64")
    hi = e.lut16(iquant.KV, b.lshr(w, e.splat_const(I8, 16, 4)), "aarch64")
    b.ret(e.sdot([(lo, x0), (hi, x1)]))
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    triple = "aarch64-unknown-linux-gnu"
    tm = llvm.Target.from_triple(triple).create_target_machine(cpu="cortex-a76", features="+dotprod", opt=3)
    mod.triple = triple
    m = llvm.parse_assembly(str(mod))
    m.verify()
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(m, pb)
    asm = tm.emit_assembly(m)
    assert len(re.findall(r"\btbl\b", asm)) == 2, asm
    assert re.search(r"\bsdot\b", asm), asm


def test_converter_copies_iq4_tensors_and_cuts_super_blocks(tmp_path):
    """The IQ4 tensors of tests/kquant_gguf.py: stored bit-exactly at one rank (GGML's blocks
    come back from our arrays); at 3 ranks layer 1's wo is cut inside super-blocks and stored as
    iq4_xs_32 with the same values, and the notes say so."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import kquant_gguf
    from convert.__main__ import convert
    from mpillm.formats import format as fmt

    mats = kquant_gguf.make(tmp_path / "k.gguf")
    convert(tmp_path / "k.gguf", tmp_path / "out", [1, 3], progress=False, tokenizer=False)
    s1 = fmt.Shard(tmp_path / "out" / fmt.shard_relpath(1, 0), 1, 0)
    names = {"blk.0.attn_q.weight": "layers/0/wq", "blk.1.attn_v.weight": "layers/1/wv",
             "blk.1.attn_output.weight": "layers/1/wo"}
    for g, n in names.items():
        wtype, raw = mats[g]
        assert wtype in quant.IQ4_TYPES and s1.get(n).wtype == wtype
        if n != "layers/0/wq":  # (wq's rows are un-permuted from llama.cpp's order: same rows, moved)
            assert np.array_equal(quant.join_ggml(s1.get(n).arrays, wtype), raw), n
    full = quant.dequantize(s1.get("layers/1/wo").arrays, "iq4_xs")
    parts, notes = [], []
    for r in range(3):
        s = fmt.Shard(tmp_path / "out" / fmt.shard_relpath(3, r), 3, r)
        t = s.get("layers/1/wo")
        assert t.wtype == "iq4_xs_32"
        parts.append(quant.dequantize(t.arrays, t.wtype))
        notes += s.notes
    assert np.array_equal(np.concatenate(parts, axis=1), full)
    assert any("layers/1/wo: iq4_xs stored as iq4_xs_32" in x for x in notes)


@not_on_avx2_only
def test_avx2_path_compiled_for_an_avx2_only_cpu():
    """The AVX2 kernels compiled for a Haswell target (tests/avx2only.py), on the extremes (both
    types, the decode and the prefill tiles)."""
    assert "2 passed" in run_on_avx2_only(__file__, "avx2 and extremes_exact")
