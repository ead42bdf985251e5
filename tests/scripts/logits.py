"""Run under mpirun: teacher-forced logits of a token sequence, saved by rank 0.

  python tests/scripts/logits.py MODEL_DIR OUT.npy TOKEN [TOKEN ...]
"""
import sys

import numpy as np

from mpillm.runtime.errors import run
from mpillm.runtime.engine import Engine


def main() -> int:
    model, out, toks = sys.argv[1], sys.argv[2], [int(t) for t in sys.argv[3:]]
    eng = Engine(model, max_seq_len=max(len(toks), 2), verbose=False, max_batch=16)

    def rank0():
        np.save(out, eng.step(toks, 0, all_logits=True))
        return 0

    return eng.drive(rank0)


run(main, "logits")
