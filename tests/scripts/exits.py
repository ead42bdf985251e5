"""Run a script or module under mpirun and record how each rank left it (for tests/test_errors.py).

  python tests/scripts/exits.py DIR SCRIPT.py ARGS...     (or: DIR -m MODULE ARGS..., DIR -c CODE)

Each rank that leaves through ``sys.exit`` (the clean path of mpillm.runtime.errors.run) writes its exit
code to DIR/rank{R}.exit before MPI_Finalize, which no rank passes until every rank has reached
it; a rank that is aborted or killed writes nothing. So one file per rank holding 1 proves that
every rank exited by itself, together, after agreeing on the error.
"""
import runpy
import sys
from pathlib import Path


def main() -> None:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    mode = argv[0] if argv[0] in ("-m", "-c") else None
    if mode:
        argv = argv[1:]
    sys.argv = argv
    try:
        if mode == "-c":
            exec(compile(argv[0], "<string>", "exec"), {"__name__": "__main__"})
        elif mode == "-m":
            runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
        else:
            sys.path.insert(0, str(Path(argv[0]).resolve().parent))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        from mpi4py import MPI

        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        (out / f"rank{MPI.COMM_WORLD.Get_rank()}.exit").write_text(str(code))
        raise
    # a script that returns without sys.exit: exit code 0
    from mpi4py import MPI

    (out / f"rank{MPI.COMM_WORLD.Get_rank()}.exit").write_text("0")


main()
