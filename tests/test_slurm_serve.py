"""slurm/serve.sbatch brings the server back when a rank dies, and gives up after
MPILLM_SERVE_RESTARTS restarts; scripts/serve.sh (the systemd unit's command) starts and stops
the server; deploy/mpillm.service passes `systemd-analyze verify`."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "cluster"))

import slurm  # noqa: E402
from mpiutil import kill_session, mpi_env, popen_job  # noqa: E402


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def wait(cond, timeout: float, what: str, job_thread=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def rank_pid(rank: int, marker: str) -> int | None:
    """The process of MPI rank ``rank`` running mpillm.serve with ``marker`` in its command line."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            if b"mpillm.serve" not in cmd or marker.encode() not in cmd:
                continue
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"OMPI_COMM_WORLD_RANK={rank}".encode() in env or f"PMIX_RANK={rank}".encode() in env:
            return int(d.name)
    return None


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.skipif(slurm.missing_reason() is not None, reason=str(slurm.missing_reason()))
def test_serve_sbatch_restarts_after_a_rank_dies(tmp_path):
    port = slurm._free_port()
    env = {"MPILLM_ROOT": str(ROOT), "MPILLM_VENV": str(Path(sys.executable).parent.parent),
           "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
           "NUMBA_CACHE_DIR": os.environ.get("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache")),
           "MPILLM_SERVE_RESTARTS": "1", "MPILLM_SERVE_BACKOFF": "1", "MPILLM_LAUNCHER": "mpirun"}
    marker = f"--port={port}"
    with slurm.SlurmCluster(tmp_path / "slurm") as cluster:
        result = {}

        def submit():
            result["job"] = cluster.sbatch(ROOT / "slurm" / "serve.sbatch", ["--ntasks=2"],
                                           [marker, "--max-seq-len", "256"], env=env, timeout=420, cwd=ROOT)
        t = threading.Thread(target=submit, daemon=True)
        t.start()
        for attempt in (1, 2):
            wait(lambda: healthy(port) or not t.is_alive(), 300, f"the server (start {attempt})")
            assert t.is_alive(), f"the job ended early: {result}"
            pid = rank_pid(1, marker)
            assert pid, "rank 1 of the served job not found"
            os.kill(pid, signal.SIGKILL)
            wait(lambda: not healthy(port), 15, "the server to go down after the kill")
        t.join(60)
        job = result["job"]
        text = job.stdout + job.stderr
        assert "restart 1 of 1" in text and "giving up" in text, text[-3000:]
        assert job.returncode != 0, text[-3000:]


def test_serve_sh_starts_and_stops(tmp_path):
    env = mpi_env({"MPILLM_NP": "1", "MPILLM_SERVE_ARGS": "--port 0 --max-seq-len 256"})
    p = popen_job([str(ROOT / "scripts" / "serve.sh")], env, tmp_path, stderr=subprocess.STDOUT)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True)
    reader.start()
    try:
        wait(lambda: any("ready:" in ln for ln in lines) or p.poll() is not None, 300, "the server")
        assert p.poll() is None, "".join(lines)
        url = next(ln.split("listening on ")[1].split()[0] for ln in lines if "listening on" in ln)
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            assert r.status == 200
        os.kill(p.pid, signal.SIGTERM)          # what systemd's KillMode=mixed sends: mpirun only
        p.wait(15)                              # every rank ends with it
        wait(lambda: not _session(p.pid), 10, f"every process of the job to end: {_session(p.pid)}")
    finally:
        kill_session(p, grace=0)


def _session(sid: int) -> list[str]:
    """Live (not zombie) processes of session ``sid``, with their command lines."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and os.getsid(int(d.name)) == sid and \
                    (d / "stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX":
                out.append(f"{d.name}: {(d / 'cmdline').read_bytes()[:200]!r}")
        except OSError:
            pass
    return out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_verifies(tmp_path):
    unit = (ROOT / "deploy" / "mpillm.service").read_text().replace("/opt/mpillm", str(ROOT))
    unit = unit.replace("User=mpillm", "User=root").replace("Group=mpillm", "Group=root")
    f = tmp_path / "mpillm.service"
    f.write_text(unit)
    r = subprocess.run(["systemd-analyze", "verify", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Restart=on-failure" in unit and "KillMode=mixed" in unit
