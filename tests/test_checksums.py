"""Per-tensor checksums: written by the converter and by ``convert synth``, checked by
``Shard.verify``, ``python -m mpillm.check`` and ``--verify``. A flipped byte in the first, a
middle and the last tensor of a shard is caught, naming the rank, the file and the tensor, and
every rank exits non-zero; a shard written before checksums existed is unverifiable, not intact."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from mpillm.formats import format as fmt
from mpiutil import ROOT, mpirun

FIXTURE = ROOT / "tests" / "fixtures" / "llama"
SLURM = ROOT / "slurm"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """The llama fixture converted for 1 and 2 ranks (weights only)."""
    from convert.__main__ import convert

    d = tmp_path_factory.mktemp("ck") / "llama"
    convert(FIXTURE, d, [1, 2], "q4_0", progress=False, tokenizer=False)
    return d


def positions(shard_path: Path, ws: int, rank: int) -> dict[str, str]:
    names = sorted(fmt.Shard(shard_path, ws, rank).tensors)
    return {"first": names[0], "middle": names[len(names) // 2], "last": names[-1]}


def flip_byte(path: Path, tensor: str) -> None:
    """Invert one byte in the middle of ``tensor``'s largest array, in place."""
    with h5py.File(path, "r") as f:
        g = f[tensor]
        ds = max((g[k] for k in g), key=lambda d: d.nbytes)
        off = ds.id.get_offset() + ds.nbytes // 2
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0xFF]))


def damaged_copy(model: Path, dst: Path, rank: int, tensor: str) -> Path:
    shutil.copytree(model, dst)
    flip_byte(dst / "ws2" / f"rank{rank}.h5", tensor)
    return dst


def test_converter_writes_checksums_and_verify_passes(model):
    for ws, rank in ((1, 0), (2, 0), (2, 1)):
        sh = fmt.Shard(model / fmt.shard_relpath(ws, rank), ws, rank)
        assert sh.tensors and all(t.checksum and t.checksum.startswith("xxh3_64:") for t in sh.tensors.values())
        res = sh.verify()
        assert res.status == "intact" and not res.bad and not res.unverifiable, res
        assert res.nbytes == sh.nbytes


def test_synth_writes_checksums(tmp_path):
    from convert.synth import synth

    synth("tiny", tmp_path / "t", [2], "q4_0", progress=False)
    seen = []
    sh = fmt.Shard(tmp_path / "t" / "ws2" / "rank1.h5", 2, 1)
    res = sh.verify(seen.append)
    assert res.status == "intact" and sum(seen) == sh.nbytes


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_byte_found_by_verify(model, tmp_path, where):
    d = tmp_path / "m"
    shutil.copytree(model, d)
    path = d / "ws2" / "rank1.h5"
    tensor = positions(path, 2, 1)[where]
    flip_byte(path, tensor)
    res = fmt.Shard(path, 2, 1).verify()
    assert res.bad == [tensor] and res.status == "damaged"
    msg = res.describe(1)
    assert "rank 1" in msg and str(path) in msg and tensor in msg


def test_shard_without_checksums_is_unverifiable(model, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(model, d)
    path = d / "ws1" / "rank0.h5"
    with h5py.File(path, "r+") as f:
        f.visititems(lambda n, o: o.attrs.__delitem__(fmt.T_ATTR_CHECKSUM) if fmt.T_ATTR_CHECKSUM in o.attrs else None)
    sh = fmt.Shard(path, 1, 0)   # still readable: the attribute is optional
    res = sh.verify()
    assert res.status == "unverifiable" and not res.bad and len(res.unverifiable) == len(sh.tensors)
    assert "unverifiable" in res.describe()
    r = mpirun(1, ["-m", "mpillm.check", "--model", str(d), "--no-comm", "--max-seq-len", "64"], timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "unverifiable" in r.stdout and "intact" not in r.stdout, r.stdout


def test_check_reports_intact(model):
    r = mpirun(2, ["-m", "mpillm.check", "--model", str(model), "--no-comm", "--max-seq-len", "64"], timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    for rank in (0, 1):
        assert f"rank {rank}: {model}/ws2/rank{rank}.h5: intact" in r.stdout, r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_byte_fails_check_and_verify_on_every_rank(model, tmp_path, where):
    tensor = positions(model / "ws2" / "rank1.h5", 2, 1)[where]
    d = damaged_copy(model, tmp_path / "m", 1, tensor)
    shard = d / "ws2" / "rank1.h5"
    r = mpirun(2, ["-m", "mpillm.check", "--model", str(d), "--no-comm", "--max-seq-len", "64"], timeout=180)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED" in r.stderr and f"rank 1 (" in r.stderr and str(shard) in r.stderr and tensor in r.stderr, r.stderr
    r = mpirun(2, ["-m", "mpillm.bench", "--model", str(d), "--verify", "--prompt-tokens", "4",
                   "--gen-tokens", "2", "--repeats", "1", "--max-seq-len", "16"], timeout=180)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "rank 1" in r.stderr and str(shard) in r.stderr and tensor in r.stderr, r.stderr
    assert "generate_tok_s" not in r.stdout   # it stopped before running the damaged weights
    # the undamaged model runs with --verify
    if where == "first":
        r = mpirun(2, ["-m", "mpillm.bench", "--model", str(model), "--verify", "--prompt-tokens", "4",
                       "--gen-tokens", "2", "--repeats", "1", "--max-seq-len", "16"], timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout[r.stdout.index("{"):])["generate_tok_s"] > 0


# Slurm staging (slurm/stage_task.sh) verifies what it copied; these need no Slurm
def _stage_env(rank: int) -> dict:
    return dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID="0",
                PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _stage(src: Path, dest: Path, rank: int) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SLURM / "stage_task.sh"), str(src), str(dest), "2"], env=_stage_env(rank),
                          capture_output=True, text=True, timeout=120)


def test_stage_task_reuses_copies_and_verifies_them(tmp_path):
    """A node-local copy left by an earlier job is not copied again, and every copy is checked
    against the shard's checksums (no Slurm needed)."""
    from convert.synth import synth

    src = tmp_path / "model"
    synth("tiny", src, [2], "q4_0", progress=False)
    dest = tmp_path / "local"
    first, second = _stage(src, dest, 1), _stage(src, dest, 1)
    assert first.returncode == 0 and "staged rank1.h5" in first.stderr, first.stderr
    assert "rank1.h5: intact" in first.stderr, first.stderr
    assert second.returncode == 0 and "staged" not in second.stderr, second.stderr
    assert "rank1.h5: intact" in second.stderr, second.stderr
    assert (dest / "ws2" / "rank1.h5").read_bytes() == (src / "ws2" / "rank1.h5").read_bytes()
    assert not (dest / "ws2" / "rank0.h5").exists()


def test_stage_task_refuses_a_damaged_copy(tmp_path):
    """A byte flipped on the way (here: in the source) fails the staging task, naming file and tensor."""
    import h5py

    from convert.synth import synth

    src = tmp_path / "model"
    synth("tiny", src, [2], "q4_0", progress=False)
    shard = src / "ws2" / "rank0.h5"
    with h5py.File(shard, "r") as f:
        ds = f["layers/1/w_down/qs"]
        off = ds.id.get_offset() + 7
    with open(shard, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 1]))
    r = _stage(src, tmp_path / "local", 0)
    assert r.returncode != 0, r.stderr
    assert "rank0.h5 is damaged" in r.stderr and "layers/1/w_down" in r.stderr, r.stderr
