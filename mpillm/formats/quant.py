"""Weight quantization types, their block layouts, and numpy reference quantizers.

mpillm stores a quantized matrix W of shape (rows, cols) as separate arrays
("split layout") so kernels stream contiguous, aligned bytes:

  q4_0: qs uint8 (rows, cols // 2)   GGML nibble order per 32-block: byte j holds
                                     element j (low nibble) and element j + 16 (high)
        d  float16 (rows, cols // 32) value = d * (nibble - 8)
  q4_1: qs uint8 (rows, cols // 2)   same nibble order
        d  float16 (rows, cols // 32) value = d * nibble + m
        m  float16 (rows, cols // 32)
  q8_0: qs int8 (rows, cols)
        d  float16 (rows, cols // 32) value = d * q
  f16:  w  float16 (rows, cols)
  f32:  w  float32 (rows, cols)

The 5-bit, 6-bit, K-quant and MXFP4 types (nb = cols / 32 sub-blocks, ns = cols / 256
super-blocks). Every one keeps its low 4 bits in ``qs`` in the q4_0 nibble order per
32-element sub-block, high bits as per-sub-block bit masks (4 bytes = a little-endian
uint32 whose bit i belongs to element i; q5_K, q6_K: other orders, see below), and its scales one
per byte:

  q5_0: qs u8 (rows, nb*16), qh u8 (rows, nb*4), d f16 (rows, nb)      d * (q - 16)
  q5_1: qs, qh, d, m f16 (rows, nb)                                     d * q + m
  q4_K: qs u8 (rows, nb*16), sc u8 (rows, nb), mn u8 (rows, nb),        (d*sc) * q - (dmin*mn)
        d f16 (rows, ns), dmin f16 (rows, ns)                           (sc, mn: 6-bit, unpacked)
  q5_K: qs, qh u8 (rows, nb*4), sc, mn, d, dmin                         as q4_K, q 5-bit
        (qh: per sub-block 4 bytes, bit 2c + h of byte k = q >> 4 of
        element 8c + 4h + k)
  q6_K: qs u8 (rows, nb*16), qh u8 (rows, nb*8) = per sub-block 8     (d*sc) * (q - 32)
        bytes, byte k holding q >> 4 of elements k, k + 8, k + 16, k + 24
        in bits 0-1, 2-3, 4-5, 6-7, sc i8 (rows, nb*2) one per 16
        elements, d f16 (rows, ns)
  mxfp4: qs u8 (rows, nb*16) E2M1 codes, e u8 (rows, nb) E8M0 exponent  2^(e-128) * kvalue[code]
                                                                        (kvalue = 2 x E2M1 value)

GGML's q5_0 / q5_1 / mxfp4 blocks already are these fields (split, not rearranged). The
K-quant blocks are rearranged: q4_K/q5_K's 64-element nibble pairs and q6_K's 128-element
ql/qh interleave become the q4_0 order per 32-element sub-block, the 12 bytes of packed
6-bit scales and mins become one byte each. Every step is a bijection on the bits, so
``join_ggml(split_ggml(raw)) == raw`` (tested); the unpacked scales cost 4 bytes per 256
weights (q4_K: 4.625 instead of 4.5 bits per weight).

The IQ4 types (GGML's non-linear 4-bit codes; kernels in ``mpillm.kernels.iquant``): the nibbles
in the q4_0 order index the 16-entry table IQ4_KVALUES (int8, -127..113):

  iq4_nl: qs u8 (rows, nb*16), d f16 (rows, nb)                          d * kv[q]
  iq4_xs: qs u8 (rows, nb*16), sc i8 (rows, nb) = ls - 32 (GGML's 6-bit   (d*sc) * kv[q]
          scale unpacked from scales_h / scales_l), d f16 (rows, ns)

``<t>_32`` (q4_K_32, q5_K_32, q6_K_32, iq4_xs_32): the same type with its super-block scales d (and
dmin) repeated for each 32-element sub-block, shape (rows, nb). A K-quant matrix whose
columns are split at a point that is not a multiple of 256 (a row-parallel layer at an
uneven head split) is stored so: the values are unchanged (lossless), the kernels are the
same, and it costs 16 bits (q6_K) or 32 bits (q4_K, q5_K) more per 32 weights.

A GGML block (e.g. block_q4_0 = {fp16 d; uint8 qs[16]}) maps to these arrays by
splitting its fields, so a GGUF tensor is copied bit-exactly (``split_ggml``).
The quantizers reproduce GGML's reference rounding (quantize_row_*_ref); q5_0, q5_1
and mxfp4 quantize through ``gguf.quants``; the K-quants have no quantizer here (they
are copied from GGUF files, never produced).
"""
from __future__ import annotations

import numpy as np

QK = 32  # weights per quantization block (sub-block of the K-quants), for every quantized type
QK_K = 256  # weights per K-quant super-block

# type name -> its arrays with their dtypes, in the order the kernels take them
ARRAYS: dict[str, tuple[tuple[str, str], ...]] = {
    "q4_0": (("qs", "uint8"), ("d", "float16")),
    "q4_1": (("qs", "uint8"), ("d", "float16"), ("m", "float16")),
    "q8_0": (("qs", "int8"), ("d", "float16")),
    "q5_0": (("qs", "uint8"), ("qh", "uint8"), ("d", "float16")),
    "q5_1": (("qs", "uint8"), ("qh", "uint8"), ("d", "float16"), ("m", "float16")),
    "q4_K": (("qs", "uint8"), ("sc", "uint8"), ("mn", "uint8"), ("d", "float16"), ("dmin", "float16")),
    "q5_K": (("qs", "uint8"), ("qh", "uint8"), ("sc", "uint8"), ("mn", "uint8"), ("d", "float16"),
             ("dmin", "float16")),
    "q6_K": (("qs", "uint8"), ("qh", "uint8"), ("sc", "int8"), ("d", "float16")),
    "mxfp4": (("qs", "uint8"), ("e", "uint8")),
    # Q2_K / Q3_K (2-bit codes; kernels in mpillm.kernels.lowk; see "Q2_K and Q3_K" below)
    "q2_K": (("qs", "uint8"), ("sc", "uint8"), ("d", "float16"), ("dmin", "float16")),
    "q3_K": (("qs", "uint8"), ("qh", "uint8"), ("sc", "int8"), ("d", "float16")),
    "f16": (("w", "float16"),),
    "f32": (("w", "float32"),),
}
# -- the IQ4 types (see the module docstring) ----------------------------------------------------
IQ4_TYPES = ("iq4_nl", "iq4_xs")
IQ4_KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
ARRAYS["iq4_nl"] = (("qs", "uint8"), ("d", "float16"))
ARRAYS["iq4_xs"] = (("qs", "uint8"), ("sc", "int8"), ("d", "float16"))
# -- end of the IQ4 types ------------------------------------------------------------------------
K_TYPES = ("q4_K", "q5_K", "q6_K")
LOWK_TYPES = ("q2_K", "q3_K")  # 2-bit codes, 8 bytes of qs per 32 weights
K_TYPES += LOWK_TYPES
K_TYPES += ("iq4_xs",)  # 256-element super-blocks too: a _32 variant
for _t in K_TYPES:  # the same arrays with per-32 super-block scales (see the module docstring)
    ARRAYS[_t + "_32"] = ARRAYS[_t]
WEIGHT_TYPES = tuple(ARRAYS)
QUANTIZED = tuple(t for t in WEIGHT_TYPES if t not in ("f16", "f32"))
# types quantize() can produce from float values (--weight-type); the others are only copied
QUANTIZABLE = ("q4_0", "q4_1", "q8_0", "q5_0", "q5_1", "mxfp4", "f16", "f32")


def base_type(wtype: str) -> str:
    """q4_K_32 -> q4_K (the kernel and the values are the same)."""
    return wtype[:-3] if wtype.endswith("_32") else wtype


# bytes of qs per 32-block
QS_BYTES = {t: (32 if t == "q8_0" else 8 if base_type(t) in LOWK_TYPES else 16) for t in QUANTIZED}


def block_cols(wtype: str) -> int:
    """Columns of a block that a column split must not cut: 256 for the K-quants, else 32."""
    return QK_K if wtype in K_TYPES else (QK if wtype in QUANTIZED else 1)


def array_shapes(wtype: str, rows: int, cols: int) -> dict[str, tuple[tuple[int, int], str]]:
    """Shapes and dtypes of the split-layout arrays of a (rows, cols) matrix."""
    if wtype not in ARRAYS:
        raise ValueError(f"unknown weight type {wtype!r}; supported: {', '.join(WEIGHT_TYPES)}")
    if wtype in QUANTIZED and cols % block_cols(wtype):
        raise ValueError(f"{wtype} needs a column count divisible by {block_cols(wtype)}, got {cols}")
    nb = cols // QK
    ns = nb if wtype.endswith("_32") else cols // QK_K  # super-block scales
    per_block = {"qs": QS_BYTES.get(wtype, 0), "qh": 8 if base_type(wtype) == "q6_K" else 4,
                 "sc": 2 if base_type(wtype) in ("q6_K",) + LOWK_TYPES else 1, "mn": 1, "e": 1, "m": 1,
                 "d": 1 if wtype in ("q4_0", "q4_1", "q8_0", "q5_0", "q5_1", "iq4_nl") else None, "dmin": None}
    shapes = {}
    for k, _ in ARRAYS[wtype]:
        if k == "w":
            shapes[k] = (rows, cols)
        elif per_block[k] is None:
            shapes[k] = (rows, ns)
        else:
            shapes[k] = (rows, nb * per_block[k])
    return {k: (shapes[k], dt) for k, dt in ARRAYS[wtype]}


def nbytes(wtype: str, rows: int, cols: int) -> int:
    return sum(int(np.prod(s)) * np.dtype(dt).itemsize for s, dt in array_shapes(wtype, rows, cols).values())


def _roundf(v: np.ndarray) -> np.ndarray:
    """C roundf: halves away from zero (numpy rounds halves to even)."""
    r = np.round(v)
    t = np.trunc(v)
    return np.where(np.abs(v - t) == 0.5, t + np.sign(v), r)


def _blocks(w: np.ndarray) -> np.ndarray:
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % QK:
        raise ValueError(f"expected a 2-D array with columns divisible by {QK}, got {w.shape}")
    return w.reshape(w.shape[0], -1, QK)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """q: uint8 (rows, nb, 32) of values 0..15 -> uint8 (rows, nb * 16), GGML order."""
    packed = q[..., :16] | (q[..., 16:] << 4)
    return packed.reshape(q.shape[0], -1)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    b = qs.reshape(qs.shape[0], -1, 16)
    return np.concatenate([b & 0x0F, b >> 4], axis=-1)  # (rows, nb, 32)


def quantize(w: np.ndarray, wtype: str) -> dict[str, np.ndarray]:
    """Quantize a float (rows, cols) matrix into split-layout arrays, GGML reference rounding."""
    if wtype == "f32":
        return {"w": np.ascontiguousarray(w, dtype=np.float32)}
    if wtype == "f16":
        return {"w": np.ascontiguousarray(w, dtype=np.float32).astype(np.float16)}
    x = _blocks(w)
    if wtype == "q8_0":
        amax = np.abs(x).max(axis=-1)
        d = amax / 127.0
        with np.errstate(divide="ignore"):
            idn = np.where(d > 0, 1.0 / d, 0.0).astype(np.float32)
        q = _roundf(x * idn[..., None]).astype(np.int8)
        return {"qs": q.reshape(w.shape[0], -1), "d": d.astype(np.float16)}
    if wtype == "q4_0":
        idx = np.abs(x).argmax(axis=-1)
        vmax = np.take_along_axis(x, idx[..., None], axis=-1)[..., 0]  # signed value of max |x|
        d = vmax / -8.0
        with np.errstate(divide="ignore"):
            idn = np.where(d != 0, 1.0 / d, 0.0).astype(np.float32)
        q = np.minimum(15, (x * idn[..., None] + np.float32(8.5)).astype(np.int8)).astype(np.uint8)
        return {"qs": _pack_nibbles(q), "d": d.astype(np.float16)}
    if wtype == "q4_1":
        vmin = x.min(axis=-1)
        vmax = x.max(axis=-1)
        d = (vmax - vmin) / 15.0
        with np.errstate(divide="ignore"):
            idn = np.where(d != 0, 1.0 / d, 0.0).astype(np.float32)
        q = np.minimum(15, ((x - vmin[..., None]) * idn[..., None] + np.float32(0.5)).astype(np.int8)).astype(np.uint8)
        return {"qs": _pack_nibbles(q), "d": d.astype(np.float16), "m": vmin.astype(np.float16)}
    if wtype in ("q5_0", "q5_1", "mxfp4"):  # gguf's quantizers (GGML's reference rounding)
        import gguf

        qt = getattr(gguf.GGMLQuantizationType, wtype.upper())
        raw = gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qt)
        return split_ggml(raw, wtype, w.shape[0], w.shape[1])
    if wtype in WEIGHT_TYPES:
        raise ValueError(f"mpillm has no quantizer for {wtype} (it stores {wtype} tensors copied from GGUF "
                         f"files); quantize to one of {', '.join(QUANTIZABLE)}")
    raise ValueError(f"unknown weight type {wtype!r}; supported: {', '.join(WEIGHT_TYPES)}")


def dequantize(arrays: dict[str, np.ndarray], wtype: str) -> np.ndarray:
    """Split-layout arrays -> float32 (rows, cols), exactly as GGML dequantizes."""
    if wtype in ("f32", "f16"):
        return np.asarray(arrays["w"], dtype=np.float32)
    if base_type(wtype) in LOWK_TYPES:
        return _lowk_dequantize(arrays, wtype)
    if wtype not in ("q4_0", "q4_1", "q8_0"):
        return _dequantize_new(arrays, wtype)
    d = np.asarray(arrays["d"], dtype=np.float32)[..., None]
    if wtype == "q8_0":
        q = np.asarray(arrays["qs"]).reshape(d.shape[0], -1, QK).astype(np.float32)
        out = q * d
    elif wtype == "q4_0":
        out = (_unpack_nibbles(np.asarray(arrays["qs"])).astype(np.int8) - 8).astype(np.float32) * d
    elif wtype == "q4_1":
        m = np.asarray(arrays["m"], dtype=np.float32)[..., None]
        out = _unpack_nibbles(np.asarray(arrays["qs"])).astype(np.float32) * d + m
    else:
        raise ValueError(f"unknown weight type {wtype!r}")
    return out.reshape(out.shape[0], -1)


def codes(arrays: dict[str, np.ndarray], wtype: str) -> np.ndarray:
    """The integer code of every weight, (rows, nb, 32): 5/6-bit q (unsigned), 4-bit nibbles,
    or the E2M1 code (mxfp4)."""
    q = _unpack_nibbles(np.asarray(arrays["qs"])).astype(np.int16)
    rows, nb = q.shape[:2]
    bt = base_type(wtype)
    if bt == "q5_K":  # bit 2c + h of byte k of a sub-block: element 8c + 4h + k
        hb = np.unpackbits(np.asarray(arrays["qh"]).reshape(rows, nb, 4), axis=-1, bitorder="little")
        q |= hb.reshape(rows, nb, 4, 8).transpose(0, 1, 3, 2).reshape(rows, nb, 32).astype(np.int16) << 4
    elif bt in ("q5_0", "q5_1"):
        hb = np.unpackbits(np.asarray(arrays["qh"]).reshape(rows, nb, 4), axis=-1, bitorder="little")
        q |= hb.astype(np.int16) << 4
    elif bt == "q6_K":  # byte k of a sub-block: bits 2c, 2c + 1 are q >> 4 of element 8c + k
        qh = np.asarray(arrays["qh"]).reshape(rows, nb, 1, 8) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
        q |= (qh & 3).astype(np.int16).reshape(rows, nb, 32) << 4
    return q


MXFP4_KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)


def e8m0_half(e: np.ndarray) -> np.ndarray:
    """GGML's ggml_e8m0_to_fp32_half: 2^(e - 128) as float32 (denormal for e < 2)."""
    e = np.asarray(e).astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - np.uint32(1)) << np.uint32(23))
    return bits.astype(np.uint32).view(np.float32)


def block_scales(arrays: dict[str, np.ndarray], wtype: str) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(scale, min, offset) such that value = scale * (code - offset) + min, scale per (rows, nb, g)
    with g = 2 for q6_K (per 16 elements) else 1, min per (rows, nb, 1) or None; float32 as GGML
    computes them (d*sc and dmin*mn are exact in float32)."""
    bt = base_type(wtype)
    f32 = np.float32
    if bt in ("q5_0", "q5_1"):
        d = np.asarray(arrays["d"], f32)[..., None]
        return d, (np.asarray(arrays["m"], f32)[..., None] if bt == "q5_1" else None), (16 if bt == "q5_0" else 0)
    if bt == "mxfp4":
        return e8m0_half(arrays["e"])[..., None], None, 0
    rows = arrays["qs"].shape[0]
    nb = arrays["qs"].shape[1] // 16
    rep = nb // arrays["d"].shape[1]  # 8, or 1 for the _32 variants
    d = np.repeat(np.asarray(arrays["d"], f32), rep, axis=1)
    if bt == "q6_K":
        sc = np.asarray(arrays["sc"]).astype(f32).reshape(rows, nb, 2)
        return d[..., None] * sc, None, 32
    dmin = np.repeat(np.asarray(arrays["dmin"], f32), rep, axis=1)
    sc = np.asarray(arrays["sc"]).astype(f32)
    mn = np.asarray(arrays["mn"]).astype(f32)
    return (d * sc)[..., None], -(dmin * mn)[..., None], 0


def _dequantize_new(arrays, wtype):
    if base_type(wtype) in IQ4_TYPES:
        return _dequantize_iq4(arrays, wtype)
    q = codes(arrays, wtype)
    rows, nb = q.shape[:2]
    if base_type(wtype) == "mxfp4":
        return (e8m0_half(arrays["e"])[..., None] * MXFP4_KVALUES[q].astype(np.float32)).reshape(rows, -1)
    scale, mn, off = block_scales(arrays, wtype)
    g = scale.shape[-1]
    v = (q - off).astype(np.float32).reshape(rows, nb, g, -1) * scale[..., None]
    v = v.reshape(rows, nb, 32)
    if mn is not None:
        v = v + mn
    return v.reshape(rows, -1)


# GGML block structs: bytes per block (32 weights, or 256 for the K-quants)
GGML_BLOCK_BYTES = {"q4_0": 2 + 16, "q4_1": 2 + 2 + 16, "q8_0": 2 + 32, "q5_0": 2 + 4 + 16, "q5_1": 2 + 2 + 4 + 16,
                    "mxfp4": 1 + 16, "q4_K": 2 + 2 + 12 + 128, "q5_K": 2 + 2 + 12 + 32 + 128, "q6_K": 128 + 64 + 16 + 2,
                    "q2_K": 16 + 64 + 2 + 2, "q3_K": 32 + 64 + 12 + 2}
GGML_BLOCK_BYTES.update(iq4_nl=2 + 16, iq4_xs=2 + 2 + 4 + 128)  # IQ4_XS: d, scales_h, scales_l, qs


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def _bytes(a: np.ndarray, n: int) -> np.ndarray:
    """An array's elements as n bytes each, on a new last axis."""
    a = np.ascontiguousarray(a)
    return a.view(np.uint8).reshape(a.shape + (n,))


def _unpack_scales_k(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGML's 12 bytes of 6-bit scales and mins (get_scale_min_k4) -> sc, mn (..., 8) uint8."""
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=-1)
    return sc, mn


def _pack_scales_k(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    a = (sc[..., :4] & 0x3F) | ((sc[..., 4:] >> 4) << 6)
    b = (mn[..., :4] & 0x3F) | ((mn[..., 4:] >> 4) << 6)
    c = (sc[..., 4:] & 0x0F) | ((mn[..., 4:] & 0x0F) << 4)
    return np.concatenate([a, b, c], axis=-1).astype(np.uint8)


def _q5_K_qh(bits: np.ndarray) -> np.ndarray:
    """q5_K high bits (..., nb, 32) of 0/1 in element order -> qh (..., nb * 4): bit 2c + h of
    byte k of a sub-block = element 8c + 4h + k."""
    t = np.swapaxes(bits.reshape(bits.shape[:-1] + (8, 4)), -1, -2)  # [k, 2c + h]
    return np.packbits(t.astype(np.uint8), axis=-1, bitorder="little").reshape(bits.shape[:-2] + (-1,))


def _q6_K_qh(h: np.ndarray) -> np.ndarray:
    """q6_K high bits (..., 4, 8) of 0..3 ([c, k]: q >> 4 of element 8c + k of a sub-block) -> the 8
    qh bytes (..., 8): byte k holds field c in bits 2c, 2c + 1."""
    return h[..., 0, :] | (h[..., 1, :] << 2) | (h[..., 2, :] << 4) | (h[..., 3, :] << 6)


SPLIT_ROWS = 4096  # rows split_ggml unpacks at once (the K-quant layouts pass through a byte per weight)


def split_ggml(raw: np.ndarray, wtype: str, rows: int, cols: int) -> dict[str, np.ndarray]:
    """GGML block bytes (uint8, rows x blocks) -> split-layout arrays, bit-exact (lossless).

    Unpacking goes through temporaries of a byte or more per weight, so a tensor of more than
    ``SPLIT_ROWS`` rows is split that many rows at a time into arrays allocated once: one GGUF
    tensor holds all of a DeepSeek layer's experts (3.8 G weights), which unpacked whole took
    more than 12 GB and the converter was killed for it on a 24 GB node."""
    if rows <= SPLIT_ROWS or wtype in ("f32", "f16"):
        return _split_block_rows(raw, wtype, rows, cols)
    raw = np.asarray(raw, dtype=np.uint8).reshape(rows, -1)
    out: dict[str, np.ndarray] = {}
    for r0 in range(0, rows, SPLIT_ROWS):
        n = min(SPLIT_ROWS, rows - r0)
        for k, v in _split_block_rows(raw[r0:r0 + n], wtype, n, cols).items():
            if k not in out:
                out[k] = np.empty((rows,) + v.shape[1:], v.dtype)
            out[k][r0:r0 + n] = v
    return out


def _split_block_rows(raw: np.ndarray, wtype: str, rows: int, cols: int) -> dict[str, np.ndarray]:
    if wtype in ("f32", "f16"):
        return {"w": np.asarray(raw).view(np.dtype(wtype.replace("f", "float"))).reshape(rows, cols)}
    if wtype not in GGML_BLOCK_BYTES:
        raise ValueError(f"no GGML block layout for {wtype!r}")
    if wtype in IQ4_TYPES:
        return _split_iq4(raw, wtype, rows, cols)
    bb = GGML_BLOCK_BYTES[wtype]
    nb = cols // QK
    b = np.asarray(raw, dtype=np.uint8).reshape(rows, cols // block_cols(wtype), bb)
    if wtype in LOWK_TYPES:
        return _lowk_split(b, wtype, rows)
    c = np.ascontiguousarray
    if wtype == "q4_0":
        return {"qs": c(b[..., 2:]).reshape(rows, -1), "d": _f16(b[..., :2])}
    if wtype == "q4_1":
        return {"qs": c(b[..., 4:]).reshape(rows, -1), "d": _f16(b[..., 0:2]), "m": _f16(b[..., 2:4])}
    if wtype == "q8_0":
        return {"qs": c(b[..., 2:]).view(np.int8).reshape(rows, -1), "d": _f16(b[..., :2])}
    if wtype == "q5_0":
        return {"qs": c(b[..., 6:]).reshape(rows, -1), "qh": c(b[..., 2:6]).reshape(rows, -1), "d": _f16(b[..., :2])}
    if wtype == "q5_1":
        return {"qs": c(b[..., 8:]).reshape(rows, -1), "qh": c(b[..., 4:8]).reshape(rows, -1),
                "d": _f16(b[..., 0:2]), "m": _f16(b[..., 2:4])}
    if wtype == "mxfp4":
        return {"qs": c(b[..., 1:]).reshape(rows, -1), "e": c(b[..., 0])}
    ns = b.shape[1]
    if wtype in ("q4_K", "q5_K"):
        sc, mn = _unpack_scales_k(b[..., 4:16])
        qs = b[..., -128:].reshape(rows, ns, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(2, 1)
        q = (qs & 0x0F).reshape(rows, nb, 32)  # sub-block 2j: low nibbles of bytes 32j.., 2j+1: high
        out = {"qs": _pack_nibbles(q)}
        if wtype == "q5_K":
            qh = b[..., 16:48].reshape(rows, ns, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(8, 1)
            out["qh"] = _q5_K_qh((qh & 1).reshape(rows, nb, 32))  # sub-block j: bit j of qh[0..31]
        out.update(sc=c(sc).reshape(rows, nb), mn=c(mn).reshape(rows, nb), d=_f16(b[..., 0:2]),
                   dmin=_f16(b[..., 2:4]))
        return out
    if wtype == "q6_K":
        ql = b[..., 0:128].reshape(rows, ns, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(2, 1)
        ql = (ql & 0x0F).reshape(rows, ns, 2, 4, 32)
        qh = b[..., 128:192].reshape(rows, ns, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
        qh = (qh & 3).reshape(rows, ns, 2, 4, 32)
        q = (ql | (qh << 4)).reshape(rows, nb, 32)
        hb = _q6_K_qh((q >> 4).reshape(rows, nb, 4, 8))  # (rows, nb, 8)
        return {"qs": _pack_nibbles(q & 0x0F), "qh": hb.reshape(rows, -1),
                "sc": c(b[..., 192:208]).view(np.int8).reshape(rows, -1), "d": _f16(b[..., 208:210])}
    raise ValueError(f"unknown weight type {wtype!r}")


FORMAT1_QH = ("q5_K", "q6_K")  # the types whose qh shard format 1 stored as element-order bit masks


def qh_from_format1(qh: np.ndarray, wtype: str, chunk: int = 1 << 18) -> np.ndarray:
    """``qh`` of a q5_K / q6_K tensor of shard format 1 (per sub-block little-endian uint32 masks,
    bit e = element e: q5_K's bit 4; q6_K's bit 4, then bit 5) -> the current layout (q5_K: bit
    2c + h of byte k = element 8c + 4h + k; q6_K: byte k = the 2-bit q >> 4 of elements k, k + 8,
    k + 16, k + 24), any leading shape; lossless, ``chunk`` sub-blocks at a time."""
    q6 = base_type(wtype) == "q6_K"
    src = np.asarray(qh, np.uint8).reshape(-1, 8 if q6 else 4)
    out = np.empty(src.shape, np.uint8)
    for i in range(0, src.shape[0], chunk):
        bits = np.unpackbits(src[i:i + chunk].reshape(-1, 2 if q6 else 1, 4), axis=-1, bitorder="little")
        if not q6:
            out[i:i + chunk] = _q5_K_qh(bits.reshape(-1, 1, 32))
            continue
        out[i:i + chunk] = _q6_K_qh((bits[:, 0] | (bits[:, 1] << 1)).reshape(-1, 4, 8))
    return out.reshape(np.shape(qh))


def join_ggml(arrays: dict[str, np.ndarray], wtype: str) -> np.ndarray:
    """Inverse of split_ggml: split-layout arrays -> GGML block bytes (rows, blocks * block_bytes)."""
    if wtype in ("f32", "f16"):
        return np.ascontiguousarray(arrays["w"]).view(np.uint8)
    if wtype in LOWK_TYPES:
        return _lowk_join(arrays, wtype)
    if wtype in IQ4_TYPES:
        return _join_iq4(arrays, wtype)
    rows, nb = arrays["qs"].shape[0], arrays["qs"].shape[1] // QS_BYTES[wtype]
    qs = np.ascontiguousarray(arrays["qs"]).view(np.uint8).reshape(rows, nb, -1)
    if wtype in ("q4_0", "q4_1", "q8_0", "q5_0", "q5_1", "mxfp4"):
        parts = [] if wtype == "mxfp4" else [_bytes(arrays["d"], 2)]
        if wtype in ("q4_1", "q5_1"):
            parts.append(_bytes(arrays["m"], 2))
        if wtype in ("q5_0", "q5_1"):
            parts.append(np.asarray(arrays["qh"], np.uint8).reshape(rows, nb, 4))
        if wtype == "mxfp4":
            parts.append(np.asarray(arrays["e"], np.uint8).reshape(rows, nb, 1))
        parts.append(qs)
        return np.concatenate(parts, axis=-1).reshape(rows, -1)
    if wtype not in K_TYPES:
        raise ValueError(f"no GGML block layout for {wtype!r}")
    ns = nb // 8
    q = codes(arrays, wtype).astype(np.uint8).reshape(rows, ns, 8, 32)
    if wtype in ("q4_K", "q5_K"):
        lo = q.reshape(rows, ns, 4, 2, 32) & 0x0F
        packed = lo[:, :, :, 0] | (lo[:, :, :, 1] << 4)
        parts = [_bytes(arrays["d"], 2), _bytes(arrays["dmin"], 2),
                 _pack_scales_k(np.asarray(arrays["sc"], np.uint8).reshape(rows, ns, 8),
                                np.asarray(arrays["mn"], np.uint8).reshape(rows, ns, 8))]
        if wtype == "q5_K":
            hb = ((q >> 4) & 1).astype(np.uint8)  # (rows, ns, 8, 32)
            parts.append((hb << np.arange(8, dtype=np.uint8).reshape(8, 1)).sum(axis=2, dtype=np.uint8))
        parts.append(packed.reshape(rows, ns, 128))
        return np.concatenate(parts, axis=-1).reshape(rows, -1)
    # q6_K
    q = q.reshape(rows, ns, 2, 4, 32)
    lo, hi = q & 0x0F, q >> 4
    ql = np.concatenate([lo[:, :, :, 0] | (lo[:, :, :, 2] << 4), lo[:, :, :, 1] | (lo[:, :, :, 3] << 4)], axis=-1)
    qh = hi[:, :, :, 0] | (hi[:, :, :, 1] << 2) | (hi[:, :, :, 2] << 4) | (hi[:, :, :, 3] << 6)
    parts = [ql.reshape(rows, ns, 128), qh.reshape(rows, ns, 64),
             np.asarray(arrays["sc"]).view(np.uint8).reshape(rows, ns, 16), _bytes(arrays["d"], 2)]
    return np.concatenate([p.astype(np.uint8) for p in parts], axis=-1).reshape(rows, -1)


def to_per32(arrays: dict[str, np.ndarray], wtype: str) -> tuple[dict[str, np.ndarray], str]:
    """A K-quant's arrays with d (and dmin) repeated per 32-block: type <t>_32, same values."""
    if wtype not in K_TYPES:
        return arrays, wtype
    out = dict(arrays)
    for k in ("d", "dmin"):
        if k in out:
            out[k] = np.repeat(np.asarray(out[k]), QK_K // QK, axis=-1)
    return out, wtype + "_32"


def random_ggml(wtype: str, rows: int, cols: int, rng: np.random.Generator, scale: float = 0.02) -> np.ndarray:
    """Random, valid GGML blocks of a type (tests, benchmarks): uniform random codes with scales
    chosen so the values have about ``scale`` magnitude."""
    bb = GGML_BLOCK_BYTES[wtype]
    n = rows * cols // block_cols(wtype)
    raw = rng.integers(0, 256, (n, bb), dtype=np.uint8)

    def put_f16(off, vals):
        raw[:, off:off + 2] = _bytes(np.asarray(vals, np.float16), 2).reshape(n, 2)

    u = lambda lo, hi: rng.uniform(lo, hi, n)  # noqa: E731
    if wtype in ("q4_0", "q8_0", "q5_0"):
        put_f16(0, u(0.5, 1.5) * scale / {"q4_0": 8, "q8_0": 127, "q5_0": 16}[wtype])
    elif wtype in ("q4_1", "q5_1"):
        put_f16(0, u(0.5, 1.5) * scale / 16)
        put_f16(2, -u(0.5, 1.5) * scale)
    elif wtype == "mxfp4":
        raw[:, 0] = np.round(127 + np.log2(scale / 6) + rng.integers(-1, 2, n)).astype(np.uint8)
    elif wtype in ("q4_K", "q5_K"):
        put_f16(0, u(0.5, 1.5) * scale / (63 * 16))
        put_f16(2, u(0.5, 1.5) * scale / 63)
    elif wtype == "q6_K":
        put_f16(208, u(0.5, 1.5) * scale / (127 * 32))
    elif wtype == "q2_K":
        put_f16(80, u(0.5, 1.5) * scale / (15 * 3))
        put_f16(82, u(0.5, 1.5) * scale / 15)
    elif wtype == "q3_K":
        put_f16(108, u(0.5, 1.5) * scale / (32 * 4))
    elif wtype in IQ4_TYPES:  # iq4_xs: |ls - 32| <= 32 (random bytes give random 6-bit scales)
        put_f16(0, u(0.5, 1.5) * scale / (127 if wtype == "iq4_nl" else 127 * 32))
    return raw.reshape(rows, -1)


def random_arrays(wtype: str, rows: int, cols: int, rng: np.random.Generator, scale: float = 0.02) -> dict:
    """Random split-layout arrays of any type (K-quants too: they have no quantizer here)."""
    if wtype in ("f16", "f32"):
        return quantize(rng.standard_normal((rows, cols)).astype(np.float32) * scale, wtype)
    bt = base_type(wtype)
    a = split_ggml(random_ggml(bt, rows, cols, rng, scale), bt, rows, cols)
    return to_per32(a, bt)[0] if wtype.endswith("_32") else a


# ----------------------------------------------------------------------------------------------
# Q2_K and Q3_K (kernels: mpillm.kernels.lowk). GGML's blocks (256 weights):
#   block_q2_K {u8 scales[16] (low nibble: scale, high: min, one per 16 weights); u8 qs[64]; f16 d, dmin}
#       value = d * scale * q - dmin * min, q 2-bit
#   block_q3_K {u8 hmask[32]; u8 qs[64]; u8 scales[12] (sixteen 6-bit scales); f16 d}
#       value = d * (scale - 32) * (q - (4 if the high bit is clear else 0)), q 2-bit
# GGML's 2-bit order (byte l of a 128-weight half holds weights l, l+32, l+64, l+96 at bits 0, 2, 4, 6)
# spans 4 sub-blocks; ours keeps each 32-weight sub-block in its own 8 bytes (so a column split at
# any 32-block boundary slices it, as the ``_32`` variants need):
#   qs u8 (rows, nb*8): byte 4h + m of a sub-block holds weight 16h + 4k + m at bits 2k..2k+1
#       (h = half 0/1, k, m = 0..3): the kernels broadcast dword h to four 32-bit lanes, shift
#       lane k right by 2k and mask 3 -- 16 codes in element order, one variable shift (vpsrlvd)
#   q2_K: sc u8 (rows, nb*2) GGML's scale/min bytes as they are, per 16 weights in element order;
#         d, dmin f16 (rows, ns)                       value = d*(sc & 15)*q - dmin*(sc >> 4)
#   q3_K (shard format 3): the 3-bit codes c = q | (high bit << 2) of a sub-block by position
#         j = 4h + m (0..7) and field k (weight 16h + 4k + m, as q2_K's qs): qs u8 (rows, nb*8) byte
#         j = c_0 | c_1 << 3 | (c_2 & 3) << 6, qh u8 (rows, nb*4) nibble j (byte j // 2, the low
#         nibble for even j) = c_3 | (c_2 >> 2) << 3 -- the kernels take each field's 64 codes of 8
#         sub-blocks with one or two operations and no mask registers (kernels.lowk); format 2 kept
#         q2_K's qs and the high bits as a 32-bit mask per sub-block (bit i = weight i), read by
#         q3_K_from_format2;
#         sc i8 (rows, nb*2) the 6-bit scales minus 32, per 16 weights; d f16 (rows, ns)
#                                                      value = d*sc*(c - 4)
# q2_K is exactly GGML's 84 bytes per 256 weights; q3_K 114 (GGML: 110, the unpacked scales).
# ----------------------------------------------------------------------------------------------
def _lowk_qs(q2: np.ndarray) -> np.ndarray:
    """(rows, nb, 32) 2-bit codes in element order -> qs (rows, nb*8)."""
    r = q2.reshape(q2.shape[0], -1, 2, 4, 4).astype(np.uint8)  # (rows, nb, h, k, m)
    packed = r[:, :, :, 0] | (r[:, :, :, 1] << 2) | (r[:, :, :, 2] << 4) | (r[:, :, :, 3] << 6)
    return packed.reshape(q2.shape[0], -1)


def _lowk_codes2(qs: np.ndarray) -> np.ndarray:
    """qs (rows, nb*8) -> (rows, nb, 32) 2-bit codes in element order."""
    b = np.asarray(qs, np.uint8).reshape(qs.shape[0], -1, 2, 1, 4)  # (rows, nb, h, k, m)
    q = (b >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3
    return q.reshape(qs.shape[0], -1, 32)


def _ggml_codes2(qs: np.ndarray) -> np.ndarray:
    """GGML's qs (rows, ns, 64) -> (rows, ns * 8, 32) codes in element order."""
    rows, ns = qs.shape[:2]
    q = (qs.reshape(rows, ns, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3
    return q.reshape(rows, ns * 8, 32)


def _q3_scales(s: np.ndarray) -> np.ndarray:
    """GGML's 12 bytes of Q3_K scales (..., 12) -> the sixteen 6-bit values (..., 16) uint8."""
    lo = (s[..., None, 0:8] >> np.array([0, 4], np.uint8).reshape(2, 1)) & 0x0F  # (..., 2, 8)
    hi = (s[..., None, 8:12] >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3  # (..., 4, 4)
    return lo.reshape(s.shape[:-1] + (16,)) | (hi.reshape(s.shape[:-1] + (16,)) << 4)


def _q3_pack_scales(v: np.ndarray) -> np.ndarray:
    """Inverse of _q3_scales."""
    lo = (v[..., 0:8] & 0x0F) | ((v[..., 8:16] & 0x0F) << 4)
    h = (v >> 4).reshape(v.shape[:-1] + (4, 4))  # (i, j): scale 4i + j -> byte 8 + j, bits 2i
    hi = h[..., 0, :] | (h[..., 1, :] << 2) | (h[..., 2, :] << 4) | (h[..., 3, :] << 6)
    return np.concatenate([lo, hi], axis=-1).astype(np.uint8)


def q3_pack(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, nb, 32) q3_K codes 0..7 in element order -> (qs (rows, nb*8), qh (rows, nb*4)) of format 3."""
    f = c.reshape(c.shape[0], -1, 2, 4, 4).transpose(0, 1, 3, 2, 4).reshape(c.shape[0], -1, 4, 8).astype(np.uint8)
    qs = f[:, :, 0] | (f[:, :, 1] << 3) | ((f[:, :, 2] & 3) << 6)  # [k, j]: field k, position j = 4h + m
    nib = f[:, :, 3] | ((f[:, :, 2] >> 2) << 3)
    qh = nib[..., 0::2] | (nib[..., 1::2] << 4)
    return qs.reshape(c.shape[0], -1), qh.reshape(c.shape[0], -1)


def _q3_unpack(qs: np.ndarray, qh: np.ndarray) -> np.ndarray:
    """Inverse of q3_pack: format-3 qs, qh -> (rows, nb, 32) codes in element order (int16)."""
    rows = qs.shape[0]
    v = np.asarray(qs, np.uint8).reshape(rows, -1, 8)
    h = np.asarray(qh, np.uint8).reshape(rows, -1, 4)
    nib = np.stack([h & 15, h >> 4], axis=-1).reshape(rows, -1, 8)
    f = np.stack([v & 7, (v >> 3) & 7, (v >> 6) | ((nib >> 3) << 2), nib & 7], axis=2)  # (rows, nb, k, j)
    return f.reshape(rows, -1, 4, 2, 4).transpose(0, 1, 3, 2, 4).reshape(rows, -1, 32).astype(np.int16)


def _q3_codes_format2(qs: np.ndarray, qh: np.ndarray) -> np.ndarray:
    """Shard format 2's q3_K qs (q2_K's layout) and qh (a 32-bit mask per sub-block) -> codes."""
    q = _lowk_codes2(qs).astype(np.int16)
    hb = np.unpackbits(np.asarray(qh, np.uint8).reshape(q.shape[0], -1, 4), axis=-1, bitorder="little")
    return q | (hb.astype(np.int16) << 2)


def q3_K_from_format2(qs: np.ndarray, qh: np.ndarray, chunk: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """A q3_K tensor's qs and qh as shard formats 1 and 2 stored them -> format 3's (lossless), any
    leading shape (experts), ``chunk`` sub-blocks at a time."""
    src_s = np.asarray(qs, np.uint8).reshape(-1, 8)
    src_h = np.asarray(qh, np.uint8).reshape(-1, 4)
    out_s, out_h = np.empty(src_s.shape, np.uint8), np.empty(src_h.shape, np.uint8)
    for i in range(0, src_s.shape[0], chunk):
        c = _q3_codes_format2(src_s[i:i + chunk].reshape(1, -1), src_h[i:i + chunk].reshape(1, -1))
        a, b = q3_pack(c)
        out_s[i:i + chunk], out_h[i:i + chunk] = a.reshape(-1, 8), b.reshape(-1, 4)
    return out_s.reshape(np.shape(qs)), out_h.reshape(np.shape(qh))


def _lowk_split(b: np.ndarray, wtype: str, rows: int) -> dict[str, np.ndarray]:
    c = np.ascontiguousarray
    if wtype == "q2_K":
        return {"qs": _lowk_qs(_ggml_codes2(b[..., 16:80])), "sc": c(b[..., 0:16]).reshape(rows, -1),
                "d": _f16(b[..., 80:82]), "dmin": _f16(b[..., 82:84])}
    hm = b[..., 0:32].reshape(rows, -1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(8, 1)
    high = (hm & 1).reshape(rows, -1, 32)  # sub-block j: bit j of hmask[0..31]
    qs, qh = q3_pack(_ggml_codes2(b[..., 32:96]) | (high << 2))
    sc = (_q3_scales(b[..., 96:108]).astype(np.int16) - 32).astype(np.int8)
    return {"qs": qs, "qh": qh, "sc": sc.reshape(rows, -1), "d": _f16(b[..., 108:110])}


def _lowk_join(arrays: dict[str, np.ndarray], wtype: str) -> np.ndarray:
    c = lowk_codes(arrays, wtype)
    q = (c & 3).astype(np.uint8)
    rows, nb = q.shape[:2]
    ns = nb // 8
    g = q.reshape(rows, ns, 2, 4, 32)  # GGML: half h, sub-block k of it at bits 2k
    gq = (g[:, :, :, 0] | (g[:, :, :, 1] << 2) | (g[:, :, :, 2] << 4) | (g[:, :, :, 3] << 6)).reshape(rows, ns, 64)
    d = _bytes(arrays["d"], 2)
    if wtype == "q2_K":
        parts = [np.asarray(arrays["sc"], np.uint8).reshape(rows, ns, 16), gq, d, _bytes(arrays["dmin"], 2)]
    else:
        hb = (c >> 2).astype(np.uint8).reshape(rows, ns, 8, 32)  # the high bits, sub-block j -> bit j of hmask
        hm = (hb << np.arange(8, dtype=np.uint8).reshape(8, 1)).sum(axis=2, dtype=np.uint8)  # (rows, ns, 32)
        v = (np.asarray(arrays["sc"]).view(np.int8).astype(np.int16) + 32).astype(np.uint8).reshape(rows, ns, 16)
        parts = [hm, gq, _q3_pack_scales(v), d]
    return np.concatenate([p.astype(np.uint8) for p in parts], axis=-1).reshape(rows, -1)


def lowk_codes(arrays: dict[str, np.ndarray], wtype: str) -> np.ndarray:
    """q2_K: the 2-bit codes; q3_K: c = q | (high bit << 2), 0..7 -- (rows, nb, 32) int16."""
    if base_type(wtype) == "q3_K":
        return _q3_unpack(arrays["qs"], arrays["qh"])
    return _lowk_codes2(arrays["qs"]).astype(np.int16)


def _lowk_dequantize(arrays: dict[str, np.ndarray], wtype: str) -> np.ndarray:
    """As gguf.quants: (d * scale) * q - dmin * min (q2_K), (d * scale) * (c - 4) (q3_K), float32."""
    q = lowk_codes(arrays, wtype)
    rows, nb = q.shape[:2]
    f32 = np.float32
    d = np.repeat(np.asarray(arrays["d"], f32), nb // arrays["d"].shape[1], axis=1)[..., None]  # (rows, nb, 1)
    if base_type(wtype) == "q2_K":
        sc = np.asarray(arrays["sc"], np.uint8).reshape(rows, nb, 2)
        dmin = np.repeat(np.asarray(arrays["dmin"], f32), nb // arrays["dmin"].shape[1], axis=1)[..., None]
        dl, ml = d * (sc & 0x0F).astype(f32), dmin * (sc >> 4).astype(f32)
        v = dl[..., None] * q.reshape(rows, nb, 2, 16).astype(f32) - ml[..., None]
    else:
        dl = d * np.asarray(arrays["sc"]).view(np.int8).reshape(rows, nb, 2).astype(f32)
        v = dl[..., None] * (q - 4).reshape(rows, nb, 2, 16).astype(f32)
    return v.reshape(rows, -1)
# -- the IQ4 types: GGML blocks <-> split arrays, dequantization -----------------------------------
def _split_iq4(raw: np.ndarray, wtype: str, rows: int, cols: int) -> dict[str, np.ndarray]:
    """block_iq4_nl {fp16 d; u8 qs[16]} / block_iq4_xs {fp16 d; u16 scales_h; u8 scales_l[4];
    u8 qs[128]} -> split arrays; the 6-bit scale of sub-block j is scales_l's nibble j (low nibble
    first) | bits 2j, 2j + 1 of scales_h << 4, stored as ls - 32 (int8)."""
    bb = GGML_BLOCK_BYTES[wtype]
    b = np.asarray(raw, dtype=np.uint8).reshape(rows, cols // block_cols(wtype), bb)
    c = np.ascontiguousarray
    if wtype == "iq4_nl":
        return {"qs": c(b[..., 2:]).reshape(rows, -1), "d": _f16(b[..., :2])}
    ns = b.shape[1]
    sh = c(b[..., 2:4]).view("<u2")[..., 0]  # (rows, ns)
    lo = (b[..., 4:8, None] >> np.array([0, 4], np.uint8)) & 0x0F  # (rows, ns, 4, 2)
    hi = (sh[..., None] >> (2 * np.arange(8, dtype=np.uint16))) & 3  # (rows, ns, 8)
    ls = lo.reshape(rows, ns, 8) | (hi.astype(np.uint8) << 4)
    sc = (ls.astype(np.int16) - 32).astype(np.int8)
    return {"qs": c(b[..., 8:]).reshape(rows, -1), "sc": sc.reshape(rows, -1), "d": _f16(b[..., :2])}


def _join_iq4(arrays: dict[str, np.ndarray], wtype: str) -> np.ndarray:
    rows = arrays["qs"].shape[0]
    if wtype == "iq4_nl":
        nb = arrays["qs"].shape[1] // 16
        qs = np.ascontiguousarray(arrays["qs"]).reshape(rows, nb, 16)
        return np.concatenate([_bytes(arrays["d"], 2), qs], axis=-1).reshape(rows, -1)
    ns = arrays["qs"].shape[1] // 128
    ls = (np.asarray(arrays["sc"]).astype(np.int16) + 32).astype(np.uint8).reshape(rows, ns, 8)
    sl = (ls[..., 0::2] & 0x0F) | ((ls[..., 1::2] & 0x0F) << 4)
    sh = ((ls >> 4).astype(np.uint16) << (2 * np.arange(8, dtype=np.uint16))).sum(axis=-1, dtype=np.uint16)
    parts = [_bytes(arrays["d"], 2), _bytes(sh.astype("<u2"), 2), sl.astype(np.uint8),
             np.ascontiguousarray(arrays["qs"]).reshape(rows, ns, 128)]
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def _dequantize_iq4(arrays: dict[str, np.ndarray], wtype: str) -> np.ndarray:
    """GGML's order of float32 operations: d * kv (iq4_nl), (d * (ls - 32)) * kv (iq4_xs)."""
    q = _unpack_nibbles(np.asarray(arrays["qs"]))  # (rows, nb, 32)
    rows, nb = q.shape[:2]
    d = np.asarray(arrays["d"], np.float32)
    if base_type(wtype) == "iq4_xs":
        d = np.repeat(d, nb // d.shape[1], axis=1) * np.asarray(arrays["sc"]).astype(np.float32)
    return (d[..., None] * IQ4_KVALUES[q].astype(np.float32)).reshape(rows, -1)
