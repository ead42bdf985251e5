"""Row-parallel matmuls with float64 outputs, for results that do not depend on the rank count.

A row-parallel layer (wo, w_down) sums over its input columns, which tensor parallelism
splits across ranks: each rank sums its own blocks, then Allreduce adds the partial sums.
In float32 that changes the order of additions with the rank count, the q8_0 rounding of
the next activation can flip, and greedy decoding can take another branch.

Here every block's term d_w * d_x * isum is exact in float64 (11 + 24 + 15 bits < 53), the
terms are summed in float64 and the partial sums are added by Allreduce in float64, so the
only differences left between rank counts are float64 rounding (~1e-16), which survives the
final cast to float32 with probability ~1e-9 per value. ``--buffer-type f64`` selects this.

Arguments as the kernels in ``portable``: fp16 arrays as uint16 views; ``out`` float64 (T, N).
"""
from __future__ import annotations

from mpillm.kernels import jitcache, portable, runners
from mpillm.kernels.checks import check_q
from mpillm.kernels.vmath import half_to_float as h2f

_JIT = dict(cache=True, fastmath=True, parallel=True)


# the quantized kinds: the portable kernels' block tiles with float64 accumulation (each block's
# integer dot exact, then acc += d * xd * isum in float64), R rows x 1 token per tile; runners and
# entry points generated from mpillm.kernels.runners (as portable's)
R = 4
_F64_OUT = 'if out.itemsize != 8:\n    raise ValueError("matmul: out must be float64")'


# the float weights: one row and token per float64 dot product (w f16 as uint16 bits, or f32)
_FLOAT = """

@njit({flags})
def matmul_{f}_f32_f64(w, x, out):
    N, T, K = w.shape[0], x.shape[0], x.shape[1]
    for n in prange(N):
        for t in range(T):
            acc = 0.0
            for k in range(K):
                acc += np.float64({w}) * np.float64(x[t, k])
            out[t, n] = acc
"""


def _source() -> str:
    src = runners.HEADER.format(by=__name__) + "import numpy as np\n"
    for k in portable.QKINDS:
        src += runners.plain_run(f"run_{k}", runners.flags(_JIT), runners.QPARAMS, "R", "1", k)
        src += runners.q_entry(f"matmul_{k}_q8_0_f64", "cache=True", k, f"run_{k}", extra=_F64_OUT)
    for f, w in (("f16", "h2f(w[n, k])"), ("f32", "w[n, k]")):
        src += _FLOAT.format(flags=runners.flags(_JIT), f=f, w=w)
    return src


_names = dict(check_q=check_q, h2f=h2f, R=R)
for _k in portable.QKINDS:
    _names.update(portable.tiles(_k, lambda R_, U_, k=_k: portable._make_qtile(k, R_, U_, f64=True), R, 1))
_gen = jitcache.load_generated("exact", "exact_run", _source(), _names)
matmul_q4_0_q8_0_f64, matmul_q4_1_q8_0_f64, matmul_q8_0_q8_0_f64 = (
    _gen.matmul_q4_0_q8_0_f64, _gen.matmul_q4_1_q8_0_f64, _gen.matmul_q8_0_q8_0_f64)
matmul_f16_f32_f64, matmul_f32_f32_f64 = _gen.matmul_f16_f32_f64, _gen.matmul_f32_f32_f64


from mpillm.kernels.kquant import (matmul_mxfp4_q8_0_f64, matmul_q4_K_q8_0_f64, matmul_q5_0_q8_0_f64, matmul_q5_1_q8_0_f64, matmul_q5_K_q8_0_f64, matmul_q6_K_q8_0_f64)

KERNELS = {"q4_0": matmul_q4_0_q8_0_f64, "q4_1": matmul_q4_1_q8_0_f64, "q8_0": matmul_q8_0_q8_0_f64,
           "f16": matmul_f16_f32_f64, "f32": matmul_f32_f32_f64,
           "q5_0": matmul_q5_0_q8_0_f64, "q5_1": matmul_q5_1_q8_0_f64, "q4_K": matmul_q4_K_q8_0_f64,
           "q5_K": matmul_q5_K_q8_0_f64, "q6_K": matmul_q6_K_q8_0_f64, "mxfp4": matmul_mxfp4_q8_0_f64}
for _t in ("q4_K", "q5_K", "q6_K"):
    KERNELS[_t + "_32"] = KERNELS[_t]

# Q2_K and Q3_K: lowk.py
from mpillm.kernels.lowk import matmul_q2_K_q8_0_f64, matmul_q3_K_q8_0_f64  # noqa: E402

KERNELS.update({"q2_K": matmul_q2_K_q8_0_f64, "q3_K": matmul_q3_K_q8_0_f64,
                "q2_K_32": matmul_q2_K_q8_0_f64, "q3_K_32": matmul_q3_K_q8_0_f64})

from mpillm.kernels.iquant import matmul_iq4_nl_q8_0_f64, matmul_iq4_xs_q8_0_f64  # noqa: E402

KERNELS.update(iq4_nl=matmul_iq4_nl_q8_0_f64, iq4_xs=matmul_iq4_xs_q8_0_f64, iq4_xs_32=matmul_iq4_xs_q8_0_f64)
