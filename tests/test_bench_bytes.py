"""``mpillm.bench``'s weight bytes per token: what a token reads, not the whole shard. A MoE token
reads its top-k experts (n_experts_used / n_experts of every expert tensor, each rank its slice),
every dense tensor and the router whole, and one row of an untied embedding table. Checked on the
qwen3_moe and gpt_oss fixtures at 1 and 2 ranks against a count made here straight from the HDF5
datasets' shapes, and end to end in the JSON of ``mpirun -np 2 python -m mpillm.bench``."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpillm.formats import format as fmt
from mpillm.bench import weight_bytes_read_per_token
from mpiutil import ROOT, mpirun

FIXTURES = ROOT / "tests" / "fixtures"
SOURCES = {"qwen3_moe": FIXTURES / "qwen3_moe", "gpt_oss": FIXTURES / "gpt_oss" / "mxfp4",
           "llama_tied": FIXTURES / "llama_tied"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from convert.__main__ import convert

    out = {}
    for name, src in SOURCES.items():
        d = tmp_path_factory.mktemp("bytes") / name
        convert(src, d, [1, 2], "q8_0", progress=False, tokenizer=False)
        out[name] = d
    return out


def count_from_datasets(path: Path) -> tuple[int, float]:
    """(bytes of the whole shard, bytes a token reads), from the datasets' shapes and dtypes:
    an expert-indexed dataset (leading axis n_experts, under an ``exp_*`` name) counts its first
    n_experts_used experts; an untied ``tok_embd`` counts one of its vocab_size rows' share."""
    with h5py.File(path, "r") as f:
        cfg = json.loads(f.attrs[fmt.ATTR_CONFIG])
        E, K, V = cfg["n_experts"], cfg["n_experts_used"], cfg["vocab_size"]
        datasets = []
        f.visititems(lambda n, o: datasets.append((n, o.shape, o.dtype.itemsize))
                     if isinstance(o, h5py.Dataset) else None)
    whole = read = 0.0
    for name, shape, item in datasets:
        nbytes = int(np.prod(shape)) * item
        whole += nbytes
        tensor = name.rsplit("/", 1)[0]
        if tensor.rsplit("/", 1)[-1].startswith("exp_"):
            assert shape[0] == E, (name, shape)
            read += K * int(np.prod(shape[1:])) * item
        elif tensor == "tok_embd" and not cfg["tied_embeddings"]:
            read += nbytes / V
        else:
            read += nbytes
    return int(whole), read


@pytest.mark.parametrize("name", list(SOURCES))
@pytest.mark.parametrize("ws", [1, 2])
def test_bytes_a_token_reads(converted, name, ws):
    for rank in range(ws):
        path = converted[name] / fmt.shard_relpath(ws, rank)
        shard = fmt.Shard(path, ws, rank)
        whole, read = count_from_datasets(path)
        assert shard.nbytes == whole
        got = weight_bytes_read_per_token(shard)
        assert abs(got - read) <= 1, (name, ws, rank, got, read)
        cfg = shard.config
        if name == "llama_tied":
            assert cfg.tied_embeddings and not cfg.is_moe and got == whole   # dense, tied: all of it
        else:
            # MoE: the experts dominate, so a token reads well under the shard (fixture: 2 of 8, 4 of 8)
            assert cfg.is_moe and cfg.n_experts_used < cfg.n_experts
            assert got < 0.75 * whole, (got, whole)


@pytest.mark.timeout(600)
def test_bench_json_reports_the_bytes_a_token_reads(converted):
    d = converted["gpt_oss"]
    r = mpirun(2, ["-m", "mpillm.bench", "--model", str(d), "--prompt-tokens", "4", "--gen-tokens", "2",
                   "--repeats", "1", "--max-seq-len", "16"], timeout=500)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(r.stdout[r.stdout.index("{"):])
    counts = [count_from_datasets(d / fmt.shard_relpath(2, k)) for k in range(2)]
    assert res["shard_bytes_per_rank"] == [w for w, _ in counts]
    assert len(res["weight_bytes_per_token_per_rank"]) == 2
    for got, (_, want) in zip(res["weight_bytes_per_token_per_rank"], counts):
        assert abs(got - want) <= 1
    assert res["weight_bytes_per_token"] == sum(res["weight_bytes_per_token_per_rank"])
    assert res["weight_bytes_per_token"] < 0.75 * sum(res["shard_bytes_per_rank"])
