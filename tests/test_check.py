"""python -m mpillm.check: passes on a healthy setup and fails, naming the cause, on a missing
shard, a wrong world size, a damaged shard, too little memory and a mixed cluster."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from mpiutil import mpirun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def healthy():
    """A healthy 2-rank check of the bundled model (converted into the cache if needed)."""
    r = mpirun(2, ["-m", "mpillm.check", "--comm-iters", "0.3"], timeout=300)
    return r


@pytest.fixture(scope="module")
def model_dir(healthy) -> Path:
    m = re.search(r"; model (\S+); max-seq-len", healthy.stdout)
    assert m, healthy.stdout + healthy.stderr
    return Path(m[1])


def partial_model(src: Path, dst: Path, world_sizes: list[int], ranks: list[int], ws: int) -> Path:
    """A model directory that links to ``ranks`` of ``src``'s ws``ws`` shards only."""
    (dst / f"ws{ws}").mkdir(parents=True)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["world_sizes"] = world_sizes
    (dst / "manifest.json").write_text(json.dumps(manifest))
    for f in src.glob("tokenizer*"):
        os.symlink(f, dst / f.name)
    for r in ranks:
        os.symlink(src / f"ws{ws}" / f"rank{r}.h5", dst / f"ws{ws}" / f"rank{r}.h5")
    return dst


def test_healthy(healthy):
    out = healthy.stdout + healthy.stderr
    assert healthy.returncode == 0, out
    assert "mpillm.check: OK" in healthy.stdout
    assert "2 rank(s) on 1 host(s)" in healthy.stdout
    assert re.search(r"Open MPI v\d|MPICH", healthy.stdout), out
    assert "Allreduce" in healthy.stdout and " us " in healthy.stdout
    for rank in (0, 1):
        assert re.search(rf"^\s+{rank}\s+\S+\s+\d+\s+[\d.,]+ MiB .* (intact|unverifiable)$", healthy.stdout, re.M), out


def test_missing_shard(model_dir, tmp_path):
    d = partial_model(model_dir, tmp_path / "m", [2], [0], 2)
    r = mpirun(2, ["-m", "mpillm.check", "--model", str(d), "--no-comm"], timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED" in r.stderr
    assert re.search(r"rank 1 \(.*\): shard file .*rank1\.h5 is missing", r.stderr), r.stderr


def test_wrong_world_size(model_dir, tmp_path):
    d = partial_model(model_dir, tmp_path / "m", [2], [0, 1], 2)
    r = mpirun(3, ["-m", "mpillm.check", "--model", str(d), "--no-comm"], timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "converted for world sizes [2], this job has 3 ranks" in r.stderr, r.stderr


def test_damaged_shard(model_dir, tmp_path):
    d = partial_model(model_dir, tmp_path / "m", [2], [0], 2)
    src = model_dir / "ws2" / "rank1.h5"
    with open(src, "rb") as f, open(d / "ws2" / "rank1.h5", "wb") as g:
        g.write(f.read(src.stat().st_size // 2))
    r = mpirun(2, ["-m", "mpillm.check", "--model", str(d), "--no-comm"], timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(r"rank 1 .*rank1\.h5 (is truncated|is corrupt)", r.stderr), r.stderr


def test_too_little_memory(model_dir):
    r = mpirun(2, ["-m", "mpillm.check", "--model", str(model_dir), "--no-comm",
                   "--simulate-mem-bytes", str(200 * 2**20)], timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(r"too little memory on \S+: ranks 0,1 need [\d,]+ MiB .* 200 MiB available", r.stderr), r.stderr


def test_max_seq_len_counts(model_dir):
    """The KV cache at --max-seq-len counts: a budget that fits 2048 positions (about 750 MiB for
    two ranks) does not fit 8192 (about 1.1 GiB). Both sides are checked, so an estimate that
    left the KV cache out (or counted it at any length) fails one of them."""
    def check(seq: int):
        return mpirun(2, ["-m", "mpillm.check", "--model", str(model_dir), "--no-comm", "--max-seq-len", str(seq),
                          "--simulate-mem-bytes", str(900 * 2**20)], timeout=120)

    short, long_ = check(2048), check(8192)
    assert short.returncode == 0 and "mpillm.check: OK" in short.stdout, short.stdout + short.stderr
    assert "too little memory" not in short.stdout + short.stderr
    assert long_.returncode == 1, long_.stdout + long_.stderr
    m = re.search(r"too little memory on \S+: ranks 0,1 need ([\d,]+) MiB .* 900 MiB available", long_.stderr)
    assert m and 900 < int(m[1].replace(",", "")) < 1300, long_.stderr


def test_mixed_cluster_is_refused():
    from mpillm.check import judge

    base = {"host": "a", "problems": [], "mpi": "Open MPI v5.0.11", "python": "3.11.7", "mpi4py": "4.1.2",
            "numpy": "2.0", "avail": 10**10, "need": 10**8}
    reps = [dict(base, rank=0, mpillm="0.1.0+aaaa"), dict(base, rank=1, host="b", mpillm="0.1.0+bbbb")]
    problems = judge(reps)
    assert any("mixed cluster: mpillm version differs" in p and "on ranks 1" in p for p in problems), problems
    assert judge([dict(base, rank=0, mpillm="0.1.0+aaaa"), dict(base, rank=1, host="b", mpillm="0.1.0+aaaa")]) == []


def test_memory_is_summed_per_host():
    from mpillm.check import judge

    base = {"problems": [], "mpillm": "x", "mpi": "m", "python": "p", "mpi4py": "q", "numpy": "n",
            "avail": 3 * 2**30, "need": 2**30}
    reps = [dict(base, rank=r, host="a" if r < 2 else "b") for r in range(4)]
    assert judge(reps) == []
    reps = [dict(base, rank=r, host="a" if r < 3 else "b", need=int(1.1 * 2**30)) for r in range(4)]
    problems = judge(reps)
    assert len(problems) == 1 and "too little memory on a: ranks 0,1,2" in problems[0], problems
