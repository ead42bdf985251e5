"""The sync: summing the ranks' row-parallel partial results, in place, on every rank.

The forward pass (mpillm.runtime.model) calls ``sync(x)`` after each row-parallel projection
(twice per layer, and once for the vocabulary-parallel embedding). How the sum travels depends on
``--buffer-type``:

  f32, f64   MPI_Allreduce on the buffer itself (the MPI library picks the algorithm)
  f16        each rank's partial as fp16, Allgather, every rank sums the parts in rank order
  q8_0       each rank's partial quantized to q8_0 (int8 codes + one f32 scale per 32), the codes
             and the scales Allgathered, every rank sums the dequantized parts in rank order

The compressed exchanges sum in the same order on every rank, so the ranks never diverge (as
distributed-llama's q80 sync does). Every buffer is allocated once, here; ``stats`` counts the
time, bytes and calls.
"""
from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

from mpillm import kernels
from mpillm.formats.quant import QK
from mpillm.runtime import ops
from mpillm.runtime.stats import CommStats

BUFFER_TYPES = ("f32", "f16", "q8_0", "f64")


class Sync:
    """Sums (T, dim) partials over ``comm`` for up to ``max_rows`` rows."""

    def __init__(self, comm: MPI.Comm, buffer_type: str, max_rows: int, dim: int):
        if buffer_type not in BUFFER_TYPES:
            raise ValueError(f"--buffer-type must be one of {', '.join(BUFFER_TYPES)}, got {buffer_type!r}")
        self.comm, self.size, self.buffer_type = comm, comm.Get_size(), buffer_type
        self.stats = CommStats()
        B, D, P = max_rows, dim, self.size
        if buffer_type == "f16" and P > 1:
            self.send16 = np.zeros(B * D, np.float16)           # (T * dim) own partial
            self.recv16 = np.zeros(P * B * D, np.float16)       # (ranks, T * dim)
        if buffer_type == "q8_0" and P > 1:
            self.quantize_q8_0 = kernels.get_path(kernels.active_path()).jit.quantize_q8_0
            self.own = np.zeros((B, D), np.float32)             # (T, dim) own partial, to quantize
            self.own_q = np.zeros((B, D), np.int8)              # (T, dim) its codes
            self.own_d = np.zeros((B, D // QK), np.float32)     # (T, dim / 32) its scales
            self.own_sum = np.zeros((B, D // QK), np.int32)     # (T, dim / 32) code sums (unused here)
            self.recvq = np.zeros(P * B * D, np.int8)           # (ranks, T * dim)
            self.recvd = np.zeros(P * B * (D // QK), np.float32)  # (ranks, T * dim / 32)

    def __call__(self, buf: np.ndarray) -> None:
        """Sum a row-parallel partial result (T, dim) over all ranks, in place."""
        if self.size == 1:
            return
        t0 = time.perf_counter()
        T, P, n = buf.shape[0], self.size, buf.size
        if self.buffer_type in ("f32", "f64") or buf.dtype == np.float64:
            self.comm.Allreduce(MPI.IN_PLACE, buf)
            sent = buf.nbytes
        elif self.buffer_type == "f16":
            own = self.send16[:n]
            np.copyto(own, buf.reshape(-1), casting="same_kind")
            self.comm.Allgather(own, self.recv16[:P * n])
            ops.sum_f16_parts(self.recv16[:P * n].view(np.uint16).reshape(P, T, -1), buf)
            sent = own.nbytes
        else:  # q8_0
            self.own[:T] = buf
            self.quantize_q8_0(self.own[:T], self.own_q[:T], self.own_d[:T], self.own_sum[:T])
            nb = n // QK
            self.comm.Allgather(self.own_q[:T], self.recvq[:P * n])
            self.comm.Allgather(self.own_d[:T], self.recvd[:P * nb])
            ops.sum_q8_parts(self.recvq[:P * n].reshape(P, T, -1), self.recvd[:P * nb].reshape(P, T, -1), buf)
            sent = self.own_q[:T].nbytes + self.own_d[:T].nbytes
        self.stats.seconds += time.perf_counter() - t0
        self.stats.payload_bytes += sent
        self.stats.calls += 1


__all__ = ["BUFFER_TYPES", "Sync"]
