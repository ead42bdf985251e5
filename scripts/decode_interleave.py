#!/usr/bin/env python
"""Decode (T = 1) kernels from memory, q4_0 and other weight types called alternately, call by call.

    python scripts/decode_interleave.py --types q2_K,q3_K --shape "1b-gate 8192x2048" [--calls 300]

``mpillm.kernels.bench`` times each type over a few hundred milliseconds, one type after the other;
on a machine whose memory bus other tenants share, q4_0's bandwidth then moves by 30-50% between
the two timings and the ratio with it. Here each call of a type is followed by one of the next, so
both see the same moments of the bus: each type's matrix has copies that together exceed the
last-level cache three times (every call reads its weights from memory), every call is timed on its
own, and the figures are the median (and 25th percentile) of the per-call GB/s, with the ratio to
q4_0's of the same run. Run it from the checkout whose kernels it should measure.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.getcwd())

import numba  # noqa: E402
import numpy as np  # noqa: E402

from mpillm import kernels  # noqa: E402
from mpillm.formats import quant  # noqa: E402
from mpillm.kernels.bench import LLC_BYTES, SHAPES, _weights  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", required=True, help="comma-separated weight types (q4_0 is always run)")
    ap.add_argument("--shape", default="1b-gate 8192x2048", help=f"one of: {', '.join(SHAPES)}")
    ap.add_argument("--calls", type=int, default=300, help="calls of each type")
    ap.add_argument("--path", default="vnni", help="kernel path")
    a = ap.parse_args(argv)
    N, K, _ = SHAPES[a.shape]
    numba.set_num_threads(1)
    p = kernels.get_path(a.path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, K)).astype(np.float32)
    xq, xd = np.empty((1, K), np.int8), np.empty((1, K // 32), np.float32)
    xs, out = np.empty((1, K // 32), np.int32), np.empty((1, N), np.float32)
    p.quantize_q8_0(x, xq, xd, xs)
    types = ["q4_0"] + [t for t in a.types.split(",") if t != "q4_0"]
    ws = {}
    for t in types:
        ws[t] = _weights(t, N, K, max(2, -(-3 * LLC_BYTES // quant.nbytes(t, N, K))), rng)
        p.matmul(t, ws[t][0], xq, xd, xs, x, out)   # compiled before timing
    sec = {t: [] for t in types}
    for i in range(a.calls):
        for t in types:
            w = ws[t][i % len(ws[t])]
            t0 = time.perf_counter()
            p.matmul(t, w, xq, xd, xs, x, out)
            sec[t].append(time.perf_counter() - t0)
    med = {t: quant.nbytes(t, N, K) / np.median(v) / 1e9 for t, v in sec.items()}
    p25 = {t: quant.nbytes(t, N, K) / np.percentile(v, 25) / 1e9 for t, v in sec.items()}
    print(f"{a.shape} ({a.path}, GB/s median/p25, ratio to q4_0): " + " ".join(
        f"{t} {med[t]:.1f}/{p25[t]:.1f} ({med[t] / med['q4_0']:.2f}/{p25[t] / p25['q4_0']:.2f})" for t in types))


if __name__ == "__main__":
    main()
