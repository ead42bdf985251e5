"""Partitioning for every world size from 1 to the number of query heads, and the shard format."""
import numpy as np
import pytest

from mpillm.formats import format as fmt
from mpillm.formats.config import ModelConfig
from mpillm.formats.partition import plan, valid_world_sizes

SMOL = ModelConfig(arch="llama", dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536,
                   vocab_size=49152)


@pytest.mark.parametrize("ws", range(1, 10))
def test_plan_covers_everything_once(ws):
    p = plan(SMOL, ws)
    for field, total in (("heads", 9), ("ffn", 1536), ("vocab", 49152)):
        spans = [getattr(r, field) for r in p]
        assert spans[0][0] == 0 and spans[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    for r in p:
        assert (r.ffn[1] - r.ffn[0]) % 32 == 0
        # every query head of the rank finds its KV head on the rank
        for h in range(*r.heads):
            assert r.kv_heads[0] <= h // 3 < r.kv_heads[1]
    sizes = [r.n_heads_per_partition for r in p]
    assert max(sizes) - min(sizes) <= 1


def test_kv_heads_replicated_where_shared():
    p = plan(SMOL, 2)  # heads [0,5) and [5,9): KV head 1 serves heads 3..5, so both ranks hold it
    assert p[0].kv_heads == (0, 2) and p[1].kv_heads == (1, 3)
    p4 = plan(SMOL, 4)
    assert [r.kv_heads for r in p4] == [(0, 1), (1, 2), (1, 3), (2, 3)]  # heads 0-2 | 3-4 | 5-6 | 7-8


def test_too_many_ranks():
    assert valid_world_sizes(SMOL) == list(range(1, 10))
    with pytest.raises(ValueError, match="exceeds the model's 9 query heads"):
        plan(SMOL, 10)


def test_unknown_tensor_name_is_an_error(tmp_path):
    w = fmt.ShardWriter(tmp_path / "s.h5", SMOL, 1, 0, "{}")
    with pytest.raises(ValueError, match="unknown tensor name"):
        w.add("layers/0/mystery", "f32", (4,), {"w": np.zeros(4, np.float32)})
    w.abort()


def test_datasets_are_aligned_and_memory_mapped(tmp_path):
    import h5py

    w = fmt.ShardWriter(tmp_path / "s.h5", SMOL, 1, 0, "{}")
    w.add("layers/0/wq", "q8_0", (64, 576), {"qs": np.ones((64, 576), np.int8), "d": np.ones((64, 18), np.float16)})
    w.close()
    with h5py.File(tmp_path / "s.h5") as f:
        assert f["layers/0/wq/qs"].id.get_offset() % fmt.ALIGNMENT == 0
    s = fmt.Shard(tmp_path / "s.h5", 1, 0)
    a = s.get("layers/0/wq").arrays["qs"]
    assert isinstance(a, np.memmap) and not a.flags.writeable and a[0, 0] == 1
