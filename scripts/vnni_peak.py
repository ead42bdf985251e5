"""The ceiling batched decode runs into: how many 512-bit vpdpbusd one core retires per second, and
what that means for a step of k rows (python scripts/vnni_peak.py [--model M --t1-ms MS] [--json F]).

A step of k decode rows does k times the integer multiply-adds of one row while reading the weights
once, so once the weight stream is shared its time is bounded below by the dot-product instruction's
throughput: one vpdpbusd multiplies 64 weight bytes by 64 activation bytes. This times a loop of
independent vpdpbusd chains (no loads, nothing else) on one thread and prints the peak, in
instructions and int8 multiply-adds per second; with --model it also prints, for that model's
quantized weights at -np 1, the matmul time of one step of k rows at that peak (the bound no kernel
of this layout can beat) next to a measured one-row step time (--t1-ms, e.g. from scripts/step_rows.py).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
from llvmlite import ir
from numba import njit

from mpillm.kernels.irgen import I32, Emit, int_intrinsic, vec

CHAINS = 12  # independent accumulators: more than the instruction's latency x throughput


def _codegen(context, b, sig, args):
    n, p = args
    v = vec(I32, 16)
    ptr = b.inttoptr(p, ir.PointerType(v))
    f = Emit(b).decl("llvm.x86.avx512.vpdpbusd.512", v, [v, v, v])
    a, x = b.load(ptr, align=1), b.load(b.gep(ptr, [I32(1)]), align=1)
    accs = [b.load(b.gep(ptr, [I32(2 + i)]), align=1) for i in range(CHAINS)]
    loop_bb, end_bb = b.append_basic_block("loop"), b.append_basic_block("end")
    entry = b.block
    b.branch(loop_bb)
    b.position_at_end(loop_bb)
    i = b.phi(n.type)
    i.add_incoming(ir.Constant(n.type, 0), entry)
    phis = []
    for acc in accs:
        ph = b.phi(v)
        ph.add_incoming(acc, entry)
        phis.append(ph)
    new = [b.call(f, [ph, a, x]) for ph in phis]
    i2 = b.add(i, ir.Constant(n.type, 1))
    i.add_incoming(i2, loop_bb)
    for ph, nv in zip(phis, new):
        ph.add_incoming(nv, loop_bb)
    b.cbranch(b.icmp_signed("<", i2, n), loop_bb, end_bb)
    b.position_at_end(end_bb)
    for k, nv in enumerate(new):  # stored, so the chains are not dead code
        b.store(nv, b.gep(ptr, [I32(2 + k)]), align=1)
    return context.get_dummy_value()


_chains = int_intrinsic("vnni_peak_chains", "n, p", _codegen)


@njit(cache=False)
def _run(n, buf):
    _chains(n, buf.ctypes.data)


def peak(seconds: float = 0.5) -> float:
    """vpdpbusd (512-bit) retired per second on this thread, best of 5."""
    buf = np.ones(64 * (2 + CHAINS) // 4, np.int32)
    _run(1000, buf)
    n = 1_000_000
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        _run(n, buf)
        dt = time.perf_counter() - t
        best = max(best, n * CHAINS / dt)
        n = max(n, int(n * seconds / max(dt, 1e-6)))
    return best


def model_macs(model: str | None) -> int:
    """int8 multiply-adds of one row through every quantized matrix of the model at -np 1 (None:
    the bundled one)."""
    from mpi4py import MPI

    from mpillm.formats import quant
    from mpillm.formats.format import Shard
    from mpillm.startup import resolve_model

    sh = Shard(resolve_model(model, MPI.COMM_SELF) / "ws1" / "rank0.h5", 1, 0)
    tied = not any(n.endswith("output") for n in sh.tensors)  # the output matmul reads the embedding
    total = 0
    for name, t in sh.tensors.items():
        if t.wtype in quant.QUANTIZED and len(t.shape) == 2 and (tied or not name.endswith("tok_embd")):
            total += int(t.shape[0]) * int(t.shape[1])
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a model as the commands take it (the bundled one: 'bundled')")
    p.add_argument("--t1-ms", type=float, help="a measured one-row step, for the ratio")
    p.add_argument("--rows", default="1,8,16")
    p.add_argument("--json")
    a = p.parse_args(argv)
    ips = peak()
    out = {"vpdpbusd_per_s": ips, "int8_macs_per_s": 64 * ips}
    if a.model:
        macs = model_macs(None if a.model == "bundled" else a.model)
        out["model"], out["macs_per_row"] = a.model, macs
        out["matmul_ms_at_peak"] = {int(k): 1e3 * macs * int(k) / (64 * ips) for k in a.rows.split(",")}
        if a.t1_ms:
            out["t1_ms"] = a.t1_ms
            out["bound_vs_t1"] = {k: ms / a.t1_ms for k, ms in out["matmul_ms_at_peak"].items()}
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
