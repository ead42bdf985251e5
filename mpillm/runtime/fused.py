"""Whole-block jitted functions: one numba call per attention block and per FFN block.

A decode step through a 30-layer model would otherwise make ~14 Python-level kernel calls
per layer; each costs a few microseconds of argument unboxing, which at SmolLM2's size is a
fifth of the token time. Here the attention block (RMSNorm, q8_0 quantization, Q/K/V,
head norms, RoPE, KV store, attention, quantization, O projection) and the FFN block
(RMSNorm, quantization, gate/up, SiLU, quantization, down projection) are each one jitted
function. The Allreduce between them stays in Python, in model.py, where it is visible.

The weight types of a model pick the kernels at compile time, so the source of the blocks
is generated for the model's type combination and written to a file (numba caches only
functions that live in files), then imported; later processes load it from numba's cache.
"""
from __future__ import annotations

from mpillm import kernels
from mpillm.formats import quant
from mpillm.kernels import interleaved, jitcache

_TYPES = {**quant.ARRAYS, **interleaved.ARRAYS}  # the stored types and the runtime's interleaved ones
_ARGS = {t: tuple(k for k, _ in a) for t, a in _TYPES.items()}  # kernel argument order
# weight type -> kernel name (the K-quant ``_32`` variants share their type's kernel)
_KERNEL = {t: (f"matmul_{t}_f32" if t in ("f16", "f32") else f"matmul_{quant.base_type(t)}_q8_0") for t in _TYPES}
KERNEL_NAME = _KERNEL


def _w(name: str, wtype: str) -> list[str]:
    return [f"{name}_{a}" for a in _ARGS[wtype]]


def _mm(name: str, wtype: str, acts: str, out: str) -> str:
    """A kernel call: quantized weights take the q8_0 activations, float weights the floats."""
    w = ", ".join(_w(name, wtype))
    if wtype in ("f16", "f32"):
        return f"K_{name}({w}, {acts}_x[:T], {out}[:T])"
    return f"K_{name}({w}, {acts}_q[:T], {acts}_d[:T], {acts}_s[:T], {out}[:T])"


def _mm_e(name: str, wtype: str, acts: str, out: str) -> str:
    """A kernel call on expert e's slice of a stacked (E, rows, cols) expert weight, n tokens."""
    w = ", ".join(f"{a}[e]" for a in _w(name, wtype))
    if wtype in ("f16", "f32"):
        return f"K_{name}({w}, {acts}_x[:n], {out}[:n])"
    return f"K_{name}({w}, {acts}_q[:n], {acts}_d[:n], {acts}_s[:n], {out}[:n])"


def _moe_source(types: dict[str, str], oai: bool = False) -> str:
    """oai: gpt-oss's MoE (router and expert gate/up biases, the clamped SwiGLU); its experts' down
    biases are added after the Allreduce, in model.py."""
    wa = lambda *ns: ", ".join(a for n in ns for a in _w(n, types[n]))  # noqa: E731
    extra = "router_b, eg_b, eu_b, alpha, limit, " if oai else ""
    router_bias = "\n    add_bias(router_logits[:T], router_b)" if oai else ""
    gate_bias = "\n        add_bias(gate[:n], eg_b[e])\n        add_bias(up[:n], eu_b[e])" if oai else ""
    act = "swiglu_oai(gate[:n], up[:n], alpha, limit, hb_x[:n])" if oai else "silu_mul(gate[:n], up[:n], hb_x[:n])"
    return f'''

@njit(cache=True)
def moe_block(T, eps, renorm, x, norm_w, xb_x, xb_q, xb_d, xb_s, {wa("router")}, router_logits, topk_idx, topk_w,
              counts, starts, rows, wts, active, xe_x, xe_q, xe_d, xe_s, {wa("exp_gate", "exp_up", "exp_down")},
              gate, up, hb_x, hb_q, hb_d, hb_s, ye, {extra}out):
    rmsnorm(x[:T], norm_w, eps, xb_x[:T])
    QUANT(xb_x[:T], xb_q[:T], xb_d[:T], xb_s[:T])
    {_mm("router", types["router"], "xb", "router_logits")}{router_bias}
    route_topk(router_logits[:T], renorm, topk_idx[:T], topk_w[:T])
    n_active = group_by_expert(topk_idx[:T], topk_w[:T], counts, starts, rows, wts, active)
    out[:T] = 0.0
    for a in range(n_active):
        e, r0, r1 = active[a], starts[a], starts[a + 1]
        n = r1 - r0
        if n == T:  # every token (always so when decoding): rows are 0..T-1, use xb as it is
            {_mm_e("exp_gate", types["exp_gate"], "xb", "gate")}
            {_mm_e("exp_up", types["exp_up"], "xb", "up")}
        else:
            gather_rows(xb_x, rows[r0:r1], xe_x)
            QUANT(xe_x[:n], xe_q[:n], xe_d[:n], xe_s[:n])
            {_mm_e("exp_gate", types["exp_gate"], "xe", "gate")}
            {_mm_e("exp_up", types["exp_up"], "xe", "up")}{gate_bias}
        {act}
        QUANT(hb_x[:n], hb_q[:n], hb_d[:n], hb_s[:n])
        {_mm_e("exp_down", types["exp_down"], "hb", "ye")}
        scatter_add_rows(ye[:n], rows[r0:r1], wts[r0:r1], out[:T])
'''


def _source(types: dict[str, str], qk_norm: bool, path_mod: str, prefix: str, f64_out: bool = False,
            biases: tuple[str, ...] = (), oai: bool = False) -> str:
    """f64_out: wo and w_down write float64 partial sums (kernels.exact, --buffer-type f64).
    biases: the attention biases the layers have, a subset of ("bq", "bk", "bv") in that order;
    each is an extra argument after k_norm, added to q / k / v right after their projection.
    oai: gpt-oss: attention with sinks and a window (two extra arguments before ``out``), the MoE
    block with its biases and clamped SwiGLU (see _moe_source)."""
    imports = "\n".join(f"from mpillm.kernels.exact import {_KERNEL[t]}_f64 as K_{n}" if f64_out and n in ("wo", "w_down")
                        else f"from {path_mod} import {prefix}{_KERNEL[t]} as K_{n}" for n, t in types.items())
    wa = lambda *ns: ", ".join(a for n in ns for a in _w(n, types[n]))  # noqa: E731
    norm = ("    rmsnorm_heads(q[:T], q_norm, eps, hd)\n    rmsnorm_heads(k[:T], k_norm, eps, hd)\n"
            if qk_norm else "")
    bias_args = "".join(f"{b}, " for b in biases)
    bias = "".join(f"    add_bias({b[1]}[:T], {b})\n" for b in biases)
    attend = ("attention_ext(q[:T], kc, vc, slots, positions, hd, kv_of_head, scores, at_x[:T], sinks, window)" if oai
              else "attention(q[:T], kc, vc, slots, positions, hd, kv_of_head, scores, at_x[:T])")
    return f'''# generated by mpillm.runtime.fused for weight types {types} (do not edit)
from numba import njit
from mpillm.runtime.ops import rmsnorm, rmsnorm_heads, rope_neox, store_kv, attention, silu_mul
from mpillm.runtime.ops import route_topk, group_by_expert, gather_rows, scatter_add_rows{", add_bias" if biases else ""}
{"from mpillm.runtime.ops import add_bias, swiglu_oai, attention_ext" + chr(10) if oai else ""}from {path_mod} import {prefix}quantize_q8_0 as QUANT
{imports}


@njit(cache=True)
def attn_block(T, positions, slots, eps, hd, x, norm_w, xb_x, xb_q, xb_d, xb_s, {wa("wq", "wk", "wv")}, q_norm, k_norm,
               {bias_args}q, k, v, cos, sin, kc, vc, kv_of_head, scores, at_x, at_q, at_d, at_s, {wa("wo")}, {"sinks, window, " if oai else ""}out):
    rmsnorm(x[:T], norm_w, eps, xb_x[:T])
    QUANT(xb_x[:T], xb_q[:T], xb_d[:T], xb_s[:T])
    {_mm("wq", types["wq"], "xb", "q")}
    {_mm("wk", types["wk"], "xb", "k")}
    {_mm("wv", types["wv"], "xb", "v")}
{bias}{norm}    rope_neox(q[:T], positions, hd, cos, sin)
    rope_neox(k[:T], positions, hd, cos, sin)
    store_kv(k[:T], v[:T], kc, vc, slots, positions, hd)
    {attend}
    QUANT(at_x[:T], at_q[:T], at_d[:T], at_s[:T])
    {_mm("wo", types["wo"], "at", "out")}


@njit(cache=True)
def ffn_block(T, eps, x, norm_w, xb_x, xb_q, xb_d, xb_s, {wa("w_gate", "w_up")}, gate, up,
              hb_x, hb_q, hb_d, hb_s, {wa("w_down")}, out):
    rmsnorm(x[:T], norm_w, eps, xb_x[:T])
    QUANT(xb_x[:T], xb_q[:T], xb_d[:T], xb_s[:T])
    {_mm("w_gate", types["w_gate"], "xb", "gate")}
    {_mm("w_up", types["w_up"], "xb", "up")}
    silu_mul(gate[:T], up[:T], hb_x[:T])
    QUANT(hb_x[:T], hb_q[:T], hb_d[:T], hb_s[:T])
    {_mm("w_down", types["w_down"], "hb", "out")}
''' + (_moe_source(types, oai) if "router" in types else "")


def _mla_heads_source(wk: str, wv: str, path_mod: str, prefix: str) -> str:
    """MLA's per-head loops of the absorbed form (deepseek2; mpillm.runtime.model._mla): fold each
    head's key half of kv_b into its query, and each head's value half into its output, one call a
    loop instead of 5 (query) and 4 (value) Python-level calls a head (128 heads x 61 layers in
    DeepSeek-V3). A float weight takes the activations as they are: no quantization then."""
    types = {"wk_b": wk, "wv_b": wv}
    imports = "\n".join(f"from {path_mod} import {prefix}{_KERNEL[t]} as K_{n}" for n, t in types.items())

    def quant(name: str, acts: str) -> str:
        return "" if types[name] in ("f16", "f32") else f"\n        QUANT({acts}_x[:T], {acts}_q[:T], {acts}_d[:T], {acts}_s[:T])"

    return f'''# generated by mpillm.runtime.fused for MLA heads of weight types {types} (do not edit)
from numba import njit
from mpillm.runtime.mla import take_cols, put_cols
from {path_mod} import {prefix}quantize_q8_0 as QUANT
{imports}


@njit(cache=True)
def absorb_q(T, H, hd, nope, W, r, sc, q, qn_x, qn_q, qn_d, qn_s, {", ".join(_w("wk_b", wk))}, qlat, qabs):
    n = T
    for e in range(H):  # head e: q_nope W_kb -> the latent columns, its RoPE part beside them
        take_cols(q[:T], e * hd, qn_x[:T]){quant("wk_b", "qn")}
        {_mm_e("wk_b", wk, "qn", "qlat")}
        put_cols(qlat[:T], qabs, e * W, sc)
        put_cols(q[:T, e * hd + nope:(e + 1) * hd], qabs, e * W + r, sc)


@njit(cache=True)
def expand_v(T, H, W, dv, o, ol_x, ol_q, ol_d, ol_s, {", ".join(_w("wv_b", wv))}, vh, att):
    n = T
    for e in range(H):  # head e: its attention over the latent W_vb -> its value columns
        take_cols(o[:T], e * W, ol_x[:T]){quant("wv_b", "ol")}
        {_mm_e("wv_b", wv, "ol", "vh")}
        put_cols(vh[:T], att, e * dv, 1.0)
'''


def mla_heads(wk: str, wv: str):
    """The generated module (absorb_q, expand_v) for MLA heads whose kv_b halves have these types."""
    path_mod, prefix = kernels.module_of(kernels.active_path())
    return jitcache.load_generated("fused", "fused_mla", _mla_heads_source(wk, wv, path_mod, prefix))


def blocks(types: dict[str, str], qk_norm: bool, f64_out: bool = False, biases: tuple[str, ...] = (),
           oai: bool = False):
    """The generated module (attn_block, ffn_block[, moe_block]) for this weight-type combination;
    with f64_out the blocks' wo / w_down write float64 partial sums (--buffer-type f64); ``biases``
    names the attention biases passed after k_norm (see _source)."""
    name = kernels.active_path()
    path_mod, prefix = kernels.module_of(name)
    src = _source(types, qk_norm, path_mod, prefix, f64_out, tuple(biases), oai)
    return jitcache.load_generated("fused", "fused", src)
