"""The performance model (mpillm.planner): its arithmetic, its verdicts and its CLI."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mpillm import planner
from mpillm.formats.partition import plan

sys.path.insert(0, str(Path(__file__).resolve().parent / "cluster"))
import netns  # noqa: E402

SMOL, _ = planner.model_config("smollm2-135m")
MOE, _ = planner.model_config("qwen3-30b-a3b")


def test_links_are_the_emulated_profiles():
    """The planner predicts for the links the emulator builds and the link tests check."""
    for name, link in planner.LINKS.items():
        if name == "shm":
            continue
        prof = netns.PROFILES[name]
        assert (prof.rtt_us, prof.goodput_bps) == (link.rtt_us, link.goodput_bps), name


def test_allreduce_cost_shape():
    link = planner.LINKS["1gbe"]
    assert planner.allreduce_s(2304, 1, link) == 0
    small = [planner.allreduce_s(2304, p, link) for p in (2, 4, 8)]
    assert small[0] < small[1] < small[2]
    # latency-bound: one round at 2 ranks is half the RTT plus the stack's cost
    assert abs(small[0] - (link.rtt_us / 2 + link.stack_us) * 1e-6 - 2304 * 8 / link.goodput_bps) < 1e-9
    # bandwidth-bound: 1 MiB over 4 ranks takes the ring (2 (P-1)/P of the bytes), not log2 P full copies
    big = planner.allreduce_s(1 << 20, 4, link)
    assert big < 2 * (1 << 20) * 8 / link.goodput_bps + 6 * 200e-6
    assert planner.allreduce_s(2304, 4, planner.LINKS["wifi"]) > 10 * planner.allreduce_s(2304, 4, planner.LINKS["5gbe"]) / 3


def test_uneven_split_beats_even_when_a_rank_is_slow():
    speeds = [10.0, 5.0]
    even = planner.predict(SMOL, speeds, planner.LINKS["1gbe"], "q4_1")
    split = planner.predict(SMOL, speeds, planner.LINKS["1gbe"], "q4_1", weights=speeds)
    assert split["ms_per_token"] < even["ms_per_token"]
    assert max(split["compute_ms"]) < 0.8 * max(even["compute_ms"])
    assert split["comm_ms"] == even["comm_ms"]


def test_adding_nodes_gets_slower_on_slow_links():
    rows = planner.table(SMOL, planner.NODES["pi5"], planner.LINKS["1gbe"], [1, 2, 4], "q4_1", "f32")
    v = planner.verdicts(rows)
    assert any("from 1 to 2 nodes makes it SLOWER" in x for x in v), v
    # a big model on a fast link does scale
    rows = planner.table(MOE, planner.NODES["framework-desktop"], planner.LINKS["thunderbolt"], [1, 2], "q4_0", "q8_0")
    assert all(r["fits"] for r in rows)


def test_memory_verdict():
    rows = planner.table(MOE, planner.NODES["pi5"], planner.LINKS["1gbe"], [1, 4], "q4_0", "f32")
    assert not rows[0]["fits"] and rows[1]["fits"]
    assert "does not fit" in " ".join(planner.verdicts(rows))


def test_stored_bytes_match_a_real_shard(tmp_path):
    """The memory model against a converted shard's real size (fixture, q4_0, uneven split)."""
    from convert.__main__ import convert
    from mpillm.formats import format as fmt
    from mpillm.formats.config import ModelConfig

    fx = Path(__file__).resolve().parent / "fixtures" / "llama"
    convert(fx, tmp_path / "m", [], "q4_0", progress=False, tokenizer=False, split=[3, 1])
    cfg = ModelConfig.from_dict(fmt.read_manifest(tmp_path / "m")["config"])
    for rs in plan(cfg, 2, [3, 1]):
        real = fmt.Shard(tmp_path / "m" / fmt.shard_relpath(2, rs.tp_rank), 2, rs.tp_rank).nbytes
        model = planner.rank_stored_bytes(cfg, rs, "q4_0")
        assert abs(model - real) < 0.1 * real, (rs.tp_rank, model, real)   # norms are f32, not counted


def test_cli_json(capsys):
    assert planner.main(["--model", "llama-3.2-1b", "--node", "pi5", "--link", "1gbe", "--nodes", "1", "2",
                         "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["nodes"] for r in out["rows"]] == [1, 2] and out["rows"][0]["comm_ms"] == 0


def test_cli_cluster_file(tmp_path, capsys):
    cf = tmp_path / "c.json"
    planner.write_cluster(cf, [{"rank": 0, "weight_gbps": 8.0, "avail_bytes": 8e9},
                               {"rank": 1, "weight_gbps": 4.0, "avail_bytes": 8e9}])
    assert planner.main(["--model", "smollm2-135m", "--cluster", str(cf), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["calibrated_split"]["tok_s"] > out["even"]["tok_s"]


def test_cli_unknown_model(capsys):
    assert planner.main(["--model", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err


@pytest.mark.parametrize("bt", ["f16", "q8_0"])
def test_compressed_syncs_cost_less_bandwidth(bt):
    link = planner.LINKS["wifi"]
    assert planner.sync_s(MOE, 4, link, bt) > 0
    big = planner.LINKS["1gbe"]
    assert planner.comm_s(MOE, 8, big, bt) > 0


def test_calibrate_writes_a_cluster_file_convert_reads(tmp_path):
    """mpillm.check --calibrate on 2 ranks -> cluster file -> convert --cluster -> planner --cluster."""
    from convert.__main__ import convert
    from convert.__main__ import main as convert_main
    from mpillm.formats import format as fmt
    from mpiutil import mpirun

    fx = Path(__file__).resolve().parent / "fixtures" / "llama"
    convert(fx, tmp_path / "even", [2], "q4_0", progress=False, tokenizer=False)
    cf = tmp_path / "cluster.json"
    r = mpirun(2, ["-m", "mpillm.check", "--model", str(tmp_path / "even"), "--no-comm", "--calibrate", str(cf),
                   "--calibrate-seconds", "0.2", "--max-seq-len", "64"], timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "calibration (weight streaming" in r.stdout and "split weight" in r.stdout, r.stdout
    doc = planner.read_cluster(cf)
    assert [x["rank"] for x in doc["ranks"]] == [0, 1]
    assert all(x["weight_gbps"] > 0 and set(x["gbps"]) == {"q4_0"} and x["avail_bytes"] > 0 for x in doc["ranks"])
    assert convert_main([str(fx), str(tmp_path / "split"), "--cluster", str(cf), "--no-progress", "--no-tokenizer"]) == 0
    sp = fmt.split_of(fmt.read_manifest(tmp_path / "split"), 2)
    assert sp["gbps"] == [x["weight_gbps"] for x in doc["ranks"]]


def test_bytes_per_weight_are_the_stored_bytes():
    """Every weight type the planner prices costs what mpillm stores for it (quant.nbytes), so a
    plan for a Q2_K or IQ4_XS model counts the bytes each rank will stream."""
    from mpillm.formats import quant

    assert set(planner.BYTES_PER_WEIGHT) >= {"q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "iq4_nl", "iq4_xs"}
    for t, b in planner.BYTES_PER_WEIGHT.items():
        assert b * 256 == quant.nbytes(t, 1, 256), t


def test_block_wait_cost_is_the_measured_one():
    """``--wait block``'s cost per sync is the one scripts/sync_bench.py measured between emulated
    hosts (block minus poll, per link, buffer type and exchange; median of 5 runs each), not a
    guess: the planner's 60 us before 2026-12-07 was 8x under every case measured (345-571 us).
    Control: BLOCK_WAKE_US = 60 fails."""
    rows = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" /
                       "sync_cost_np2_sendrecv_floor_2026-12-07.json").read_text())["rows"]
    med = {(r["profile"], r["buffer_type"], r["sync"], r["wait"]): sorted(r["us"])[len(r["us"]) // 2] for r in rows}
    extra = sorted(med[k] - med[k[:3] + ("poll",)] for k in med if k[3] == "block")
    assert len(extra) == 8
    assert extra[0] * 0.8 <= planner.BLOCK_WAKE_US <= extra[-1] * 1.2, (planner.BLOCK_WAKE_US, extra)
    link = planner.LINKS["1gbe"]
    diff = planner.sync_s(SMOL, 2, link, wait="block") - planner.sync_s(SMOL, 2, link, wait="poll")
    assert diff == pytest.approx(planner.BLOCK_WAKE_US * 1e-6)
