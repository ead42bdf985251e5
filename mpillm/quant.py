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

A GGML block (e.g. block_q4_0 = {fp16 d; uint8 qs[16]}) maps to these arrays by
splitting its fields, so a GGUF tensor is copied bit-exactly (``split_ggml``).
The quantizers reproduce GGML's reference rounding (quantize_row_*_ref).
"""
from __future__ import annotations

import numpy as np

QK = 32  # weights per quantization block, for every quantized type

# type name -> (arrays with their dtypes, bytes per GGML block or per element)
ARRAYS: dict[str, tuple[tuple[str, str], ...]] = {
    "q4_0": (("qs", "uint8"), ("d", "float16")),
    "q4_1": (("qs", "uint8"), ("d", "float16"), ("m", "float16")),
    "q8_0": (("qs", "int8"), ("d", "float16")),
    "f16": (("w", "float16"),),
    "f32": (("w", "float32"),),
}
WEIGHT_TYPES = tuple(ARRAYS)
QUANTIZED = ("q4_0", "q4_1", "q8_0")


def array_shapes(wtype: str, rows: int, cols: int) -> dict[str, tuple[tuple[int, int], str]]:
    """Shapes and dtypes of the split-layout arrays of a (rows, cols) matrix."""
    if wtype not in ARRAYS:
        raise ValueError(f"unknown weight type {wtype!r}; supported: {', '.join(WEIGHT_TYPES)}")
    if wtype in QUANTIZED and cols % QK:
        raise ValueError(f"{wtype} needs a column count divisible by {QK}, got {cols}")
    nb = cols // QK
    shapes = {
        "q4_0": {"qs": (rows, cols // 2), "d": (rows, nb)},
        "q4_1": {"qs": (rows, cols // 2), "d": (rows, nb), "m": (rows, nb)},
        "q8_0": {"qs": (rows, cols), "d": (rows, nb)},
        "f16": {"w": (rows, cols)},
        "f32": {"w": (rows, cols)},
    }[wtype]
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
    raise ValueError(f"unknown weight type {wtype!r}; supported: {', '.join(WEIGHT_TYPES)}")


def dequantize(arrays: dict[str, np.ndarray], wtype: str) -> np.ndarray:
    """Split-layout arrays -> float32 (rows, cols), exactly as GGML dequantizes."""
    if wtype in ("f32", "f16"):
        return np.asarray(arrays["w"], dtype=np.float32)
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


# GGML block structs: (type name, bytes per block)
GGML_BLOCK_BYTES = {"q4_0": 2 + 16, "q4_1": 2 + 2 + 16, "q8_0": 2 + 32}


def split_ggml(raw: np.ndarray, wtype: str, rows: int, cols: int) -> dict[str, np.ndarray]:
    """GGML block bytes (uint8, rows * cols / 32 blocks) -> split-layout arrays, bit-exact."""
    if wtype in ("f32", "f16"):
        return {"w": np.asarray(raw).view(np.dtype(wtype.replace("f", "float"))).reshape(rows, cols)}
    bb = GGML_BLOCK_BYTES[wtype]
    b = np.asarray(raw, dtype=np.uint8).reshape(rows, cols // QK, bb)
    if wtype == "q4_0":
        return {"qs": np.ascontiguousarray(b[..., 2:]).reshape(rows, -1),
                "d": np.ascontiguousarray(b[..., :2]).view(np.float16)[..., 0]}
    if wtype == "q4_1":
        return {"qs": np.ascontiguousarray(b[..., 4:]).reshape(rows, -1),
                "d": np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0],
                "m": np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0]}
    if wtype == "q8_0":
        return {"qs": np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(rows, -1),
                "d": np.ascontiguousarray(b[..., :2]).view(np.float16)[..., 0]}
    raise ValueError(f"unknown weight type {wtype!r}")


def join_ggml(arrays: dict[str, np.ndarray], wtype: str) -> np.ndarray:
    """Inverse of split_ggml: split-layout arrays -> GGML block bytes (rows, nb * block_bytes)."""
    if wtype in ("f32", "f16"):
        return np.ascontiguousarray(arrays["w"]).view(np.uint8)
    d = np.ascontiguousarray(arrays["d"]).view(np.uint8).reshape(arrays["d"].shape + (2,))
    rows, nb = arrays["d"].shape
    qs = np.ascontiguousarray(arrays["qs"]).view(np.uint8).reshape(rows, nb, -1)
    parts = [d]
    if wtype == "q4_1":
        parts.append(np.ascontiguousarray(arrays["m"]).view(np.uint8).reshape(rows, nb, 2))
    parts.append(qs)
    return np.concatenate(parts, axis=-1).reshape(rows, -1)
