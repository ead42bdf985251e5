"""How fast one thread streams MoE expert slices from memory through the interleaved kernels, one
token at a time, as a MoE decode step reads them: python scripts/expert_stream.py [--types q4_K,q6_K,q4_0]

Per type: --layers stacks of --experts expert slices (gate and up N x K, down K x N; the Qwen3-30B-A3B
cut at -np 2 by default: N = 384, K = 2048), far more than the last-level cache; each round picks 8
experts per layer at random and calls gate, up and down for one token, as the fused MoE block does.
Prints GB/s (the weights' bytes over the median round's time). All types run in one process, one
after the other per round: separate processes on a shared machine see its bandwidth move by 2x
from one minute to the next (docs/performance.md, "MoE generation").
"""
import argparse
import json
import time

import numba
import numpy as np

from mpillm import kernels
from mpillm.formats import quant
from mpillm.kernels import interleaved


def expert_stack(kind: str, n: int, k: int, experts: int, rng) -> dict:
    """An (experts, n, k) stack of one random slice, repacked (K-quants cut at 32 columns: their _32 form)."""
    if quant.base_type(kind) in quant.K_TYPES:
        full = -(-k // 256) * 256
        wtype = kind if full == k else kind + "_32"
        a = quant.random_arrays(wtype, n, full, rng)
        a = {name: np.ascontiguousarray(v[:, : v.shape[1] * k // full]) for name, v in a.items()}
    else:
        wtype = kind
        a = quant.quantize((rng.standard_normal((n, k)) * 0.02).astype(np.float32), kind)
    return interleaved.repack(wtype, {name: np.stack([v] * experts) for name, v in a.items()})[1]


def acts(x: np.ndarray) -> tuple:
    T, k = x.shape
    q, d, s = np.empty((T, k), np.int8), np.empty((T, k // 32), np.float32), np.empty((T, k // 32), np.int32)
    kernels.get_path("vnni").quantize_q8_0(x, q, d, s)
    return q, d, s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", default="q4_K,q6_K,q4_0")
    p.add_argument("--n", type=int, default=384, help="an expert slice's hidden rows (gate / up)")
    p.add_argument("--k", type=int, default=2048, help="the model width")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--json")
    a = p.parse_args()
    if kernels.active_path() != "vnni":
        raise SystemExit("the interleaved kernels run on the vnni path only")
    numba.set_num_threads(1)
    rng = np.random.default_rng(0)
    kinds = a.types.split(",")
    stacks = {kind: [tuple(expert_stack(kind, *s, a.experts, rng) for s in ((a.n, a.k), (a.n, a.k), (a.k, a.n)))
                     for _ in range(a.layers)] for kind in kinds}
    x, h = acts(rng.standard_normal((1, a.k)).astype(np.float32)), acts(rng.standard_normal((1, a.n)).astype(np.float32))
    o1, o2 = np.empty((1, a.n), np.float32), np.empty((1, a.k), np.float32)
    times = {kind: [] for kind in kinds}
    for r in range(a.rounds + 2):
        for kind in kinds:
            fn = getattr(interleaved, f"vnni_matmul_{kind}_r16_q8_0")
            keys = [name for name, _ in interleaved.ARRAYS[interleaved.RTYPE[kind]]]

            def w(stack, e):
                return tuple(stack[k][e].view(np.uint16) if stack[k].dtype == np.float16 else stack[k][e] for k in keys)

            pick = [rng.choice(a.experts, 8, replace=False) for _ in range(a.layers)]
            t0 = time.perf_counter()
            for (g, u, d), sel in zip(stacks[kind], pick):
                for e in sel:
                    fn(*w(g, e), *x, o1)
                    fn(*w(u, e), *x, o1)
                    fn(*w(d, e), *h, o2)
            if r >= 2:  # the first rounds compile and fault the pages in
                times[kind].append(time.perf_counter() - t0)
    out = {}
    for kind in kinds:
        per_expert = sum(v[0].nbytes for m in stacks[kind][0] for v in m.values())
        t = float(np.median(times[kind]))
        out[kind] = {"gb_s": per_expert * 8 * a.layers / t / 1e9, "us_per_expert": t / (8 * a.layers) * 1e6,
                     "bytes_per_expert": per_expert}
        print(f"{kind}: {out[kind]['gb_s']:.1f} GB/s, {out[kind]['us_per_expert']:.1f} us per expert "
              f"(gate + up + down, {per_expert / 1e6:.2f} MB)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "load_avg": list(__import__("os").getloadavg()), "types": out}, f, indent=1)


if __name__ == "__main__":
    main()
