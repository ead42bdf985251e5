"""Attention per step, the per-row kernel of an earlier revision against the current grouped one
(runtime.ops.attention), alternated in one process, single thread:

  python -m benchmarks.attention_gqa [--old-rev 9475717] [--reps 30] [--out FILE.json]

The old kernel is read from git (``git show REV:mpillm/kernels/attention.py``) into a temporary
module, and driven as that revision's ops.attention_ext drove it (one attend_row per row and query
head). Shapes: a rank's heads of the bundled model at -np 2 (5 query heads over 2 KV heads, as
rank 0 holds them) and of the 1B shape at -np 2 (16 over 4), hd 64, fp16 cache; contexts 512 and
4096; steps of 1, 8 and 16 rows, of one sequence (positions ctx .. ctx + T - 1: verification rows,
a prompt chunk) and of T sequences (each at ctx: batched decoding). Each figure is the best of
``--reps`` calls, old and new alternated call by call; the load average is recorded beside them.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from numba import njit

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"bundled-np2": (5, [0, 0, 0, 1, 1]), "1b-np2": (16, [h // 4 for h in range(16)])}


def load_old(rev: str):
    """The attend_row intrinsics of revision ``rev`` and a driver like that revision's."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:mpillm/kernels/attention.py"],
                         capture_output=True, text=True, check=True).stdout
    d = tempfile.mkdtemp(prefix="attn_old_")
    path = os.path.join(d, "_attention_old.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("_attention_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["_attention_old"] = mod
    spec.loader.exec_module(mod)
    a16, a32 = mod.attend_row_f16, mod.attend_row_f32

    @njit
    def old_attention(q, kc, vc, slots, positions, hd, kv_of_head, scores, out):
        T = q.shape[0]
        nh = q.shape[1] // hd
        scale = np.float32(1.0 / math.sqrt(hd))
        rs = kc.strides[2]
        sink = np.float32(-np.inf)
        for h in range(nh):
            kv = kv_of_head[h]
            sp = scores.ctypes.data + h * scores.strides[0]
            for t in range(T):
                base = slots[t] * kc.strides[0] + kv * kc.strides[1]
                kp, vp = kc.ctypes.data + base, vc.ctypes.data + base
                qp = q.ctypes.data + t * q.strides[0] + h * hd * 4
                op = out.ctypes.data + t * out.strides[0] + h * hd * 4
                if kc.itemsize == 2:
                    a16(qp, kp, vp, rs, positions[t] + 1, hd, scale, sink, sp, op)
                else:
                    a32(qp, kp, vp, rs, positions[t] + 1, hd, scale, sink, sp, op)

    return old_attention


def case(nh, kv_of_head, hd, ctx, T, same_seq, rng):
    nkv = max(kv_of_head) + 1
    S = ctx + 32
    slots_n = 1 if same_seq else T
    kc = rng.standard_normal((slots_n, nkv, S, hd)).astype(np.float16).view(np.uint16)
    vc = rng.standard_normal((slots_n, nkv, S, hd)).astype(np.float16).view(np.uint16)
    q = rng.standard_normal((T, nh * hd)).astype(np.float32)
    slots = np.zeros(T, np.int64) if same_seq else np.arange(T, dtype=np.int64)
    positions = (ctx + np.arange(T) if same_seq else np.full(T, ctx)).astype(np.int64)
    return q, kc, vc, slots, positions, np.array(kv_of_head, np.int64)


def main(argv=None):
    from mpillm.runtime import ops
    p = argparse.ArgumentParser()
    p.add_argument("--old-rev", default="9475717")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--ctx", default="512,4096")
    p.add_argument("--rows", default="1,8,16")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    old = load_old(a.old_rev)
    rng = np.random.default_rng(0)
    hd = 64
    results = []
    load_before = os.getloadavg()
    for shape, (nh, kvh) in SHAPES.items():
        for ctx in (int(c) for c in a.ctx.split(",")):
            for T in (int(t) for t in a.rows.split(",")):
                for same in ((True, False) if T > 1 else (True,)):
                    q, kc, vc, slots, pos, kv_of_head = case(nh, kvh, hd, ctx, T, same, rng)
                    out_old, out_new = np.zeros_like(q), np.zeros_like(q)
                    sc_old = np.zeros((nh, kc.shape[2]), np.float32)
                    sc_new = ops.attention_scratch(nh, hd, T)
                    kt = ops.tile_keys(kc)  # the key cache as the current revision lays it out
                    best = {"old": math.inf, "new": math.inf}
                    for r in range(a.reps + 1):
                        for name in ("old", "new") if r % 2 else ("new", "old"):
                            t0 = time.perf_counter()
                            if name == "old":
                                old(q, kc, vc, slots, pos, hd, kv_of_head, sc_old, out_old)
                            else:
                                ops.attention(q, kt, vc, slots, pos, hd, kv_of_head, sc_new, out_new)
                            dt = time.perf_counter() - t0
                            if r:
                                best[name] = min(best[name], dt)
                    diff = float(np.abs(out_old - out_new).max())
                    row = {"shape": shape, "heads": nh, "kv_heads": max(kvh) + 1, "hd": hd, "ctx": ctx, "rows": T,
                           "rows_are": "one sequence" if same else "separate sequences",
                           "old_us": round(best["old"] * 1e6, 1), "new_us": round(best["new"] * 1e6, 1),
                           "speedup": round(best["old"] / best["new"], 2), "max_abs_diff": diff}
                    results.append(row)
                    print(f"{shape:12s} ctx {ctx:5d} T {T:2d} {row['rows_are']:18s} old {row['old_us']:8.1f} us  "
                          f"new {row['new_us']:8.1f} us  x{row['speedup']:.2f}  diff {diff:.1e}", flush=True)
    for r in results:  # each step relative to one row of the same shape and context, old and new
        one = next(x for x in results if x["shape"] == r["shape"] and x["ctx"] == r["ctx"] and x["rows"] == 1)
        r["old_vs_1row"] = round(r["old_us"] / one["old_us"], 2)
        r["new_vs_1row"] = round(r["new_us"] / one["new_us"], 2)
    doc = {"what": f"attention per step, single thread, fp16 cache: per-row kernel of {a.old_rev} (old) vs the "
                   f"grouped kernel (new), alternated call by call, best of {a.reps}",
           "command": "python -m benchmarks.attention_gqa " + " ".join(argv if argv is not None else sys.argv[1:]),
           "load_average_before": [round(x, 2) for x in load_before],
           "load_average_after": [round(x, 2) for x in os.getloadavg()], "results": results}
    if a.out:
        Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    return doc


if __name__ == "__main__":
    main()
