"""MPI discipline: agreeing on errors, exiting together, never hanging.

Errors that every rank can detect at the same point (bad files, wrong world size)
are gathered with ``agree`` so all ranks raise the same ``FatalError`` and exit
cleanly with one message from rank 0. Anything unexpected on a single rank
aborts the whole job (MPI_Abort), so no rank is left waiting in a collective.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable

from mpi4py import MPI


class FatalError(Exception):
    """An error all ranks agreed on; the message names the ranks concerned."""


def agree(comm: MPI.Comm, error: str | None, what: str = "") -> None:
    """Collective: raise FatalError on every rank if any rank reports an error."""
    errors = comm.allgather(error)
    bad = [(r, e) for r, e in enumerate(errors) if e]
    if not bad:
        return
    if len({e for _, e in bad}) == 1 and len(bad) == comm.Get_size() and comm.Get_size() > 1:
        raise FatalError(f"{what}{bad[0][1]} (on every rank)")
    raise FatalError(what + "; ".join(f"rank {r}: {e}" for r, e in bad))


def rank0_print(*args, **kw) -> None:
    if MPI.COMM_WORLD.Get_rank() == 0:
        print(*args, **kw, flush=True)


def run(main: Callable[[], int], prog: str) -> None:
    """Run ``main`` on every rank; exit all ranks together, or abort the job on a one-rank failure."""
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    try:
        rc = main()
    except FatalError as e:
        if rank == 0:
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        rc = 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted on rank {rank}", file=sys.stderr, flush=True)
        comm.Abort(130)
        return
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - any other failure must take the whole job down
        msg = str(e) if isinstance(e, ValueError) else traceback.format_exc()
        print(f"{prog}: error on rank {rank} of {comm.Get_size()}: {msg}", file=sys.stderr, flush=True)
        if os.environ.get("MPILLM_DEBUG"):
            traceback.print_exc()
        comm.Abort(1)
        return
    sys.stdout.flush()
    sys.exit(rc or 0)
