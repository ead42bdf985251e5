"""What a cluster will give before anyone buys it: a performance model of one generated token.

    python -m mpillm.planner --model llama-3.2-1b --node pi5 --link 1gbe --nodes 1 2 4 8
    python -m mpillm.planner --model DIR --cluster cluster.json          # a calibrated cluster
    python -m mpillm.planner --model qwen3-30b-a3b --node framework-desktop --link 5gbe --nodes 1 2 4

One token of generation on P ranks costs

    max over ranks (weight bytes the rank reads / its streaming speed + layers x per-layer cost)
  + (2 x layers + 1) x sync(message, P, link)         two syncs per layer + the embedding's
  + bcast(step, P, link) + gather(16 bytes, P, link)  the step's plan (one broadcast for a decode
                                                      step), the argmax back to rank 0

The weight bytes per rank come from the partition the converter would write
(``partition.plan``, uneven when the cluster is), so a slow rank shows up as the max. A sync
is Open MPI's choice between recursive doubling (log2 P rounds of the whole message; small
messages) and a ring (2(P-1) rounds of 1/P of it; large ones), each round paying the
link's one-way latency plus the per-message cost of the MPI/TCP stack, and the bytes at the
link's goodput. (On the emulated links an Allreduce of 2304 B between 2 ranks measured about one
full RTT, not half, even with recursive doubling: the link model may under-predict the syncs by
up to 2x; ``--cluster`` with the Allreduce timings measured on the real ranks avoids the model.)
``--buffer-type f16|q8_0`` exchange compressed partials as one message per rank (each rank
receives (P-1) shares). ``--sync p2p`` (the engine's choice from 3 ranks for small messages, as
distributed-llama's sync) is one round whatever P: a latency, then the (P-1) messages each rank
sends and receives at the link's rate. ``--wait block`` adds ``BLOCK_WAKE_US`` per sync, as measured
over TCP (a rank that sleeps between tests moves the exchange along only when it wakes). The link figures are the
emulated cluster's profiles (tests/cluster/netns.py), whose round trips and rates the
link tests check on real packets; the node figures are cited in the README.

It also writes and reads the cluster file of ``mpillm.check --calibrate`` and fits a split
to the ranks' memory (``fit_memory``), which ``python -m convert --cluster`` uses.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from mpillm.formats import partition, quant
from mpillm.formats.config import ModelConfig
from mpillm.runtime.exchange import choose_algorithm, message_bytes

CLUSTER_FORMAT = "mpillm-cluster"
# --wait block: what a sync costs more than polling, measured between 2 emulated hosts (1gbe, 5gbe;
# f32 and q8_0; Allreduce and p2p: 345-571 us, median 460; scripts/sync_bench.py, 5 runs,
# benchmarks/results/sync_cost_np2_sendrecv_floor_2026-12-07.json). Not one late wake-up: MPI over
# TCP progresses only inside the tests between the naps, and an exchange needs several.
BLOCK_WAKE_US = 460.0
CLUSTER_VERSION = 1
# Resident memory of a rank besides weights and KV cache (mpillm.check's figure)
RUNTIME_OVERHEAD = 256 * 2**20
# every type the converter stores, at its stored size (mpillm.formats.quant's split layouts; a
# Q4_K_M file is a mix: q4_K bounds it below)
BYTES_PER_WEIGHT = {t: quant.nbytes(t, 1, 256) / 256 for t in (
    "q4_0", "q4_1", "q8_0", "f16", "f32", "q5_0", "q5_1", "q4_K", "q5_K", "q6_K", "mxfp4", "q2_K", "q3_K",
    "iq4_nl", "iq4_xs")}


@dataclass(frozen=True)
class Link:
    name: str
    rtt_us: float          # small-packet round trip, end to end
    goodput_bps: float     # bulk TCP rate
    stack_us: float = 25.0  # per message and round: Open MPI ob1/TCP send + receive path (a 2 KiB
    #                         Allreduce between two emulated hosts on a bare veth bridge took 17-22 us
    #                         here in round 1: the stack's cost with next to no wire)


# the same figures as the emulated profiles (tests/cluster/netns.py PROFILES; sources in the README)
LINKS = {
    "1gbe": Link("1gbe", 300, 940e6),
    "2.5gbe": Link("2.5gbe", 250, 2.35e9),
    "5gbe": Link("5gbe", 250, 4.7e9),
    "10gbe": Link("10gbe", 200, 9.4e9),
    "thunderbolt": Link("thunderbolt", 300, 9.4e9),
    "wifi": Link("wifi", 4000, 560e6),
    "shm": Link("shm", 0, 40e9, 2.0),   # ranks on one host (shared memory)
}


@dataclass(frozen=True)
class Node:
    name: str
    stream_gbps: float      # memory bandwidth the kernels reach on this node (all cores of one rank)
    mem_bytes: float
    layer_us: float         # per layer and token, not counting weight streaming (norms, RoPE, dispatch)
    about: str


# Assumptions, each cited in the README ("Planner"): bandwidth the q4 kernels reach, memory a
# job can use, and the per-layer fixed cost scaled from this machine by single-core speed.
NODES = {
    "pi5": Node("pi5", 9.0, 8e9 - 1.2e9, 60.0, "Raspberry Pi 5 8 GB: LPDDR4X-4267 x32 (17 GB/s peak)"),
    "pi4": Node("pi4", 4.0, 8e9 - 1.2e9, 130.0, "Raspberry Pi 4 8 GB: LPDDR4-3200 x32 (12.8 GB/s peak), no dot product"),
    "framework-desktop": Node("framework-desktop", 110.0, 128e9 - 8e9, 12.0,
                              "Framework Desktop, Ryzen AI Max+ 395, 128 GB LPDDR5X-8000 x256"),
    "this-machine": Node("this-machine", 20.0, 16e9, 25.0, "this project's 2-core AVX-512 VM, one thread"),
}


# ----------------------------------------------------------------------------------------------
# communication
# ----------------------------------------------------------------------------------------------
def allreduce_s(nbytes: float, P: int, link: Link) -> float:
    """Seconds for one Allreduce of nbytes over P ranks (the cheaper of the two algorithms)."""
    if P <= 1:
        return 0.0
    lat = (link.rtt_us / 2 + link.stack_us) * 1e-6
    bw = link.goodput_bps / 8
    rounds = math.ceil(math.log2(P)) + (2 if P & (P - 1) else 0)   # non-power-of-two: fold in and out
    rd = rounds * (lat + nbytes / bw)
    ring = 2 * (P - 1) * (lat + nbytes / P / bw)
    return min(rd, ring)


def allgather_s(nbytes_each: float, P: int, link: Link) -> float:
    """Seconds for an Allgather where each rank contributes nbytes_each."""
    if P <= 1:
        return 0.0
    lat = (link.rtt_us / 2 + link.stack_us) * 1e-6
    bw = link.goodput_bps / 8
    rounds = math.ceil(math.log2(P))
    return min(rounds * lat + (P - 1) * nbytes_each / bw, (P - 1) * (lat + nbytes_each / bw))


def table_s(table: list, nbytes: float) -> float:
    """Seconds for an Allreduce of nbytes from a measured [[bytes, seconds], ...] table
    (mpillm.check's timings, kept in the cluster file): log-log interpolation, clamped at the ends."""
    pts = sorted((float(b), float(t)) for b, t in table if b > 0 and t > 0)
    if nbytes <= pts[0][0]:
        return pts[0][1]
    for (b0, t0), (b1, t1) in zip(pts, pts[1:]):
        if nbytes <= b1:
            f = math.log(nbytes / b0) / math.log(b1 / b0)
            return math.exp(math.log(t0) + f * math.log(t1 / t0))
    (b0, t0), (b1, t1) = pts[-2], pts[-1]
    return t1 * nbytes / b1


def p2p_s(nbytes_each: float, P: int, link: Link) -> float:
    """Seconds for the one-round exchange: every rank sends its nbytes_each to the P-1 others and
    receives theirs; one latency, the messages back to back on each rank's link."""
    if P <= 1:
        return 0.0
    lat = (link.rtt_us / 2 + link.stack_us) * 1e-6
    return lat + (P - 1) * nbytes_each / (link.goodput_bps / 8)


def bcast_s(nbytes: float, P: int, link: Link) -> float:
    """Seconds for a small broadcast from rank 0 (a binomial tree: ceil(log2 P) rounds)."""
    if P <= 1:
        return 0.0
    lat = (link.rtt_us / 2 + link.stack_us) * 1e-6
    return math.ceil(math.log2(P)) * (lat + nbytes / (link.goodput_bps / 8))


def gather_s(nbytes_each: float, P: int, link: Link) -> float:
    """Seconds for a small gather to rank 0 (every rank sends at once; rank 0 receives P-1)."""
    if P <= 1:
        return 0.0
    lat = (link.rtt_us / 2 + link.stack_us) * 1e-6
    return lat + (P - 1) * nbytes_each / (link.goodput_bps / 8)


def sync_algorithm(cfg: ModelConfig, P: int, buffer_type: str = "f32", sync: str = "auto") -> str:
    """The exchange the engine picks for one decode step's sync (mpillm.runtime.collectives)."""
    return choose_algorithm(sync, P, message_bytes(buffer_type, 1, cfg.dim))


def sync_s(cfg: ModelConfig, P: int, link: Link, buffer_type: str = "f32", table: list | None = None,
           sync: str = "auto", wait: str = "poll") -> float:
    """Seconds of one of the model's per-layer syncs (one generated token, T = 1); ``table`` a
    measured Allreduce table for these ranks (then the one-message exchanges of f16 / q8_0 and the
    p2p round are costed as Allreduces of the bytes each rank receives: all latency-bound at these
    sizes)."""
    if P <= 1:
        return 0.0
    m = message_bytes(buffer_type, 1, cfg.dim)
    algo = sync_algorithm(cfg, P, buffer_type, sync)
    wake = BLOCK_WAKE_US * 1e-6 if wait == "block" else 0.0
    if table:
        return wake + (table_s(table, m) if algo == "allreduce" and buffer_type in ("f32", "f64")
                       else table_s(table, m * (P - 1)))
    if algo == "p2p":
        return wake + p2p_s(m, P, link)
    if buffer_type in ("f32", "f64"):
        return wake + allreduce_s(m, P, link)
    return wake + allgather_s(m, P, link)   # f16, q8_0: one Allgather of the packed message


def step_s(P: int, link: Link, table: list | None = None) -> float:
    """Seconds of a decode step's own collectives: the plan's broadcast and the argmax's gather."""
    if P <= 1:
        return 0.0
    if table:
        return table_s(table, 672) + table_s(table, 16)
    return bcast_s(672, P, link) + gather_s(16, P, link)


def comm_s(cfg: ModelConfig, P: int, link: Link, buffer_type: str = "f32", table: list | None = None,
           sync: str = "auto", wait: str = "poll") -> float:
    if P <= 1:
        return 0.0
    n_sync = 2 * cfg.n_layers + 1
    return n_sync * sync_s(cfg, P, link, buffer_type, table, sync, wait) + step_s(P, link, table)


def rounds_per_token(cfg: ModelConfig, P: int, buffer_type: str = "f32", sync: str = "auto") -> dict:
    """Latency rounds one generated token pays (the quantity a slow link multiplies): the syncs'
    rounds plus the step's broadcast and gather."""
    if P <= 1:
        return {"syncs": 0, "per_sync": 0, "step": 0, "total": 0}
    algo = sync_algorithm(cfg, P, buffer_type, sync)
    pow2 = P & (P - 1) == 0
    if algo == "p2p":
        per = 1
    elif buffer_type in ("f32", "f64"):
        per = math.ceil(math.log2(P)) + (0 if pow2 else 2)     # recursive doubling
    else:
        per = math.ceil(math.log2(P))                          # Allgather (recursive doubling / Bruck)
    n_sync = 2 * cfg.n_layers + 1
    step = math.ceil(math.log2(P)) + 1                         # the plan's broadcast, the argmax's gather
    return {"syncs": n_sync, "per_sync": per, "step": step, "total": n_sync * per + step}


# ----------------------------------------------------------------------------------------------
# compute
# ----------------------------------------------------------------------------------------------
def rank_read_bytes(cfg: ModelConfig, rs: partition.RankSlice, wtype: str = "q4_0") -> float:
    """Weight bytes one rank streams per generated token."""
    return sum(partition.rank_elements(cfg, rs).values()) * BYTES_PER_WEIGHT[wtype]


def rank_stored_bytes(cfg: ModelConfig, rs: partition.RankSlice, wtype: str = "q4_0") -> float:
    """Bytes of a rank's shard (every expert's slice, the embedding and the output rows)."""
    router = cfg.n_layers * cfg.n_experts * cfg.dim * 4 if cfg.is_moe else 0
    return partition.rank_stored_elements(cfg, rs) * BYTES_PER_WEIGHT[wtype] + router


def kv_bytes(cfg: ModelConfig, rs: partition.RankSlice, max_seq_len: int, kv_type: str = "f16") -> int:
    """The KV cache of one rank (deepseek2: the latent, the same on every rank)."""
    return cfg.n_layers * cfg.kv_values_per_token(rs.n_kv_heads_per_partition) * max_seq_len * (2 if kv_type == "f16" else 4)


def predict(cfg: ModelConfig, speeds_gbps: list[float], link: Link, wtype: str = "q4_0",
            buffer_type: str = "f32", weights=None, layer_us=None, table: list | None = None,
            sync: str = "auto", wait: str = "poll") -> dict:
    """Predicted ms per generated token on len(speeds_gbps) ranks with the given streaming speeds
    (GB/s); ``weights`` the split (default: even), ``layer_us`` per-rank fixed cost per layer,
    ``table`` measured Allreduce timings to use instead of the link model."""
    P = len(speeds_gbps)
    slices = partition.plan(cfg, P, weights)
    layer_us = layer_us or [0.0] * P
    comp = [rank_read_bytes(cfg, rs, wtype) / (s * 1e9) + cfg.n_layers * lu * 1e-6
            for rs, s, lu in zip(slices, speeds_gbps, layer_us)]
    comm = comm_s(cfg, P, link, buffer_type, table, sync, wait)
    total = max(comp) + comm
    return {"ranks": P, "compute_ms": [round(c * 1e3, 3) for c in comp], "comm_ms": round(comm * 1e3, 3),
            "ms_per_token": round(total * 1e3, 3), "tok_s": round(1.0 / total, 2),
            "sync_us": round(sync_s(cfg, P, link, buffer_type, table, sync, wait) * 1e6, 1) if P > 1 else 0.0,
            "sync": sync_algorithm(cfg, P, buffer_type, sync) if P > 1 else "none",
            "rounds_per_token": rounds_per_token(cfg, P, buffer_type, sync)["total"]}


def ideal_weights(speeds: list[float]) -> list[float]:
    return [float(s) for s in speeds]


# ----------------------------------------------------------------------------------------------
# cluster file and memory
# ----------------------------------------------------------------------------------------------
def write_cluster(path: Path, ranks: list[dict], allreduce: list | None = None, model: str | None = None,
                  weight_types: dict | None = None, p2p: list | None = None, sync: dict | None = None) -> None:
    """The cluster file: ranks' speeds and memory, the measured Allreduce and p2p exchange per
    message size ([[bytes, seconds], ...]), and ``sync``: per rank count the faster exchange per
    size ({"P": [[up to bytes, "allreduce" | "p2p"], ...]}), which the engine's --sync auto uses
    when given ``--cluster``."""
    doc = {"format": CLUSTER_FORMAT, "version": CLUSTER_VERSION, "model": model, "weight_types": weight_types or {},
           "ranks": ranks, "allreduce": allreduce or [], "p2p": p2p or [], "sync": sync or {}}
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def read_cluster(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cluster file {path}: {e}") from None
    if doc.get("format") != CLUSTER_FORMAT or doc.get("version") != CLUSTER_VERSION:
        raise ValueError(f"{path} is not an mpillm cluster file (write one with `mpillm.check --calibrate`)")
    ranks = doc.get("ranks") or []
    for i, r in enumerate(ranks):
        if r.get("rank") != i or not r.get("weight_gbps", 0) > 0:
            raise ValueError(f"{path}: rank entry {i} is malformed: {r}")
    return doc


def fit_memory(cfg: ModelConfig, weights: list[float], avail: list[float], wtype: str, max_seq_len: int,
               adjust: bool = True, kv_type: str = "f16") -> list[float]:
    """Split weights such that every rank's shard + KV cache + runtime fit its memory.

    ``adjust``: lower an over-full rank's weight (its work moves to the others) until all
    fit; without it (an explicit --split) the split is only checked. Raises ValueError naming
    the rank and the numbers when no split fits."""
    w = [float(x) for x in weights]
    for _ in range(60):
        slices = partition.plan(cfg, len(w), w)
        need = [rank_stored_bytes(cfg, rs, wtype) + kv_bytes(cfg, rs, max_seq_len, kv_type) + RUNTIME_OVERHEAD
                for rs in slices]
        over = [(r, n, a) for r, (n, a) in enumerate(zip(need, avail)) if n > a]
        if not over:
            return w
        if not adjust or all(n > a for n, a in zip(need, avail)):
            break
        for r, n, a in over:
            w[r] *= max(0.5, 0.97 * a / n)
        if min(w) <= 1e-6 * max(w):
            break
    r, n, a = over[0]
    detail = "; ".join(f"rank {r} needs {n / 2**20:,.0f} MiB, has {a / 2**20:,.0f} MiB" for r, n, a in over)
    what = "the split" if not adjust else "no split of the model over these ranks"
    raise ValueError(f"{what} does not fit in memory: {detail} (shard + KV cache at max-seq-len {max_seq_len} "
                     f"+ {RUNTIME_OVERHEAD // 2**20} MiB runtime)")


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def model_config(name: str) -> tuple[ModelConfig, str]:
    """A shape name (synth shapes, ``smollm2-135m``) or a converted model directory -> (config, weight type)."""
    if name == "smollm2-135m":
        return ModelConfig("llama", 576, 30, 9, 3, 64, 1536, 49152, 100000.0, tied_embeddings=True), "q4_1"
    p = Path(name)
    if p.is_dir():
        from mpillm.formats import format as fmt

        m = fmt.read_manifest(p)
        wt = m.get("weight_type", "q4_0")
        return ModelConfig.from_dict(m["config"]), wt if wt in BYTES_PER_WEIGHT else "q4_0"
    from convert.synth import SHAPES

    if name not in SHAPES:
        raise ValueError(f"unknown model {name!r}: a converted model directory or one of "
                         f"smollm2-135m, {', '.join(SHAPES)}")
    return ModelConfig(**SHAPES[name]), "q4_0"


def table(cfg: ModelConfig, node: Node, link: Link, counts: list[int], wtype: str, buffer_type: str,
          max_seq_len: int = 4096, sync: str = "auto", wait: str = "poll") -> list[dict]:
    rows = []
    for n in counts:
        try:
            partition.check_world_size(cfg, n)
        except ValueError as e:
            rows.append({"nodes": n, "error": str(e)})
            continue
        r = predict(cfg, [node.stream_gbps] * n, link if n > 1 else LINKS["shm"], wtype, buffer_type,
                    layer_us=[node.layer_us] * n, sync=sync, wait=wait)
        rs = partition.plan(cfg, n)
        need = max(rank_stored_bytes(cfg, s, wtype) + kv_bytes(cfg, s, max_seq_len) + RUNTIME_OVERHEAD for s in rs)
        r.update(nodes=n, fits=need <= node.mem_bytes, need_gb=round(need / 1e9, 2))
        rows.append(r)
    return rows


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    prev = None
    for r in rows:
        if "error" in r:
            out.append(f"{r['nodes']} nodes: {r['error']}")
            continue
        if not r["fits"]:
            out.append(f"{r['nodes']} node(s): does not fit ({r['need_gb']} GB per node needed)")
        if prev is not None and prev["fits"] and r["tok_s"] < prev["tok_s"]:
            out.append(f"going from {prev['nodes']} to {r['nodes']} nodes makes it SLOWER "
                       f"({prev['tok_s']} -> {r['tok_s']} tok/s): the syncs cost {r['comm_ms']} ms per token, "
                       f"more than the {round(max(prev['compute_ms']) - max(r['compute_ms']), 2)} ms of compute saved")
        prev = r
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpillm.planner", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="converted model directory, or a shape: smollm2-135m, llama-3.2-1b, llama-3.1-8b, qwen3-30b-a3b")
    p.add_argument("--node", choices=list(NODES), default="pi5", help="node type (default: %(default)s)")
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8], help="node counts to compare")
    p.add_argument("--link", choices=[k for k in LINKS if k != "shm"], default=None,
                   help="link profile (default: 1gbe; with --cluster: the Allreduce timings in the file)")
    p.add_argument("--layer-us", type=float, default=None,
                   help="with --cluster: fixed cost per layer and token on these ranks (default: 0)")
    p.add_argument("--cluster", type=Path, default=None,
                   help="a cluster file from `mpillm.check --calibrate`: predict for its measured ranks")
    p.add_argument("--weight-type", choices=list(BYTES_PER_WEIGHT), default=None,
                   help="weight type (default: the model's, q4_0 for shapes)")
    p.add_argument("--buffer-type", choices=["f32", "f16", "q8_0"], default="f32")
    p.add_argument("--sync", choices=["auto", "allreduce", "p2p"], default="auto",
                   help="the sync exchange to model, as the engine's --sync (default: %(default)s)")
    p.add_argument("--wait", choices=["poll", "block"], default="poll",
                   help="how waiting ranks wait, as the engine's --wait (default: %(default)s)")
    p.add_argument("--max-seq-len", type=int, default=4096, help="KV cache length for the memory check")
    p.add_argument("--json", action="store_true", help="print JSON only")
    a = p.parse_args(argv)
    try:
        cfg, wt = model_config(a.model)
    except ValueError as e:
        print(f"planner: error: {e}", file=sys.stderr)
        return 2
    wt = a.weight_type or wt
    link = LINKS[a.link or "1gbe"]
    if a.cluster:
        doc = read_cluster(a.cluster)
        speeds = [r["weight_gbps"] for r in doc["ranks"]]
        ar_table = doc.get("allreduce") if a.link is None else None
        lu = [a.layer_us or 0.0] * len(speeds)
        kw = dict(layer_us=lu, table=ar_table, sync=a.sync, wait=a.wait)
        even = predict(cfg, speeds, link, wt, a.buffer_type, **kw)
        split = predict(cfg, speeds, link, wt, a.buffer_type, weights=speeds, **kw)
        out = {"model": a.model, "link": "measured Allreduce table" if ar_table else a.link or "1gbe",
               "speeds_gbps": speeds, "even": even, "calibrated_split": split}
        if a.json:
            print(json.dumps(out))
            return 0
        print(f"{a.model} on {len(speeds)} calibrated ranks ({', '.join(f'{s:.1f}' for s in speeds)} GB/s), "
              f"{out['link']}:")
        for k in ("even", "calibrated_split"):
            r = out[k]
            print(f"  {k:>16}: {r['tok_s']:7.1f} tok/s = {r['ms_per_token']:.2f} ms/token "
                  f"(compute per rank {r['compute_ms']} ms, comm {r['comm_ms']} ms)")
        return 0
    node = NODES[a.node]
    rows = table(cfg, node, link, a.nodes, wt, a.buffer_type, a.max_seq_len, a.sync, a.wait)
    if a.json:
        print(json.dumps({"model": a.model, "node": a.node, "link": a.link, "weight_type": wt,
                          "buffer_type": a.buffer_type, "rows": rows}))
        return 0
    print(f"{a.model} ({wt}) on {node.about}, {node.stream_gbps} GB/s each, linked by {a.link} "
          f"(RTT {link.rtt_us:.0f} us, {link.goodput_bps / 1e9:.2f} Gbit/s), {a.buffer_type} syncs "
          f"(--sync {a.sync}, --wait {a.wait}):")
    print(f"  {'nodes':>5} {'tok/s':>8} {'ms/token':>9} {'compute':>9} {'comm':>8} {'per sync':>9} {'exchange':>9} "
          f"{'rounds':>6} {'GB/node':>8}")
    for r in rows:
        if "error" in r:
            print(f"  {r['nodes']:>5}  {r['error']}")
            continue
        print(f"  {r['nodes']:>5} {r['tok_s']:>8.1f} {r['ms_per_token']:>9.2f} {max(r['compute_ms']):>9.2f} "
              f"{r['comm_ms']:>8.2f} {r['sync_us']:>7.0f}us {r['sync']:>9} {r['rounds_per_token']:>6} "
              f"{r['need_gb']:>8.2f}{'' if r['fits'] else '  (does not fit)'}")
    for v in verdicts(rows):
        print(f"  - {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
