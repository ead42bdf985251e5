"""The P x Q process grid and the 2-D block-cyclic distribution (as in ScaLAPACK/HPL).

Global block (I, J) of size NB x NB lives on process row I mod P, process column
J mod Q.  Each process stores its blocks packed into one column-major (Fortran)
local array, in increasing global order, so any run of global rows or columns
that it owns is a contiguous local slice.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI


def numroc(n: int, nb: int, iproc: int, nprocs: int) -> int:
    """Number of the n global rows (or columns) that process iproc of nprocs owns."""
    nblocks, extra = divmod(n, nb)
    count = (nblocks // nprocs) * nb
    rem = nblocks % nprocs
    if iproc < rem:
        count += nb
    elif iproc == rem:
        count += extra
    return count


def owner(g: int, nb: int, nprocs: int) -> int:
    """Process (row or column) that owns global index g."""
    return (g // nb) % nprocs


def g2l(g: int, nb: int, nprocs: int) -> int:
    """Local index of global index g on its owner."""
    return (g // (nb * nprocs)) * nb + g % nb


def l2g(l: int, nb: int, iproc: int, nprocs: int) -> int:
    """Global index of local index l on process iproc."""
    return ((l // nb) * nprocs + iproc) * nb + l % nb


def local_indices(n: int, nb: int, iproc: int, nprocs: int) -> np.ndarray:
    """Global indices (increasing) of the local rows/columns of process iproc."""
    loc = np.arange(numroc(n, nb, iproc, nprocs), dtype=np.int64)
    return ((loc // nb) * nprocs + iproc) * nb + loc % nb


def first_local_at_or_after(g: int, nb: int, iproc: int, nprocs: int) -> int:
    """Local index of the first local row/column whose global index is >= g."""
    blk, off = divmod(g, nb)
    full = blk // nprocs           # whole cycles before block blk
    rem = blk % nprocs
    if iproc < rem:
        return (full + 1) * nb
    if iproc == rem:
        return full * nb + off
    return full * nb


def closest_square(size: int) -> tuple[int, int]:
    """P x Q = size with P <= Q and P as large as possible (HPL's usual advice)."""
    p = int(size ** 0.5)
    while size % p:
        p -= 1
    return p, size // p


@dataclass
class Grid:
    """A P x Q grid over ``comm`` (row-major rank order unless column_major)."""

    comm: MPI.Comm
    nprow: int
    npcol: int
    column_major: bool = False
    myrow: int = field(init=False)
    mycol: int = field(init=False)
    row_comm: MPI.Comm = field(init=False)   # my process row: ranks along it are columns 0..Q-1
    col_comm: MPI.Comm = field(init=False)   # my process column: ranks along it are rows 0..P-1

    def __post_init__(self) -> None:
        rank, size = self.comm.Get_rank(), self.comm.Get_size()
        if self.nprow * self.npcol != size:
            raise ValueError(f"P x Q = {self.nprow} x {self.npcol} = {self.nprow * self.npcol} "
                             f"does not match the {size} MPI ranks")
        if self.column_major:
            self.myrow, self.mycol = rank % self.nprow, rank // self.nprow
        else:
            self.myrow, self.mycol = divmod(rank, self.npcol)
        self.row_comm = self.comm.Split(self.myrow, self.mycol)
        self.col_comm = self.comm.Split(self.mycol, self.myrow)

    def free(self) -> None:
        self.row_comm.Free()
        self.col_comm.Free()

    def local_shape(self, m: int, n: int, nb: int) -> tuple[int, int]:
        return numroc(m, nb, self.myrow, self.nprow), numroc(n, nb, self.mycol, self.npcol)

    def rank_of(self, prow: int, pcol: int) -> int:
        return pcol * self.nprow + prow if self.column_major else prow * self.npcol + pcol


# ---------------------------------------------------------------- the test matrix

def _block(seed: int, bi: int, bj: int, rows: int, cols: int) -> np.ndarray:
    """Global block (bi, bj) of the random matrix, uniform in [-0.5, 0.5).

    Depends only on (seed, bi, bj) and the block's shape, never on the grid, so
    every grid generates the same matrix and it can be regenerated for the check.
    """
    rng = np.random.default_rng((seed, bi, bj))
    return rng.random((cols, rows)).T - 0.5   # Fortran-ordered block


def generate_local(grid: Grid, m: int, n: int, nb: int, seed: int,
                   out: np.ndarray | None = None) -> np.ndarray:
    """This process's part of the m x n random matrix (column-major local array)."""
    mp, nq = grid.local_shape(m, n, nb)
    a = np.empty((mp, nq), dtype=np.float64, order="F") if out is None else out
    for lj in range(0, nq, nb):
        bj = (lj // nb) * grid.npcol + grid.mycol
        cols = min(nb, n - bj * nb)
        for li in range(0, mp, nb):
            bi = (li // nb) * grid.nprow + grid.myrow
            rows = min(nb, m - bi * nb)
            a[li:li + rows, lj:lj + cols] = _block(seed, bi, bj, rows, cols)
    return a


def global_matrix(m: int, n: int, nb: int, seed: int) -> np.ndarray:
    """The whole m x n random matrix on one process (for tests and small checks)."""
    a = np.empty((m, n), order="F")
    for i in range(0, m, nb):
        for j in range(0, n, nb):
            rows, cols = min(nb, m - i), min(nb, n - j)
            a[i:i + rows, j:j + cols] = _block(seed, i // nb, j // nb, rows, cols)
    return a


# ---------------------------------------------------------------- scatter / gather

def scatter(grid: Grid, a: np.ndarray | None, m: int, n: int, nb: int, root: int = 0) -> np.ndarray:
    """Distribute the global m x n matrix ``a`` (significant on root only) block-cyclically."""
    comm = grid.comm
    if comm.Get_rank() == root:
        parts = []
        for r in range(comm.Get_size()):
            prow, pcol = (r % grid.nprow, r // grid.nprow) if grid.column_major else divmod(r, grid.npcol)
            rows = local_indices(m, nb, prow, grid.nprow)
            cols = local_indices(n, nb, pcol, grid.npcol)
            parts.append(np.asfortranarray(a[np.ix_(rows, cols)]))
    else:
        parts = None
    return np.asfortranarray(comm.scatter(parts, root=root))


def gather(grid: Grid, local: np.ndarray, m: int, n: int, nb: int, root: int = 0) -> np.ndarray | None:
    """Collect a block-cyclic matrix back into one m x n array on root (None elsewhere)."""
    comm = grid.comm
    pieces = comm.gather((grid.myrow, grid.mycol, np.ascontiguousarray(local)), root=root)
    if comm.Get_rank() != root:
        return None
    a = np.empty((m, n), order="F")
    for prow, pcol, part in pieces:
        rows = local_indices(m, nb, prow, grid.nprow)
        cols = local_indices(n, nb, pcol, grid.npcol)
        a[np.ix_(rows, cols)] = part
    return a
