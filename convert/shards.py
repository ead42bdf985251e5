"""Write a model directory: one HDF5 shard per rank for each world size asked for."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from mpillm.formats import format as fmt
from mpillm.formats import quant
from mpillm.formats.partition import RankSlice, plan

from . import names as N
from .sources import SrcTensor

WEIGHT_TYPE_CHOICES = ("auto",) + quant.QUANTIZABLE


def target_type(name: str, src: SrcTensor, weight_type: str, vector: bool) -> str:
    """The type a tensor is stored in. ``auto`` keeps a supported source type bit-exactly. MXFP4
    tensors (gpt-oss's experts, 4.25 bits) stay MXFP4 whatever --weight-type says: it sets the
    type of the others (e.g. q8_0 attention and embeddings, as the released gpt-oss GGUFs)."""
    if vector:
        return "f32"
    if N.pattern_of(name) == "layers/{i}/router":
        return src.wtype if src.wtype in ("f32", "f16") else "f32"  # tiny; keep routing exact
    if src.wtype == "mxfp4":
        return "mxfp4"
    if weight_type != "auto":
        return weight_type
    if src.wtype is not None:
        return src.wtype
    if src.src_type in ("BF16", "F64"):
        return "f32"
    raise ValueError(f"tensor {name} has type {src.src_type}, which mpillm does not store (stored as they "
                     f"are: {', '.join(t for t in quant.WEIGHT_TYPES if not t.endswith('_32'))}); pass "
                     f"--weight-type {'|'.join(quant.QUANTIZABLE)} to requantize the model")


def _ranges(kind: str, rs: RankSlice, cfg) -> tuple[str, int, int] | None:
    """(axis, start, stop) of a rank's slice for a split kind; None when replicated."""
    hd, od = cfg.head_dim, cfg.o_head_dim
    return {
        "replicated": None,
        "vocab_rows": ("rows",) + rs.vocab,
        "q_rows": ("rows", rs.heads[0] * hd, rs.heads[1] * hd),
        "kv_rows": ("rows", rs.kv_heads[0] * hd, rs.kv_heads[1] * hd),
        "q_cols": ("cols", rs.heads[0] * od, rs.heads[1] * od),
        "q_lead": ("lead",) + rs.heads,
        "ffn_rows": ("rows",) + rs.ffn,
        "ffn_cols": ("cols",) + rs.ffn,
        "exp_rows": ("rows",) + rs.expert_ffn,
        "exp_cols": ("cols",) + rs.expert_ffn,
        # vectors and (E, n) bias tables: along the last axis
        "q_vec": ("cols", rs.heads[0] * hd, rs.heads[1] * hd),
        "kv_vec": ("cols", rs.kv_heads[0] * hd, rs.kv_heads[1] * hd),
        "q_heads": ("cols",) + rs.heads,
        "exp_vec": ("cols",) + rs.expert_ffn,
    }[kind]


def slice_arrays(arrays: dict, wtype: str, axis: str, start: int, stop: int) -> tuple[dict, str]:
    """Slice split-layout arrays along logical rows or (32-aligned) columns -> (arrays, type).

    A K-quant cut inside a 256-wide super-block is first re-encoded losslessly as its ``_32``
    variant (super-block scales repeated per 32-block; see mpillm.formats.quant), so the type can change."""
    if axis == "rows":
        return {k: v[..., start:stop, :] for k, v in arrays.items()}, wtype
    if axis == "lead":
        return {k: v[start:stop] for k, v in arrays.items()}, wtype
    if wtype in quant.K_TYPES and (start % quant.QK_K or stop % quant.QK_K):
        arrays, wtype = quant.to_per32(arrays, wtype)
    cols = _logical_cols(arrays, wtype)
    out = {}
    for k, v in arrays.items():
        per = cols // v.shape[-1]  # logical columns per array column
        if k != "w" and (start % quant.QK or stop % quant.QK):
            raise ValueError(f"column slice [{start}, {stop}) does not fall on {quant.QK}-blocks")
        out[k] = v[..., start // per:stop // per]
    return out, wtype


def as_float(arrays: dict, wtype: str) -> np.ndarray:
    """Split-layout arrays (leading expert axis allowed) -> float32 values."""
    if wtype in ("f32", "f16"):
        return np.asarray(arrays["w"], dtype=np.float32)
    first = next(iter(arrays.values()))
    lead, rows = first.shape[:-2], first.shape[-2]
    flat = {k: np.asarray(v).reshape(-1, v.shape[-1]) for k, v in arrays.items()}
    vals = quant.dequantize(flat, wtype)
    return vals.reshape(*lead, rows, vals.shape[-1])


def to_type(arrays: dict, src_type: str, wtype: str) -> dict:
    """Convert a (sliced) tensor to wtype; a tensor already in wtype passes through untouched."""
    if src_type == wtype:
        return arrays
    vals = as_float(arrays, src_type)
    lead, (rows, cols) = vals.shape[:-2], vals.shape[-2:]
    q = quant.quantize(vals.reshape(-1, cols), wtype)
    return {k: v.reshape(*lead, rows, v.shape[-1]) for k, v in q.items()}


def convert_model(source, out_dir: Path, world_sizes: list[int], weight_type: str = "auto",
                  ranks: list[int] | None = None, progress: bool = True, write_tokenizer=None,
                  splits: dict | None = None) -> None:
    """Write shards (all ranks, or only ``ranks``) for every world size, then the manifest.
    ``splits``: world size -> {"weights": [...], "gbps": [...] or None} for uneven splits."""
    cfg = source.config
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = splits or {}
    plans = {ws: plan(cfg, ws, (splits.get(ws) or {}).get("weights")) for ws in world_sizes}  # raises if impossible
    writers: list[tuple[RankSlice, fmt.ShardWriter]] = []
    try:
        for ws, slices in plans.items():
            for rs in slices:
                if ranks is not None and rs.tp_rank not in ranks:
                    continue
                writers.append((rs, fmt.ShardWriter(out_dir / fmt.shard_relpath(ws, rs.tp_rank), cfg, ws,
                                                    rs.tp_rank, json.dumps(dataclasses.asdict(rs)))))
        names = source.names
        if progress:
            from tqdm import tqdm

            names = tqdm(names, desc=f"converting for world sizes {world_sizes}", unit="tensor")
        for name in names:
            src = source.load(name)
            vector = ((src.values if src.values is not None else next(iter(src.arrays.values()))).ndim == 1
                      or N.pattern_of(name) in N.VECTOR_TABLES)
            wtype = target_type(name, src, weight_type, vector)
            kind = N.SPLIT[N.pattern_of(name)]
            data, dtype = (src.arrays, src.wtype) if src.arrays is not None else ({"w": src.values}, "f32")
            if vector:  # norms, biases, sinks: f32, whole or this rank's part of the last axis
                full = {"w": as_float(data, dtype)}
                for rs, w in writers:
                    rng = _ranges(kind, rs, cfg)
                    part = full if rng is None else {"w": full["w"][..., rng[1]:rng[2]]}
                    w.add(name, "f32", part["w"].shape, part)
                continue
            shape = next(iter(data.values())).shape[:-1] + (_logical_cols(data, dtype),)
            for rs, w in writers:
                rng = _ranges(kind, rs, cfg)
                part, ptype = (data, dtype) if rng is None else slice_arrays(data, dtype, *rng)
                stype = ptype if wtype == dtype else wtype
                if ptype != dtype and stype == ptype:
                    w.note(f"{name}: {dtype} stored as {ptype} (columns [{rng[1]}, {rng[2]}) cut "
                           f"{quant.QK_K}-wide super-blocks; same values, scales per {quant.QK} columns)")
                stored = to_type(part, ptype, stype)
                pshape = shape if rng is None else _sliced_shape(shape, *rng)
                w.add(name, stype, pshape, stored)
        for _, w in writers:
            w.close()
    except BaseException:
        for _, w in writers:
            if w.f.id.valid:
                w.abort()
        raise
    fmt.write_manifest(out_dir, cfg, list(world_sizes), source=str(getattr(source, "path", "synthetic")),
                       extra={"weight_type": weight_type,
                              fmt.MANIFEST_SPLITS: _merged_splits(out_dir, cfg, world_sizes, splits)})
    if write_tokenizer is not None:
        write_tokenizer(out_dir)


def _merged_splits(out_dir: Path, cfg, world_sizes: list[int], splits: dict) -> dict:
    """The manifest's splits: earlier world sizes keep theirs, the ones written now get the new
    split (or none: even)."""
    old = {}
    if (out_dir / fmt.MANIFEST_FILE).exists():
        m = fmt.read_manifest(out_dir)
        if type(cfg).from_dict(m["config"]).to_dict() == cfg.to_dict():  # as read back (newer fields defaulted)
            old = dict(m.get(fmt.MANIFEST_SPLITS) or {})
    for ws in world_sizes:
        old.pop(str(ws), None)
        if splits.get(ws):
            old[str(ws)] = {"weights": list(splits[ws]["weights"]), "gbps": splits[ws].get("gbps")}
    return old


def _logical_cols(arrays: dict, wtype: str) -> int:
    if "w" in arrays:
        return arrays["w"].shape[-1]
    return arrays["qs"].shape[-1] // quant.QS_BYTES[wtype] * quant.QK


def _sliced_shape(shape: tuple, axis: str, start: int, stop: int) -> tuple:
    if axis == "rows":
        return shape[:-2] + (stop - start, shape[-1])
    if axis == "lead":
        return (stop - start,) + shape[1:]
    return shape[:-1] + (stop - start,)
