"""Uneven splits (convert --split), run inside ``mpirun -np N python -m pytest --with-mpi tests/mpi``.

The same fixture converted with an uneven split must give the logits of the even split
(only the Allreduce summation order differs) and of transformers, at every rank count,
including splits that leave a rank a single query head (the fixtures have 6 heads).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from mpillm.formats import format as fmt
from mpillm.formats.partition import plan
from test_tp_mpi import CROSS_RANK, FIXTURES, TOLERANCE, rel_rms, run_logits, shared_tmpdir

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()

# per world size: splits, the first of each leaving some rank a single head
SPLITS = {2: ["5,1", "1,2"], 3: ["4,1,1", "1,3,2"], 4: ["3,1,1,1", "1,1,1,2.5"]}

pytestmark = pytest.mark.skipif(size < 2, reason="an uneven split needs at least 2 ranks")


@pytest.fixture(scope="module")
def tmp() -> Path:
    return shared_tmpdir()


def convert_split_on_rank0(src: Path, out: Path, split: str | None, wtype: str) -> None:
    err = None
    if rank == 0:
        from convert.__main__ import main

        args = [str(src), str(out), "--weight-type", wtype, "--no-progress", "--no-tokenizer"]
        args += ["--split", split] if split else ["--world-size", str(size)]
        try:
            rc = main(args)
            err = None if rc == 0 else f"convert {args} exited {rc}"
        except Exception as e:  # noqa: BLE001
            err = repr(e)
    err = comm.bcast(err, root=0)
    assert err is None, err


_even: dict = {}


def even_logits(tmp: Path, name: str, wtype: str, tokens: np.ndarray):
    key = (name, wtype)
    if key not in _even:
        out = tmp / f"even-{name}-{wtype}"
        convert_split_on_rank0(FIXTURES / name, out, None, wtype)
        _even[key] = run_logits(out, tokens)
    return _even[key]


@pytest.mark.mpi
@pytest.mark.parametrize("name,wtype,which", [("llama", "f32", 0), ("llama", "f32", 1), ("mistral", "q4_0", 0),
                                               ("qwen3_moe", "f32", 0)])
def test_uneven_split_logits(tmp, name, wtype, which):
    split = SPLITS[size][which]
    exp = np.load(FIXTURES / name / "expected.npz")
    out = tmp / f"split-{name}-{wtype}-{which}"
    convert_split_on_rank0(FIXTURES / name, out, split, wtype)
    m = fmt.read_manifest(out)
    sp = fmt.split_of(m, size)
    assert sp is not None and sp["weights"] == [float(x) for x in split.split(",")], m
    from mpillm.formats.config import ModelConfig

    slices = plan(ModelConfig.from_dict(m["config"]), size, sp["weights"])
    heads = [s.n_heads_per_partition for s in slices]
    if which == 0:
        assert min(heads) == 1, f"split {split} was meant to leave a rank one head: {heads}"
    assert heads != [s.n_heads_per_partition for s in plan(ModelConfig.from_dict(m["config"]), size)] or \
        [s.ffn for s in slices] != [s.ffn for s in plan(ModelConfig.from_dict(m["config"]), size)], \
        f"split {split} came out even"
    logits = run_logits(out, exp["tokens"])
    even = even_logits(tmp, name, wtype, exp["tokens"])
    if rank == 0:
        d = rel_rms(logits, even)
        err = rel_rms(logits, exp["logits"])
        print(f"\n{name} {wtype} np={size} split {split} (heads {heads}): rel RMS vs even {d:.2e}, "
              f"vs transformers {err:.2e}")
        assert d < CROSS_RANK[wtype], f"split {split}: vs even split relative RMS {d:.2e}"
        assert err < TOLERANCE[wtype], f"split {split}: vs transformers relative RMS {err:.2e}"
