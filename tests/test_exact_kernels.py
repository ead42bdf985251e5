"""The float64-output row-parallel kernels (--buffer-type f64) against a float64 numpy reference,
and their defining property: splitting the columns and adding the partial sums gives the same
float32 result as one call over all columns."""
import numpy as np
import pytest

from mpillm.formats import quant
from mpillm.kernels import exact, get_path

QK = 32


def q8(x):
    T, K = x.shape
    xq, xd, xs = np.zeros((T, K), np.int8), np.zeros((T, K // QK), np.float32), np.zeros((T, K // QK), np.int32)
    get_path("portable").quantize_q8_0(x, xq, xd, xs)
    return xq, xd, xs


def args_for(wtype, arrays, xq, xd, xs, x):
    """The kernels' arguments: the type's arrays in quant.ARRAYS order (fp16 as uint16), then the
    q8_0 activations (quantized types) or the float activations."""
    u = [arrays[k] for k, _ in quant.ARRAYS[wtype]]
    u = tuple(v.view(np.uint16) if v.dtype == np.float16 else v for v in u)
    return (*u, xq, xd, xs) if wtype in quant.QUANTIZED else (*u, x)


@pytest.mark.parametrize("wtype", quant.WEIGHT_TYPES)
@pytest.mark.parametrize("T", [1, 5])
def test_exact_kernel_matches_float64_reference(wtype, T):
    rng = np.random.default_rng(1)
    N, K = 37, 256  # K-quant super-blocks are 256 wide
    if wtype in quant.QUANTIZABLE:
        w = quant.quantize(rng.standard_normal((N, K)).astype(np.float32), wtype)
    else:  # the K-quants are only ever copied from GGUF: random valid blocks
        w = quant.random_arrays(wtype, N, K, rng)
    x = rng.standard_normal((T, K)).astype(np.float32)
    xq, xd, xs = q8(x)
    out = np.zeros((T, N), np.float64)
    exact.KERNELS[wtype](*args_for(wtype, w, xq, xd, xs, x), out)
    wf = quant.dequantize(w, wtype).astype(np.float64)
    if wtype in quant.QUANTIZED:
        xf = (xq.reshape(T, -1, QK).astype(np.float64) * xd[..., None]).reshape(T, K)
    else:
        xf = x.astype(np.float64)
    ref = xf @ wf.T
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("wtype", ["q4_0", "q4_1", "q8_0"])
def test_split_sums_equal_whole(wtype):
    """Partial sums over column slices (as ranks compute them) add up to the same float32 values."""
    rng = np.random.default_rng(2)
    N, K = 64, 32 * 18
    w = quant.quantize(rng.standard_normal((N, K)).astype(np.float32), wtype)
    x = rng.standard_normal((1, K)).astype(np.float32)
    xq, xd, xs = q8(x)
    whole = np.zeros((1, N), np.float64)
    exact.KERNELS[wtype](*args_for(wtype, w, xq, xd, xs, x), whole)
    for cuts in ([0, 6 * 32, 12 * 32, K], [0, 5 * 32, 9 * 32, 14 * 32, K], [0, 9 * 32, K]):
        total = np.zeros((1, N), np.float64)
        for c0, c1 in zip(cuts[:-1], cuts[1:]):
            per = {"qs": 2 if wtype != "q8_0" else 1, "d": QK, "m": QK}
            part = {k: np.ascontiguousarray(v[:, c0 // per[k]:c1 // per[k]]) for k, v in w.items()}
            b0, b1 = c0 // QK, c1 // QK
            out = np.zeros((1, N), np.float64)
            exact.KERNELS[wtype](*args_for(wtype, part, np.ascontiguousarray(xq[:, c0:c1]),
                                           np.ascontiguousarray(xd[:, b0:b1]),
                                           np.ascontiguousarray(xs[:, b0:b1]), None), out)
            total += out
        assert np.array_equal(total.astype(np.float32), whole.astype(np.float32))
