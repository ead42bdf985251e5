"""Kernel micro-benchmark: ``python -m mpillm.kernels.bench``.

Matvec (T = 1): GB/s of weight bytes streamed. "dram" shapes rotate over
copies of the matrix totalling more than twice the last-level cache, so the
weights come from memory; "cache" shapes reuse one copy (cache-resident, like
SmolLM2's layers). Prefill (T = 64): GFLOP/s (2 N K T per call).
The path ``vnni-r16`` is the VNNI path on the layout the runtime runs there: q4_0, q4_1,
q8_0, q4_K, q6_K, q2_K and q3_K repacked with 16 rows per register (mpillm.kernels.interleaved),
the other types as stored.
Timings are the best of several repetitions; on a shared machine compare
ratios within one run.
"""
from __future__ import annotations

import argparse
import json
import time

import numba
import numpy as np

from mpillm import kernels
from mpillm.formats import quant
from mpillm.kernels import interleaved

SHAPES = {  # name: (rows N, cols K, placement)
    "1b-gate 8192x2048": (8192, 2048, "dram"),
    "1b-down 2048x8192": (2048, 8192, "dram"),
    "smol-up 1536x576": (1536, 576, "cache"),
    "smol-down 576x1536": (576, 1536, "cache"),
    # the whole SmolLM2 model (~76 MB) does not fit in cache: in decode its layers stream too
    "smol-up-stream 1536x576": (1536, 576, "dram"),
    "smol-down-stream 576x1536": (576, 1536, "dram"),
}
DEFAULT_SHAPES = tuple(SHAPES)
SHAPES.update({  # by name only (--shapes): SmolLM2's attention and output (q8_0 in its GGUF) matrices
    "smol-attn-stream 576x576": (576, 576, "dram"),
    "smol-out-stream 49152x576": (49152, 576, "dram"),
})
LLC_BYTES = 32 << 20
R16 = "vnni-r16"  # the vnni path on the runtime's repacked layout


class _Repacked:
    """The vnni path's ``matmul`` on weights repacked as the runtime repacks them (the types
    ``interleaved.RTYPE`` names; the others as stored)."""

    def __init__(self):
        self.p = kernels.get_path("vnni")
        self.quantize_q8_0 = self.p.quantize_q8_0

    @staticmethod
    def weights(wtype: str, ws: list[dict]) -> list[dict]:
        return [interleaved.repack(wtype, w)[1] for w in ws] if wtype in interleaved.RTYPE else ws

    def matmul(self, wtype, arrays, xq, xd, xsum, x, out) -> None:
        if wtype not in interleaved.RTYPE:
            return self.p.matmul(wtype, arrays, xq, xd, xsum, x, out)
        rtype = interleaved.RTYPE[wtype]
        fn = getattr(self.p.jit, f"matmul_{interleaved.BASE[rtype]}_r16_q8_0")
        fn(*(arrays[k].view(np.uint16) if dt == "float16" else arrays[k] for k, dt in interleaved.ARRAYS[rtype]),
           xq, xd, xsum, out)


def _path(name: str):
    return _Repacked() if name == R16 else kernels.get_path(name)


@numba.njit(parallel=True, fastmath=True, cache=True)
def _read_sum(a):
    """Sum of a large float32 array: the read-bandwidth ceiling for weight streaming."""
    s = np.float32(0.0)
    for i in numba.prange(a.shape[0]):
        s += a[i]
    return s


def read_bandwidth(threads: int, nbytes: int = 256 << 20, reps: int = 5) -> float:
    a = np.ones(nbytes // 4, np.float32)
    numba.set_num_threads(threads)
    sec, cpu = _time(lambda: _read_sum(a), reps, 1)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    return nbytes / sec / 1e9, nbytes / cpu / 1e9


def _weights(wtype: str, N: int, K: int, copies: int, rng) -> list[dict]:
    if wtype in quant.QUANTIZABLE:
        base = quant.quantize(rng.standard_normal((N, K)).astype(np.float32) * 0.02, wtype)
    else:  # the K-quants have no quantizer: random valid blocks
        base = quant.random_arrays(wtype, N, K, rng)
    return [{k: v.copy() for k, v in base.items()} for _ in range(copies)]


def _time(fn, reps: int, inner: int) -> tuple[float, float]:
    """(wall, cpu) seconds per call: best of ``reps`` timings of ``inner`` calls. The machine is
    shared, so the minimum is the least disturbed figure; cpu is this process's CPU time per
    call divided by the numba thread count (immune to being descheduled, not to others'
    memory traffic)."""
    fn()
    nt = numba.get_num_threads()
    ws, cs = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        for _ in range(inner):
            fn()
        ws.append((time.perf_counter() - t) / inner)
        cs.append((time.process_time() - c) / inner / nt)
    return float(np.min(ws)), float(np.min(cs))


def time_matmul(p, wtype: str, ws: list[dict], xq, xd, xs, x, out, reps: int,
                min_inner: int = 1, max_inner: int = 200) -> tuple[float, float]:
    """(wall, cpu) seconds of one ``p.matmul`` call, the weights rotating over the copies ``ws``
    (together larger than the last-level cache: each call reads its matrix from memory), with as
    many calls per timing (``min_inner``..``max_inner``) as fill about 50 ms."""
    state = {"i": 0}

    def call():
        w = ws[state["i"] % len(ws)]
        state["i"] += 1
        p.matmul(wtype, w, xq, xd, xs, x, out)

    est = _time(call, 1, 1)[0]
    inner = max(min_inner, min(max_inner, int(0.05 / max(est, 1e-7))))
    return _time(call, reps, inner)


def run(paths, wtypes, threads, shapes, T_prefill=64, reps=7, quick=False, decode_only=False) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for sname in shapes:
        N, K, place = SHAPES[sname]
        for wtype in wtypes:
            if K % quant.block_cols(wtype):
                continue  # e.g. K-quants on SmolLM2's 576-wide rows
            nbytes = quant.nbytes(wtype, N, K)
            copies = max(1, -(-2 * LLC_BYTES // nbytes)) if place == "dram" else 1
            ws = _weights(wtype, N, K, copies, rng)
            ws_r16 = _Repacked.weights(wtype, ws) if R16 in paths else None
            for T in (1,) if decode_only else (1, T_prefill):
                x = rng.standard_normal((T, K)).astype(np.float32)
                xq = np.empty((T, K), np.int8)
                xd = np.empty((T, K // 32), np.float32)
                xs = np.empty((T, K // 32), np.int32)
                out = np.empty((T, N), np.float32)
                for pname in paths:
                    p = _path(pname)
                    p.quantize_q8_0(x, xq, xd, xs)
                    if T > 1 and pname == "portable" and quick:
                        continue
                    for nt in threads:
                        numba.set_num_threads(nt)
                        sec, cpu = time_matmul(p, wtype, ws_r16 if pname == R16 else ws, xq, xd, xs, x, out,
                                               3 if quick else reps,
                                               min_inner=copies if T == 1 else 1)
                        row = dict(path=pname, wtype=wtype, shape=sname, place=place, T=T, threads=nt,
                                   us=round(sec * 1e6, 1))
                        if T == 1:
                            row["GB/s"] = round(nbytes / sec / 1e9, 2)
                            row["GB/s_cpu"] = round(nbytes / cpu / 1e9, 2)
                        else:
                            row["GFLOP/s"] = round(2 * N * K * T / sec / 1e9, 1)
                            row["GFLOP/s_cpu"] = round(2 * N * K * T / cpu / 1e9, 1)
                        if pname == R16 and wtype in interleaved.RTYPE:  # the same product as the stored layout's
                            ref, got = np.empty_like(out), np.empty_like(out)
                            kernels.get_path("vnni").matmul(wtype, ws[0], xq, xd, xs, x, ref)
                            p.matmul(wtype, ws_r16[0], xq, xd, xs, x, got)
                            row["max_rel_diff_vs_stored"] = float(np.abs(got - ref).max() / np.abs(ref).max())
                        rows.append(row)
                        print(_fmt(row), flush=True)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    return rows


def _fmt(r: dict) -> str:
    if "GB/s" in r:
        val = f"{r['GB/s']:7.2f} GB/s  (cpu-time {r['GB/s_cpu']:6.2f})"
    else:
        val = f"{r['GFLOP/s']:7.1f} GFLOP/s  (cpu-time {r['GFLOP/s_cpu']:6.1f})"
    diff = f"  diff vs stored {r['max_rel_diff_vs_stored']:.1e}" if "max_rel_diff_vs_stored" in r else ""
    return (f"{r['path']:9s} {r['wtype']:6s} {r['shape']:20s} {r['place']:5s} T={r['T']:<3d} "
            f"thr={r['threads']}  {r['us']:10.1f} us  {val}{diff}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    paths = kernels.available_paths()
    paths += [R16] if "vnni" in paths else []
    ap.add_argument("--paths", default=",".join(paths), help=f"comma-separated kernel paths ({R16}: the vnni "
                    "path on the runtime's repacked layout)")
    ap.add_argument("--types", default="q4_0,q4_1,q8_0,f16,f32", help="comma-separated weight types "
                    f"({', '.join(t for t in quant.WEIGHT_TYPES if not t.endswith('_32'))})")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                    help=f"comma-separated shape names (of: {', '.join(SHAPES)})")
    ap.add_argument("--prefill-tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions; skip portable prefill")
    ap.add_argument("--decode-only", action="store_true", help="T = 1 only")
    ap.add_argument("--json", help="write the rows as JSON to this file")
    a = ap.parse_args(argv)
    threads = [t for t in map(int, a.threads.split(",")) if t <= numba.config.NUMBA_NUM_THREADS]
    for pname in a.paths.split(","):
        kernels.get_path("vnni" if pname == R16 else pname).warmup()
    print(f"# host paths: {kernels.available_paths()}; numba threading layer: {numba.threading_layer()}")
    for nt in threads:
        bw, bwc = read_bandwidth(nt)
        print(f"# read bandwidth (sum of 256 MiB f32), {nt} thread(s): {bw:.2f} GB/s (cpu-time {bwc:.2f})",
              flush=True)
    rows = run(a.paths.split(","), a.types.split(","), threads, a.shapes.split(","),
               T_prefill=a.prefill_tokens, quick=a.quick, decode_only=a.decode_only)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
