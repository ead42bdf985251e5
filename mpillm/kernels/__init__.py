"""Quantized matmul kernels (numba), with CPU-feature dispatch.

API (numpy arrays whose rows are contiguous -- C-contiguous, or row-strided views;
weights may be read-only memmaps; T tokens, N weight rows, K columns, nb = K // 32;
``out`` is always overwritten; wrong shapes raise ValueError)::

    set_threads(n)                               numba threads of this rank
    quantize_q8_0(x, xq, xd, xsum)               x f32 (T,K) -> xq i8 (T,K), xd f32 (T,nb), xsum i32 (T,nb)
    matmul_q4_0_q8_0(qs, d, xq, xd, xsum, out)   qs u8 (N,K/2), d f16 (N,nb) -> out f32 (T,N)
    matmul_q4_1_q8_0(qs, d, m, xq, xd, xsum, out)
    matmul_q8_0_q8_0(qs, d, xq, xd, xsum, out)   qs i8 (N,K)
    matmul_q5_0_q8_0(qs, qh, d, xq, xd, xsum, out)       the types of ``kquant.py`` (arrays in the
    matmul_q5_1_q8_0(qs, qh, d, m, xq, xd, xsum, out)    order of ``quant.ARRAYS``; the ``_32``
    matmul_q4_K_q8_0(qs, sc, mn, d, dmin, ...)           K-quant variants use the same kernels)
    matmul_q5_K_q8_0(qs, qh, sc, mn, d, dmin, ...)
    matmul_q6_K_q8_0(qs, qh, sc, d, ...)
    matmul_mxfp4_q8_0(qs, e, ...)
    matmul_q2_K_q8_0(qs, sc, d, dmin, ...)               the types of ``lowk.py``
    matmul_q3_K_q8_0(qs, qh, sc, d, ...)
    matmul_iq4_nl_q8_0(qs, d, ...)                       the IQ4 types (``iquant.py``; iq4_xs_32
    matmul_iq4_xs_q8_0(qs, sc, d, ...)                   uses the iq4_xs kernel)
    matmul_q4_0_r16_q8_0(qs, d, ...)             the interleaved layout (``interleaved.py``: 16 weight
    matmul_q4_1_r16_q8_0(qs, d, m, ...)                  rows per register, vnni only; the runtime repacks
    matmul_q8_0_r16_q8_0(qs, d, ...)                     q4_0 / q4_1 / q8_0 / q4_K / q6_K / q2_K / q3_K
    matmul_q4_K_r16_q8_0(qs, sc, mn, d, dmin, ...)       and the _32 variants into it, ``interleaved.repack``;
    matmul_q6_K_r16_q8_0(qs, qh, sc, d, ...)             qs (G, nb, 128 | 256 | 512), scales (G, n, 16))
    matmul_q2_K_r16_q8_0(qs, sc, d, dmin, ...)
    matmul_q3_K_r16_q8_0(qs, qh, sc, d, ...)
    matmul_f16_f32(w, x, out)                    w f16 (N,K), x f32 (T,K)
    matmul_f32_f32(w, x, out)                    w f32 (N,K)
    active_path() -> "vnni" | "avx2" | "neon-dot" | "neon" | "portable"
    warmup()                                     compile (or load from cache) every kernel of the active path
    get_path(name) -> KernelPath                 the same API for one path (tests, benchmarks)
    available_paths() -> list of paths this CPU can run
    matmul(wtype, arrays, xq, xd, xsum, x, out)  dispatch on a weight type name (quant split-layout dict)
    jit                                          the active path's raw jitted kernels (see below)

The path is chosen at import from the host CPU (best first: vnni, avx2,
neon-dot, neon, portable) and can be forced with ``MPILLM_KERNELS=<path>``.

Paths: ``vnni`` and ``avx2`` (``x86.py``: llvmlite IR calling vpdpbusd /
vpmaddubsw explicitly), ``portable`` (``portable.py``: target-neutral vector
IR; sdot on AArch64). On aarch64 the portable kernels are the ``neon-dot`` or
``neon`` path: the same IR, compiled by numba for the CPU ``mpillm.runtime.cpu`` chose at
start-up from AT_HWCAP (dot product or not); that choice is process-wide, so
``portable`` there is the same code. The x86 quantized kernels allocate one scratch buffer per
call (~2 x T x K bytes: the activations rearranged for the dot instructions).
Every kernel is ``cache=True``; ``warmup()`` compiles or loads them all.

numba's CPU target has no float16 type: the functions above take fp16 arrays
and pass ``view(np.uint16)`` to the jitted kernels. Jitted callers (a fused
layer in numba) call ``get_path(...).jit.<name>`` directly with uint16 views of
the fp16 arrays (same argument order).
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import numba
import numpy as np

from mpillm.kernels import jitcache
from mpillm.formats import quant

jitcache.install()   # ranks of a node share numba's cache: saves and loads under a file lock

PATHS = ("vnni", "avx2", "neon-dot", "neon", "portable")  # best first
KQ_TYPES = ("q5_0", "q5_1", "q4_K", "q5_K", "q6_K", "mxfp4")  # kernels in kquant.py
LOWK_TYPES = quant.LOWK_TYPES  # q2_K, q3_K: kernels in lowk.py
KQ_TYPES += LOWK_TYPES  # (both modules: the same array-typed API)
KQ_TYPES += quant.IQ4_TYPES  # and in iquant.py (the same API)
_MODULES = {"vnni": "x86", "avx2": "x86", "neon-dot": "portable", "neon": "portable", "portable": "portable"}
ENV = "MPILLM_KERNELS"


def _host_features() -> set[str]:
    try:
        from llvmlite import binding as llvm

        return {k for k, v in llvm.get_host_cpu_features().items() if v}
    except Exception:  # pragma: no cover - llvmlite without host feature query
        return set()


def _machine() -> str:
    import platform

    return platform.machine().lower()


_NEEDS = {
    "vnni": ("avx512f", "avx512bw", "avx512vl", "avx512vnni", "f16c", "fma"),
    "avx2": ("avx2", "f16c", "fma"),
    "neon-dot": (),
    "neon": (),
    "portable": (),
}


def module_of(name: str) -> tuple[str, str]:
    """(module, prefix) of path ``name``'s jitted kernels (``mpillm.kernels.<module>.<prefix><kernel>``)."""
    return f"{__name__}.{_MODULES[name]}", "" if _MODULES[name] == "portable" else name + "_"


def _arm_missing(name: str) -> list[str]:
    from mpillm.runtime import cpu

    if not cpu.is_aarch64():
        return [f"aarch64 (host is {_machine()})"]
    if name == "neon-dot" and not cpu.arm_features()["dotprod"]:
        return ["asimddp (ARMv8.2 dot product)"]
    t = cpu.TARGET
    if t is None or t.path != name:
        have = t.path if t else "?"
        return [f"this process compiles for path {have} (mpillm.runtime.cpu decides at start-up; MPILLM_KERNELS={name})"]
    return []


def missing_features(name: str) -> list[str]:
    """CPU features path ``name`` needs that this host lacks (empty: it can run)."""
    if name not in _NEEDS:
        raise ValueError(f"unknown kernel path {name!r}; choose one of {', '.join(PATHS)}")
    if name == "portable":
        return []
    if name in ("neon-dot", "neon"):
        return _arm_missing(name)
    if _machine() not in ("x86_64", "amd64"):
        return [f"x86_64 (host is {_machine()})"]
    have = _host_features()
    return [f for f in _NEEDS[name] if f not in have]


def available_paths() -> list[str]:
    return [p for p in PATHS if not missing_features(p)]


class KernelPath:
    """The kernel API bound to one path. ``self.jit`` is the module of raw jitted kernels."""

    def __init__(self, name: str, mod: ModuleType, prefix: str):
        self.name = name
        self.jit = _JitView(mod, prefix)
        j = self.jit
        q8, mq40, mq41, mq80 = j.quantize_q8_0, j.matmul_q4_0_q8_0, j.matmul_q4_1_q8_0, j.matmul_q8_0_q8_0
        mf16, mf32 = j.matmul_f16_f32, j.matmul_f32_f32
        u16 = np.uint16

        def matmul_q4_0_q8_0(qs, d, xq, xd, xsum, out):
            mq40(qs, d.view(u16), xq, xd, xsum, out)

        def matmul_q4_1_q8_0(qs, d, m, xq, xd, xsum, out):
            mq41(qs, d.view(u16), m.view(u16), xq, xd, xsum, out)

        def matmul_q8_0_q8_0(qs, d, xq, xd, xsum, out):
            mq80(qs, d.view(u16), xq, xd, xsum, out)

        def matmul_f16_f32(w, x, out):
            mf16(w.view(u16), x, out)

        self.quantize_q8_0 = q8  # no fp16 arguments: the jitted function itself
        self.matmul_q4_0_q8_0 = matmul_q4_0_q8_0
        self.matmul_q4_1_q8_0 = matmul_q4_1_q8_0
        self.matmul_q8_0_q8_0 = matmul_q8_0_q8_0
        self.matmul_f16_f32 = matmul_f16_f32
        self.matmul_f32_f32 = mf32
        for t in KQ_TYPES:
            setattr(self, f"matmul_{t}_q8_0", _fp16_views(getattr(j, f"matmul_{t}_q8_0")))

    def matmul(self, wtype: str, arrays: dict, xq, xd, xsum, x, out) -> None:
        """Dispatch on a weight type name (``mpillm.formats.quant`` split-layout arrays)."""
        if wtype == "q4_0":
            self.matmul_q4_0_q8_0(arrays["qs"], arrays["d"], xq, xd, xsum, out)
        elif wtype == "q4_1":
            self.matmul_q4_1_q8_0(arrays["qs"], arrays["d"], arrays["m"], xq, xd, xsum, out)
        elif wtype == "q8_0":
            self.matmul_q8_0_q8_0(arrays["qs"], arrays["d"], xq, xd, xsum, out)
        elif wtype == "f16":
            self.matmul_f16_f32(arrays["w"], x, out)
        elif wtype == "f32":
            self.matmul_f32_f32(arrays["w"], x, out)
        elif quant.base_type(wtype) in KQ_TYPES:
            getattr(self, f"matmul_{quant.base_type(wtype)}_q8_0")(*(arrays[k] for k, _ in quant.ARRAYS[wtype]),
                                                                  xq, xd, xsum, out)
        else:
            raise ValueError(f"unknown weight type {wtype!r}")

    def warmup(self) -> None:
        """Compile (or load from the numba cache) every kernel for the argument types the
        runtime uses: writable and read-only weights, T = 1 and T > 1 share one compilation.
        The ``kquant`` types compile on first use (a model's fused blocks compile the ones it has)."""
        rng = np.random.default_rng(0)
        T, N, K = 2, 5, 128
        nb = K // 32
        x = rng.standard_normal((T, K)).astype(np.float32)
        xq = np.empty((T, K), np.int8)
        xd = np.empty((T, nb), np.float32)
        xs = np.empty((T, nb), np.int32)
        out = np.empty((T, N), np.float32)
        self.quantize_q8_0(x, xq, xd, xs)
        w = {
            "qs4": rng.integers(0, 256, (N, K // 2), dtype=np.uint8),
            "qs8": rng.integers(-127, 128, (N, K), dtype=np.int8),
            "d": np.full((N, nb), 0.01, np.float16),
            "m": np.full((N, nb), -0.01, np.float16),
            "w16": rng.standard_normal((N, K)).astype(np.float16),
            "w32": rng.standard_normal((N, K)).astype(np.float32),
        }
        for readonly in (False, True):
            a = {}
            for k, v in w.items():
                v = v.copy()
                v.flags.writeable = not readonly
                a[k] = v
            self.matmul_q4_0_q8_0(a["qs4"], a["d"], xq, xd, xs, out)
            self.matmul_q4_1_q8_0(a["qs4"], a["d"], a["m"], xq, xd, xs, out)
            self.matmul_q8_0_q8_0(a["qs8"], a["d"], xq, xd, xs, out)
            self.matmul_f16_f32(a["w16"], x, out)
            self.matmul_f32_f32(a["w32"], x, out)

    def __repr__(self) -> str:
        return f"<KernelPath {self.name}>"


def _fp16_views(fn):
    """A jitted kernel called with fp16 arrays: passes them as uint16 views."""
    u16 = np.uint16

    def call(*args):
        fn(*(a.view(u16) if a.dtype == np.float16 else a for a in args))

    return call


class _JitView:
    """Attribute view of a path module's jitted kernels (``<prefix><name>``)."""

    NAMES = ("quantize_q8_0", "matmul_q4_0_q8_0", "matmul_q4_1_q8_0", "matmul_q8_0_q8_0",
             "matmul_f16_f32", "matmul_f32_f32") + tuple(f"matmul_{t}_q8_0" for t in ("q5_0", "q5_1", "q4_K", "q5_K",
                                                                                     "q6_K", "mxfp4")) \
        + tuple(f"matmul_{t}_q8_0" for t in LOWK_TYPES)
    NAMES += tuple(f"matmul_{t}_q8_0" for t in quant.IQ4_TYPES)

    # the interleaved types' kernels (mpillm.kernels.interleaved): the vnni path only
    OPTIONAL = ("matmul_q4_0_r16_q8_0", "matmul_q4_1_r16_q8_0", "matmul_q8_0_r16_q8_0", "matmul_q4_K_r16_q8_0",
                "matmul_q6_K_r16_q8_0", "matmul_q2_K_r16_q8_0", "matmul_q3_K_r16_q8_0")

    def __init__(self, mod: ModuleType, prefix: str):
        for n in self.NAMES:
            setattr(self, n, getattr(mod, prefix + n))
        for n in self.OPTIONAL:
            if hasattr(mod, prefix + n):
                setattr(self, n, getattr(mod, prefix + n))


_cache: dict[str, KernelPath] = {}


def get_path(name: str) -> KernelPath:
    """The kernel API of path ``name``; raises RuntimeError if this CPU cannot run it."""
    if name in _cache:
        return _cache[name]
    miss = missing_features(name)
    if miss:
        raise RuntimeError(f"kernel path {name!r} needs CPU features this host lacks: {', '.join(miss)}")
    modname, prefix = module_of(name)
    mod = importlib.import_module(modname)
    _cache[name] = p = KernelPath(name, mod, prefix)
    return p


def _choose() -> KernelPath:
    want = os.environ.get(ENV, "").strip().lower()
    if want:
        if want not in PATHS:
            raise RuntimeError(f"{ENV}={want!r} is not a kernel path; choose one of {', '.join(PATHS)}")
        return get_path(want)
    return get_path(available_paths()[0])


_active = _choose()
quantize_q8_0 = _active.quantize_q8_0
matmul_q4_0_q8_0 = _active.matmul_q4_0_q8_0
matmul_q4_1_q8_0 = _active.matmul_q4_1_q8_0
matmul_q8_0_q8_0 = _active.matmul_q8_0_q8_0
matmul_f16_f32 = _active.matmul_f16_f32
matmul_f32_f32 = _active.matmul_f32_f32
matmul = _active.matmul
jit = _active.jit


def active_path() -> str:
    return _active.name


def describe() -> str:
    """The active path for the plan line, with the CPU it was compiled for on aarch64."""
    from mpillm.runtime import cpu

    t = cpu.describe()
    return f"{_active.name} ({t})" if t else _active.name


def warmup() -> None:
    _active.warmup()


def set_threads(n: int) -> None:
    """Numba threads used by this rank's kernels (1 .. numba.config.NUMBA_NUM_THREADS)."""
    n = int(n)
    if not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"threads must be in 1..{numba.config.NUMBA_NUM_THREADS}, got {n}")
    numba.set_num_threads(n)
