"""The batch scripts in slurm/ under a real single-node Slurm (tests/cluster/slurm.py).

Needs Debian's slurm-wlm, munge and libpmix-dev (srun --mpi=pmix) and root; the tests that use
the cluster skip otherwise (the staging script's own test needs none of it and always runs).

Timeouts: module fixtures count toward the first test that uses them, so every cluster test may
pay for starting Slurm (<= 90 s), converting (240 s) and its own job (<= 300 s): pytest-timeout
gets TIMEOUT, above their sum; each job's limit is also clipped to what is left of it
(tests/mpiutil.py), so a job is always cancelled and reported before pytest-timeout fires.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "cluster"))

import slurm  # noqa: E402
from common import PROMPT, single_host_text, text_of  # noqa: E402

TIMEOUT = 900
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(TIMEOUT)]
_reason = slurm.missing_reason()

SLURM = ROOT / "slurm"
GEN = ["--prompt", PROMPT, "--max-tokens", "16", "--quiet"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if _reason:
        pytest.skip(_reason)
    d = tmp_path_factory.mktemp("slurm")
    with slurm.SlurmCluster(d) as c:
        yield c


@pytest.fixture(scope="module")
def job_env(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("jobs")
    return {"MPILLM_ROOT": str(ROOT), "MPILLM_VENV": str(Path(sys.executable).parent.parent),
            "MPILLM_STAGE_DIR": str(d / "node-local"), "OMPI_ALLOW_RUN_AS_ROOT": "1",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
            "NUMBA_CACHE_DIR": os.environ.get("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache")),
            "MPILLM_OUT": str(d / "shared" / "smollm2")}


def describe(job) -> str:
    return f"job {job.id} {job.state} rc={job.returncode}\n--- stdout\n{job.stdout}\n--- stderr\n{job.stderr}\n{job.sbatch_out}"


@pytest.fixture(scope="module")
def converted(cluster, job_env) -> Path:
    job = cluster.sbatch(SLURM / "convert.sbatch", args=["--world-size", "2"], env=job_env, timeout=240, cwd=ROOT)
    assert job.returncode == 0 and job.state == "COMPLETED", describe(job)
    return Path(job_env["MPILLM_OUT"])


def test_convert(converted):
    assert (converted / "manifest.json").exists()
    assert sorted(p.name for p in (converted / "ws2").iterdir()) == ["rank0.h5", "rank1.h5"]


def test_generate_srun_staged(cluster, job_env, converted):
    if slurm.pmix_missing_reason():
        pytest.skip(slurm.pmix_missing_reason())
    env = dict(job_env, MPILLM_MODEL=str(converted), MPILLM_LAUNCHER="srun", MPILLM_STAGE="copy",
               MPILLM_CHECK_ARGS="--comm-iters 0.2")
    job = cluster.sbatch(SLURM / "generate.sbatch", ["--ntasks=2"], GEN, env=env, timeout=300, cwd=ROOT)
    assert job.returncode == 0 and job.state == "COMPLETED", describe(job)
    assert "mpillm.check: OK" in job.stdout, describe(job)           # the preflight step ran
    staged = Path(job_env["MPILLM_STAGE_DIR"]) / converted.name
    assert (staged / "ws2" / "rank0.h5").stat().st_size == (converted / "ws2" / "rank0.h5").stat().st_size
    assert f"model {staged}" in job.stdout, describe(job)              # the ranks read the local copy
    assert "ranks 2]" in job.stdout
    gen = job.stdout.split("mpillm.check: OK", 1)[1]
    assert text_of(gen) == single_host_text(2), describe(job)


def test_generate_mpirun_sbcast(cluster, job_env, converted, tmp_path):
    env = dict(job_env, MPILLM_MODEL=str(converted), MPILLM_LAUNCHER="mpirun", MPILLM_STAGE="sbcast",
               MPILLM_STAGE_DIR=str(tmp_path / "bcast"), MPILLM_PREFLIGHT="0")
    job = cluster.sbatch(SLURM / "generate.sbatch", ["--ntasks=2"], GEN, env=env, timeout=300, cwd=ROOT)
    assert job.returncode == 0 and job.state == "COMPLETED", describe(job)
    assert (tmp_path / "bcast" / converted.name / "ws2" / "rank1.h5").exists()
    assert text_of(job.stdout) == single_host_text(2), describe(job)


def test_generate_fails_cleanly_for_wrong_world_size(cluster, job_env, converted):
    """3 tasks on a model converted for 2: staging names the missing shard, the job fails."""
    env = dict(job_env, MPILLM_MODEL=str(converted))
    job = cluster.sbatch(SLURM / "generate.sbatch", ["--ntasks=3"], GEN, env=env, timeout=120, cwd=ROOT)
    assert job.returncode != 0 and job.state == "FAILED", describe(job)
    assert "ws3/rank" in job.stderr and "missing" in job.stderr, describe(job)


def test_hpl(cluster, job_env):
    job = cluster.sbatch(SLURM / "hpl.sbatch", ["--ntasks=2"], ["--n", "400", "--nb", "64"], env=job_env,
                         timeout=180, cwd=ROOT)
    assert job.returncode == 0 and job.state == "COMPLETED", describe(job)
    assert "PASSED" in job.stdout and "1 tests completed and passed" in job.stdout, describe(job)
