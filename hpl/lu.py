"""Right-looking blocked LU with partial pivoting on a P x Q block-cyclic grid, and the solve.

The matrix is augmented with the right-hand side as column N (as HPL does), so
the factorization also applies L^-1 P to b and only U x = y remains to solve.

One step k (panel = global columns k*NB .. k*NB+jb-1):

1. panel factorization on process column k mod Q
   - P == 1: the whole panel is local: LAPACK dgetrf on it, in place;
   - P > 1: recursive (right-looking) factorization; for every column the
     pivot candidates and the two rows to exchange travel in one Allgather over
     the process column (HPL's combined pivot search + swap), and the U blocks
     of the recursion are broadcast down the column;
2. panel broadcast along each process row (ring of Isend/Irecv: the message is
   [pivots | L11 | local rows of the panel]);
3. row swaps on the trailing columns (P == 1: dlaswp; P > 1: the rows the swaps
   touch are exchanged with one Allgatherv over the process column);
4. U12 = L11^-1 A12 (dtrsm) and the trailing update A22 -= L21 U12 (dgemm).

Look-ahead of depth 1: the process column that owns panel k+1 first updates
only those columns with panel k, factors panel k+1 and starts sending it, and
only then updates the rest of its trailing matrix, so the next panel is on its
way while the big dgemm runs.  Long updates are cut into column chunks with an
MPI test between them so that the messages in flight progress.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from . import blas
from .grid import Grid, first_local_at_or_after, g2l, local_indices, owner

# phase timers: wall clock, or process CPU time with HPL_CPU_TIMERS=1 (to profile on a busy machine)
_clock = time.process_time if os.environ.get("HPL_CPU_TIMERS") == "1" else time.perf_counter

LEAF = 16          # column width at which the distributed panel recursion stops
CHUNK = 1536       # columns per dgemm call while messages are in flight


class SingularMatrix(ArithmeticError):
    pass


@dataclass
class Timers:
    panel: float = 0.0     # panel factorization
    wait: float = 0.0      # waiting for panels
    swap: float = 0.0      # row interchanges
    update: float = 0.0    # dtrsm + dgemm
    solve: float = 0.0     # back substitution

    def as_dict(self) -> dict:
        return {k: round(v, 4) for k, v in self.__dict__.items()}


@dataclass
class _Panel:
    """A factored panel as every process of one process row sees it."""

    k: int
    j0: int                # first global column (= first global row of the diagonal block)
    jb: int                # width
    r0: int                # first local row of the panel on this process row
    buf: np.ndarray        # message: [ipiv (jb) | L11 (jb*jb) | L (m_loc*jb)]
    ipiv: np.ndarray = field(init=False)      # global pivot rows (int64)
    l11: np.ndarray = field(init=False)       # (jb, jb) unit lower triangle (+U11)
    lpanel: np.ndarray = field(init=False)    # (m_loc, jb) local rows of the panel
    plan: tuple | None = None                 # distributed swap plan (P > 1)

    def views(self, m_loc: int) -> None:
        jb = self.jb
        self.l11 = self.buf[jb:jb + jb * jb].reshape((jb, jb), order="F")
        self.lpanel = self.buf[jb + jb * jb:jb + jb * jb + m_loc * jb].reshape((m_loc, jb), order="F")

    def read_ipiv(self) -> None:
        self.ipiv = self.buf[:self.jb].astype(np.int64)


class LU:
    """Distributed LU solve of A x = b, where ``a`` is the local part of [A | b] (N x N+1)."""

    def __init__(self, grid: Grid, a: np.ndarray, n: int, nb: int, progress=None) -> None:
        self.g = grid
        self.a = a
        self.n = n
        self.nb = nb
        self.P, self.Q = grid.nprow, grid.npcol
        self.mp, self.nq = a.shape
        self.rows_g = local_indices(n, nb, grid.myrow, self.P)
        self.cols_g = local_indices(n + 1, nb, grid.mycol, self.Q)
        self.nblocks = (n + nb - 1) // nb
        self.t = Timers()
        self.progress = progress
        size = nb + nb * nb + max(self.mp, 1) * nb
        self._bufs = [np.empty(size), np.empty(size)]
        self._sends: list[list[MPI.Request]] = [[], []]
        self._recv: dict[int, MPI.Request] = {}
        self._inflight: list[MPI.Request] = []

    # ------------------------------------------------------------ helpers
    def _panel_geom(self, k: int) -> tuple[int, int, int]:
        j0 = k * self.nb
        jb = min(self.nb, self.n - j0)
        r0 = first_local_at_or_after(j0, self.nb, self.g.myrow, self.P)
        return j0, jb, r0

    def _new_panel(self, k: int) -> _Panel:
        j0, jb, r0 = self._panel_geom(k)
        slot = k % 2
        if self._sends[slot]:                  # the buffer may still be going out
            MPI.Request.Waitall(self._sends[slot])
            self._sends[slot] = []
        p = _Panel(k, j0, jb, r0, self._bufs[slot])
        p.views(self.mp - r0)
        return p

    def _progress(self) -> None:
        if self._inflight:
            MPI.Request.Testall(self._inflight)
            self._inflight = [r for r in self._inflight if r]

    # ------------------------------------------------------------ panel factorization
    def _factor_panel(self, k: int) -> _Panel:
        """Factor panel k (called by its process column); returns it ready to send."""
        t0 = _clock()
        p = self._new_panel(k)
        j0, jb, r0 = p.j0, p.jb, p.r0
        c0 = g2l(j0, self.nb, self.Q)
        w = self.a[r0:, c0:c0 + jb]
        diag = self.g.myrow == k % self.P
        if self.P == 1:
            try:
                piv = blas.getrf(w)
            except ZeroDivisionError as e:
                raise SingularMatrix(f"matrix is singular at column {j0}: {e}") from None
            p.ipiv = piv + j0
        else:
            p.ipiv = self._factor_panel_dist(w, j0, jb, diag, k % self.P)
        # fill the message
        p.buf[:jb] = p.ipiv
        if self.P == 1:
            p.l11[:] = w[:jb, :]
        else:
            if diag:
                p.l11[:] = w[:jb, :]
            self.g.col_comm.Bcast(p.l11, root=k % self.P)
        if self.Q > 1:
            p.lpanel[:] = w
        else:
            p.lpanel = w
        self.t.panel += _clock() - t0
        return p

    def _factor_panel_dist(self, w: np.ndarray, j0: int, jb: int, diag: bool, prow: int) -> np.ndarray:
        """Recursive panel factorization with the rows spread over the process column."""
        comm = self.g.col_comm
        nprow, nb = self.P, self.nb
        myrow = self.g.myrow
        r0 = first_local_at_or_after(j0, nb, myrow, nprow)
        gidx = self.rows_g[r0:]
        ipiv = np.empty(jb, dtype=np.int64)
        sendbuf = np.zeros(2 + 2 * jb)
        recvbuf = np.empty((nprow, 2 + 2 * jb))
        ubuf = np.empty(jb * jb)

        def leaf(a: int, b: int) -> None:
            for j in range(a, b):
                s = j if diag else 0
                col = w[s:, j]
                sendbuf[:] = 0.0
                sendbuf[1] = -1.0
                if col.size:
                    i = int(np.argmax(np.abs(col)))
                    sendbuf[0] = abs(col[i])
                    sendbuf[1] = gidx[s + i]
                    sendbuf[2:2 + jb] = w[s + i, :]
                if diag:
                    sendbuf[2 + jb:] = w[j, :]
                comm.Allgather(sendbuf, recvbuf)
                # the largest |value| wins; ties go to the smallest global row
                best = -1
                for r in range(nprow):
                    if recvbuf[r, 1] < 0:
                        continue
                    if best < 0 or recvbuf[r, 0] > recvbuf[best, 0] or (
                            recvbuf[r, 0] == recvbuf[best, 0] and recvbuf[r, 1] < recvbuf[best, 1]):
                        best = r
                if recvbuf[best, 0] == 0.0:
                    raise SingularMatrix(f"matrix is singular at column {j0 + j}")
                gp = int(recvbuf[best, 1])
                ipiv[j] = gp
                prow_ = recvbuf[best, 2:2 + jb]
                if gp != j0 + j:
                    if diag:
                        w[j, :] = prow_
                    if owner(gp, nb, nprow) == myrow:
                        w[g2l(gp, nb, nprow) - r0, :] = recvbuf[prow, 2 + jb:]
                s2 = j + 1 if diag else 0
                w[s2:, j] *= 1.0 / prow_[j]
                if j + 1 < b and w.shape[0] > s2:
                    blas.gemm_update(w[s2:, j + 1:b], w[s2:, j:j + 1], prow_[None, j + 1:b])

        def rec(a: int, b: int) -> None:
            if b - a <= LEAF:
                leaf(a, b)
                return
            mid = a + (b - a) // 2
            rec(a, mid)
            u = ubuf[:(mid - a) * (b - mid)].reshape((mid - a, b - mid), order="F")
            if diag:
                blas.trsm_left(w[a:mid, a:mid], w[a:mid, mid:b], lower=True, unit=True)
                u[:] = w[a:mid, mid:b]
            comm.Bcast(u, root=prow)
            s = mid if diag else 0
            blas.gemm_update(w[s:, mid:b], w[s:, a:mid], u)
            rec(mid, b)

        rec(0, jb)
        return ipiv

    # ------------------------------------------------------------ panel broadcast (ring along the row)
    def _post_recv(self, k: int) -> None:
        if self.Q == 1 or self.g.mycol == k % self.Q or k >= self.nblocks or k in self._recv:
            return
        j0, jb, r0 = self._panel_geom(k)
        slot = k % 2
        if self._sends[slot]:
            MPI.Request.Waitall(self._sends[slot])
            self._sends[slot] = []
        size = jb + jb * jb + (self.mp - r0) * jb
        prev = (self.g.mycol - 1) % self.Q
        req = self.g.row_comm.Irecv([self._bufs[slot][:size], MPI.DOUBLE], source=prev, tag=k % 1024)
        self._recv[k] = req
        self._inflight.append(req)

    def _send_panel(self, p: _Panel) -> None:
        if self.Q == 1:
            return
        nxt = (self.g.mycol + 1) % self.Q
        if nxt == p.k % self.Q:
            return
        size = p.jb + p.jb * p.jb + (self.mp - p.r0) * p.jb
        req = self.g.row_comm.Isend([p.buf[:size], MPI.DOUBLE], dest=nxt, tag=p.k % 1024)
        self._sends[p.k % 2].append(req)
        self._inflight.append(req)

    def _receive_panel(self, k: int) -> _Panel:
        t0 = _clock()
        self._post_recv(k)
        req = self._recv.pop(k)
        req.Wait()
        self._inflight = [r for r in self._inflight if r != MPI.REQUEST_NULL]
        j0, jb, r0 = self._panel_geom(k)
        p = _Panel(k, j0, jb, r0, self._bufs[k % 2])
        p.views(self.mp - r0)
        p.read_ipiv()
        self._send_panel(p)           # forward along the ring
        self.t.wait += _clock() - t0
        return p

    # ------------------------------------------------------------ swaps + update
    def _swap_plan(self, p: _Panel) -> tuple:
        """Which global rows move where (P > 1): (rows touched, source row of each, my part)."""
        perm: dict[int, int] = {}
        for i in range(p.jb):
            a, b = p.j0 + i, int(p.ipiv[i])
            perm.setdefault(a, a)
            perm.setdefault(b, b)
            perm[a], perm[b] = perm[b], perm[a]
        rows = np.array(sorted(perm), dtype=np.int64)            # every touched row + the diagonal block
        src = np.array([perm[r] for r in rows], dtype=np.int64)
        own = (rows // self.nb) % self.P
        # receive order: by owner, then by row -> position of each row in the gathered buffer
        order = np.lexsort((rows, own))
        pos = np.empty(len(rows), dtype=np.int64)
        pos[order] = np.arange(len(rows))
        where = dict(zip(rows.tolist(), pos.tolist()))
        src_pos = np.array([where[s] for s in src.tolist()], dtype=np.int64)
        counts = np.bincount(own, minlength=self.P)
        mine = rows[own == self.g.myrow]
        mine_loc = (mine // (self.nb * self.P)) * self.nb + mine % self.nb
        mine_src_pos = src_pos[own == self.g.myrow]
        diag_src_pos = src_pos[(rows >= p.j0) & (rows < p.j0 + p.jb)]
        return counts, mine_loc, mine_src_pos, diag_src_pos, len(rows)

    def _update(self, p: _Panel, ca: int, cb: int) -> None:
        """Apply panel p to local columns [ca, cb): swaps, U12 = L11^-1 A12, A22 -= L21 U12."""
        if cb <= ca:
            return
        a, jb, r0 = self.a, p.jb, p.r0
        diag = self.g.myrow == p.k % self.P
        t0 = _clock()
        if self.P == 1:
            blas.laswp(a[r0:, ca:cb], p.ipiv - p.j0)
            t1 = _clock()
            u = a[r0:r0 + jb, ca:cb]
            blas.trsm_left(p.l11, u, lower=True, unit=True)
            lrows, rs = p.lpanel[jb:], r0 + jb
        else:
            if p.plan is None:
                p.plan = self._swap_plan(p)
            counts, mine_loc, mine_src_pos, diag_src_pos, ntot = p.plan
            wdt = cb - ca
            send = np.ascontiguousarray(a[mine_loc, ca:cb])                # (rows I own, wdt)
            recv = np.empty((ntot, wdt))
            self.g.col_comm.Allgatherv(send, [recv, counts * wdt])
            a[mine_loc, ca:cb] = recv[mine_src_pos]
            u = np.asfortranarray(recv[diag_src_pos])                       # (jb, wdt) rows of A12
            t1 = _clock()
            blas.trsm_left(p.l11, u, lower=True, unit=True)
            if diag:
                a[r0:r0 + jb, ca:cb] = u
                lrows, rs = p.lpanel[jb:], r0 + jb
            else:
                lrows, rs = p.lpanel, r0
        self.t.swap += t1 - t0
        # trailing update, in chunks while messages are in flight
        step = CHUNK if self._inflight else cb - ca
        for c in range(ca, cb, step):
            e = min(cb, c + step)
            blas.gemm_update(a[rs:, c:e], lrows, u[:, c - ca:e - ca])
            self._progress()
        self.t.update += _clock() - t1

    # ------------------------------------------------------------ the factorization
    def factor(self) -> None:
        g, nb, Q = self.g, self.nb, self.Q
        mycol = g.mycol
        current: _Panel | None = None
        if mycol == 0:
            current = self._factor_panel(0)
            self._send_panel(current)
        last_report = _clock()
        for k in range(self.nblocks):
            self._post_recv(k + 1)
            if mycol != k % Q:
                current = self._receive_panel(k)
            p = current
            ta = first_local_at_or_after(p.j0 + p.jb, nb, mycol, Q)   # my first trailing column
            nxt = k + 1
            if nxt < self.nblocks and mycol == nxt % Q:
                jbn = min(nb, self.n - nxt * nb)
                self._update(p, ta, ta + jbn)             # look-ahead: the next panel's columns first
                current = self._factor_panel(nxt)
                self._send_panel(current)
                self._update(p, ta + jbn, self.nq)
            else:
                self._update(p, ta, self.nq)
            if self.progress is not None and _clock() - last_report > 2.0:
                last_report = _clock()
                self.progress(p.j0 + p.jb, self.n)
        for reqs in self._sends:
            MPI.Request.Waitall(reqs)
        self._sends = [[], []]
        self._inflight = []

    # ------------------------------------------------------------ back substitution
    def solve(self) -> np.ndarray:
        """Solve U x = y (y = the transformed column N); returns x on every process."""
        t0 = _clock()
        g, n, nb, P, Q = self.g, self.n, self.nb, self.P, self.Q
        x = np.zeros(n)
        bcol = owner(n, nb, Q)
        bloc = g2l(n, nb, Q) if g.mycol == bcol else -1
        cend = first_local_at_or_after(n, nb, g.mycol, Q)
        xk = np.empty(nb)
        for k in range(self.nblocks - 1, -1, -1):
            j0 = k * nb
            jb = min(nb, n - j0)
            prow, pcol = k % P, k % Q
            v = xk[:jb]
            if g.myrow == prow:
                r0 = g2l(j0, nb, P)
                ca = first_local_at_or_after(j0 + jb, nb, g.mycol, Q)
                s = self.a[r0:r0 + jb, bloc].copy() if bloc >= 0 else np.zeros(jb)
                if cend > ca:
                    blas.gemv_update(s, self.a[r0:r0 + jb, ca:cend], np.ascontiguousarray(x[self.cols_g[ca:cend]]))
                if Q > 1:
                    if g.mycol == pcol:
                        g.row_comm.Reduce(MPI.IN_PLACE, s, op=MPI.SUM, root=pcol)
                    else:
                        g.row_comm.Reduce(s, None, op=MPI.SUM, root=pcol)
                if g.mycol == pcol:
                    c0 = g2l(j0, nb, Q)
                    s2 = s.reshape(jb, 1).copy(order="F")
                    blas.trsm_left(self.a[r0:r0 + jb, c0:c0 + jb], s2, lower=False, unit=False)
                    v[:] = s2[:, 0]
            g.comm.Bcast(v, root=g.rank_of(prow, pcol))
            x[j0:j0 + jb] = v
        self.t.solve += _clock() - t0
        return x


# ---------------------------------------------------------------- the residual check

def scaled_residual(grid: Grid, a0: np.ndarray, x: np.ndarray, n: int, nb: int) -> dict:
    """||Ax-b||_oo / (eps (||A||_oo ||x||_oo + ||b||_oo) N) with a0 the original local [A | b]."""
    cols_g = local_indices(n + 1, nb, grid.mycol, grid.npcol)
    cend = first_local_at_or_after(n, nb, grid.mycol, grid.npcol)
    mp = a0.shape[0]
    ax = np.zeros(mp)
    rowsum = np.zeros(mp)
    if cend > 0:
        blas.gemv_update(ax, a0[:, :cend], np.ascontiguousarray(x[cols_g[:cend]]), alpha=1.0)
        rowsum = np.abs(a0[:, :cend]).sum(axis=1)
    bmax = 0.0
    if cend < a0.shape[1]:              # I hold column N (b)
        ax -= a0[:, cend]
        bmax = float(np.abs(a0[:, cend]).max()) if mp else 0.0
    grid.row_comm.Allreduce(MPI.IN_PLACE, ax, op=MPI.SUM)
    grid.row_comm.Allreduce(MPI.IN_PLACE, rowsum, op=MPI.SUM)
    loc = np.array([np.abs(ax).max() if mp else 0.0, rowsum.max() if mp else 0.0, bmax])
    grid.comm.Allreduce(MPI.IN_PLACE, loc, op=MPI.MAX)
    rnorm, anorm, bnorm = (float(v) for v in loc)
    xnorm = float(np.abs(x).max())
    eps = np.finfo(np.float64).eps / 2           # LAPACK dlamch('e'), as HPL uses
    resid = rnorm / (eps * (anorm * xnorm + bnorm) * n)
    return {"resid": resid, "norm_r": rnorm, "norm_a": anorm, "norm_x": xnorm, "norm_b": bnorm, "eps": eps}
