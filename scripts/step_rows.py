"""Time one decoding step with T rows of one sequence (what verifying a draft of T-1 tokens costs)
at a filled context, on the current MPI job: mpirun -np 2 python scripts/step_rows.py [--ctx 800]

Each round runs every T once in a shuffled order (so the load on a shared machine hits all T
alike); prints the median ms per step and its ratio to T = 1, and the compute / collective split.
"""
import argparse
import json
import statistics
import time

import numpy as np
from mpi4py import MPI

from mpillm.runtime.errors import run
from mpillm.runtime.engine import Engine
from mpillm.runtime.steps import OUT_GREEDY
from mpillm.startup import resolve_model


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--ctx", type=int, default=800)
    p.add_argument("--rows", default="1,2,3,4,5,6,8,9,12,16,17")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    comm = MPI.COMM_WORLD
    eng = Engine(resolve_model(a.model, comm), max_seq_len=a.ctx + 64, threads=a.threads, verbose=False,
                 max_batch=64)
    Ts = [int(t) for t in a.rows.split(",")]

    def rank0():
        rng = np.random.default_rng(0)
        eng.step(rng.integers(0, eng.cfg.vocab_size, a.ctx), 0)
        times = {t: [] for t in Ts}
        comm_s = {t: [] for t in Ts}
        for r in range(a.rounds + 1):
            for T in rng.permutation(Ts):
                T = int(T)
                toks = rng.integers(0, eng.cfg.vocab_size, T)
                eng.model.stats.reset()
                t0 = time.perf_counter()
                eng.run(toks, np.arange(a.ctx, a.ctx + T), np.zeros(T, np.int64), np.arange(T),
                        np.full(T, OUT_GREEDY))
                dt = time.perf_counter() - t0
                if r:   # round 0 warms every shape up
                    times[T].append(dt)
                    comm_s[T].append(eng.model.stats.seconds)
        base = statistics.median(times[1])
        out = {"ranks": eng.size, "ctx": a.ctx, "rounds": a.rounds,
               "steps": {T: {"ms": 1e3 * statistics.median(times[T]),
                             "vs_T1": statistics.median(times[T]) / base,
                             "comm_ms": 1e3 * statistics.median(comm_s[T])} for T in Ts}}
        print(json.dumps(out, indent=1))

    return eng.drive(rank0)


if __name__ == "__main__":
    run(main, "step_rows")
