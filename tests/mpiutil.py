"""Launch mpirun from tests with a hard timeout, so no test can hang."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mpi_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe")
    env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")  # more ranks than cores: do not busy-poll
    env.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache"))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if extra:
        env.update(extra)
    return env


def mpirun_cmd(np: int) -> list[str]:
    bindir = Path(sys.executable).parent
    mpirun = bindir / "mpirun"
    return [str(mpirun) if mpirun.exists() else "mpirun", "-np", str(np), "--bind-to", "none"]


def run_killing_on_timeout(cmd: list[str], env: dict, timeout: float, what: str,
                          cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a job in its own session; on a hang kill the whole process group and fail the test."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=cwd or ROOT, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        raise AssertionError(f"{what} hung for {timeout}s\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def mpirun(np: int, args: list[str], timeout: float = 120, env: dict | None = None,
           cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python args...`` on ``np`` ranks; a hang kills the job and fails the test."""
    return run_killing_on_timeout(mpirun_cmd(np) + [sys.executable] + args, mpi_env(env), timeout,
                                  f"mpirun -np {np} {' '.join(args)}", cwd)
