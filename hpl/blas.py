"""In-place BLAS/LAPACK calls on strided column-major views, through ctypes.

numpy's own ``a @ b`` allocates a temporary and cannot update a sub-block of a
larger matrix in place; f2py wrappers (scipy) copy any view that is not
contiguous.  HPL lives on in-place updates of sub-blocks (``C[r:, c:] -= A @ B``
with a leading dimension), so we call the BLAS that numpy already ships
(OpenBLAS in the numpy wheels, ILP64 with a ``scipy_`` prefix) directly.

Every matrix argument is a 2-D float64 view with unit row stride (a slice of a
Fortran-ordered array).  When no such library is found the functions fall back
to plain numpy (correct, slower); ``BACKEND`` says which one is in use.
"""
from __future__ import annotations

import ctypes
import glob
import os

import numpy as np

# CBLAS enums
_COL_MAJOR = 102
_NO_TRANS, _TRANS = 111, 112
_UPPER, _LOWER = 121, 122
_NON_UNIT, _UNIT = 131, 132
_LEFT, _RIGHT = 141, 142


def _find_library() -> tuple[ctypes.CDLL, str, str, type] | None:
    """(library, cblas prefix/suffix pattern, lapack pattern, int type) or None."""
    paths: list[str] = []
    npdir = os.path.dirname(np.__file__)
    for pat in ("../numpy.libs/*openblas*", ".dylibs/*openblas*", "../numpy.libs/*blas*"):
        paths += sorted(glob.glob(os.path.join(npdir, pat)))
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                p = line.split()[-1]
                if "blas" in os.path.basename(p) and p not in paths and os.path.exists(p):
                    paths.append(p)
    except OSError:
        pass
    # (cblas name pattern, fortran name pattern, integer type)
    flavours = [
        ("scipy_cblas_{}64_", "scipy_{}_64_", ctypes.c_int64),
        ("cblas_{}64_", "{}_64_", ctypes.c_int64),
        ("cblas_{}", "{}_", ctypes.c_int32),
    ]
    for p in paths:
        try:
            lib = ctypes.CDLL(p)
        except OSError:
            continue
        for cpat, fpat, ity in flavours:
            if hasattr(lib, cpat.format("dgemm")) and hasattr(lib, fpat.format("dgetrf")):
                return lib, cpat, fpat, ity
    return None


_found = _find_library()
BACKEND = "numpy"
if _found is not None:
    _lib, _cpat, _fpat, _INT = _found
    _P = ctypes.c_void_p
    _I = _INT
    _D = ctypes.c_double
    _gemm = getattr(_lib, _cpat.format("dgemm"))
    _gemm.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, _I, _I, _I, _D, _P, _I, _P, _I, _D, _P, _I]
    _gemm.restype = None
    _trsm = getattr(_lib, _cpat.format("dtrsm"))
    _trsm.argtypes = [ctypes.c_int] * 5 + [_I, _I, _D, _P, _I, _P, _I]
    _trsm.restype = None
    _gemv = getattr(_lib, _cpat.format("dgemv"))
    _gemv.argtypes = [ctypes.c_int, ctypes.c_int, _I, _I, _D, _P, _I, _P, _I, _D, _P, _I]
    _gemv.restype = None
    _getrf = getattr(_lib, _fpat.format("dgetrf"))
    _getrf.argtypes = [_P] * 6
    _getrf.restype = None
    _laswp = getattr(_lib, _fpat.format("dlaswp"))
    _laswp.argtypes = [_P] * 7
    _laswp.restype = None
    BACKEND = os.path.basename(_lib._name)
    _ITYPE = np.int64 if _INT is ctypes.c_int64 else np.int32
    try:
        _set_threads = getattr(_lib, _cpat.replace("cblas_", "openblas_").format("set_num_threads"))
        _set_threads.argtypes = [ctypes.c_int]
    except AttributeError:
        _set_threads = None
    _corename = None
    for nm in ("scipy_openblas_get_corename64_", "openblas_get_corename64_", "openblas_get_corename"):
        if hasattr(_lib, nm):
            _corename = getattr(_lib, nm)
            _corename.restype = ctypes.c_char_p
            break


def _view(a: np.ndarray) -> tuple[int, int]:
    """(address, leading dimension) of a column-major 2-D float64 view."""
    if a.dtype != np.float64 or a.ndim != 2:
        raise TypeError("expected a 2-D float64 array")
    m, n = a.shape
    if m > 1 and a.strides[0] != 8:
        raise ValueError("matrix view must have unit row stride (column-major)")
    ld = a.strides[1] // 8 if n > 1 else m
    return a.ctypes.data, max(ld, m, 1)


def set_threads(n: int) -> None:
    """Number of BLAS threads in this process (no-op on the numpy fallback)."""
    if BACKEND != "numpy" and _set_threads is not None:
        _set_threads(int(n))
    else:
        os.environ["OPENBLAS_NUM_THREADS"] = str(n)


def core_name() -> str:
    """The OpenBLAS kernel family in use (e.g. 'SkylakeX'), or the backend name."""
    if BACKEND != "numpy" and _corename is not None:
        return _corename().decode()
    return BACKEND


def gemm_update(c: np.ndarray, a: np.ndarray, b: np.ndarray, alpha: float = -1.0) -> None:
    """c += alpha * a @ b, in place (a: m x k, b: k x n, c: m x n)."""
    m, n = c.shape
    k = a.shape[1]
    if a.shape[0] != m or b.shape != (k, n):
        raise ValueError(f"gemm shapes {a.shape} {b.shape} {c.shape}")
    if m == 0 or n == 0 or k == 0:
        return
    if BACKEND == "numpy":
        c += alpha * (a @ b)
        return
    pa, lda = _view(a)
    pb, ldb = _view(b)
    pc, ldc = _view(c)
    _gemm(_COL_MAJOR, _NO_TRANS, _NO_TRANS, m, n, k, alpha, pa, lda, pb, ldb, 1.0, pc, ldc)


def gemv_update(y: np.ndarray, a: np.ndarray, x: np.ndarray, alpha: float = -1.0) -> None:
    """y += alpha * a @ x for contiguous 1-D y, x."""
    m, n = a.shape
    if m == 0 or n == 0:
        return
    if BACKEND == "numpy" or not (y.flags.c_contiguous and x.flags.c_contiguous):
        y += alpha * (a @ x)
        return
    pa, lda = _view(a)
    _gemv(_COL_MAJOR, _NO_TRANS, m, n, alpha, pa, lda, x.ctypes.data, 1, 1.0, y.ctypes.data, 1)


def trsm_left(a: np.ndarray, b: np.ndarray, lower: bool, unit: bool) -> None:
    """b := inv(a) @ b in place, a triangular (lower/upper, unit/non-unit diagonal)."""
    m, n = b.shape
    if a.shape != (m, m):
        raise ValueError(f"trsm shapes {a.shape} {b.shape}")
    if m == 0 or n == 0:
        return
    if BACKEND == "numpy":
        t = np.tril(a, -1) if lower else np.triu(a, 1)
        t = t + (np.eye(m) if unit else np.diag(np.diag(a)))
        b[:] = np.linalg.solve(t, b)
        return
    pa, lda = _view(a)
    pb, ldb = _view(b)
    _trsm(_COL_MAJOR, _LEFT, _LOWER if lower else _UPPER, _NO_TRANS, _UNIT if unit else _NON_UNIT,
          m, n, 1.0, pa, lda, pb, ldb)


def getrf(a: np.ndarray) -> np.ndarray:
    """LU with partial pivoting of a local column-major block, in place (LAPACK dgetrf).

    Returns the 0-based pivot rows (row i was swapped with row piv[i]).
    Raises ZeroDivisionError on an exactly singular column.
    """
    m, n = a.shape
    k = min(m, n)
    if BACKEND == "numpy":
        piv = np.empty(k, dtype=np.int64)
        for j in range(k):
            p = j + int(np.argmax(np.abs(a[j:, j])))
            piv[j] = p
            if a[p, j] == 0.0:
                raise ZeroDivisionError(f"singular pivot in column {j}")
            if p != j:
                a[[j, p], :] = a[[p, j], :]
            a[j + 1:, j] /= a[j, j]
            a[j + 1:, j + 1:] -= np.outer(a[j + 1:, j], a[j, j + 1:])
        return piv
    pa, lda = _view(a)
    ipiv = np.empty(max(k, 1), dtype=_ITYPE)
    mm, nn, ll, info = (np.array([v], dtype=_ITYPE) for v in (m, n, lda, 0))
    _getrf(mm.ctypes.data, nn.ctypes.data, pa, ll.ctypes.data, ipiv.ctypes.data, info.ctypes.data)
    if info[0] > 0:
        raise ZeroDivisionError(f"singular pivot in column {int(info[0]) - 1}")
    return ipiv[:k].astype(np.int64) - 1


def laswp(a: np.ndarray, piv: np.ndarray) -> None:
    """Apply row interchanges i <-> piv[i] (0-based, in order) to the rows of a, in place."""
    m, n = a.shape
    k = len(piv)
    if n == 0 or k == 0:
        return
    if BACKEND == "numpy":
        for i, p in enumerate(piv):
            if p != i:
                a[[i, p], :] = a[[p, i], :]
        return
    pa, lda = _view(a)
    ip = (np.asarray(piv) + 1).astype(_ITYPE)
    nn, ll, k1, k2, inc = (np.array([v], dtype=_ITYPE) for v in (n, lda, 1, k, 1))
    _laswp(nn.ctypes.data, pa, ll.ctypes.data, k1.ctypes.data, k2.ctypes.data, ip.ctypes.data, inc.ctypes.data)
