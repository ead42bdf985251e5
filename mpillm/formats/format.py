"""The shard file format: constants, a writer that enforces them, a validating reader.

A converted model is a directory:

  manifest.json           format, version, config, world sizes and their shard files
  tokenizer.json | tokenizer.model, tokenizer_config.json
  ws{N}/rank{R}.h5        one HDF5 shard per rank for world size N

A shard holds root attributes (ATTR_*) and one HDF5 group per tensor, named as
in TENSOR_PATTERNS. The group's attributes give the weight type and logical
shape; its datasets are the split-layout arrays of mpillm.formats.quant (``qs``, ``d``,
``m`` or ``w``), contiguous, uncompressed and aligned to 4 KiB so each rank
memory-maps them (np.memmap at the dataset's file offset) without a copy.
Expert tensors carry a leading expert axis: shape (n_experts, rows, cols).

Each tensor group carries a checksum attribute (``xxh3_64:<16 hex digits>``): XXH3-64 over
its arrays' bytes in sorted array-name order, written by ShardWriter and checked by
``Shard.verify`` (``python -m mpillm.check``, ``--verify``). Shards written before checksums
existed have none: they read as before, and verify reports them unverifiable, never intact.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpillm.formats import quant
from mpillm.formats.config import ModelConfig

FORMAT_NAME = "mpillm-shard"
FORMAT_VERSION = 3  # 3: q3_K's codes as 3-bit fields (formats/quant.py); 2: q5_K's and q6_K's qh in the
# kernels' orders; 1: element-order bit masks
READ_VERSIONS = (1, 2, 3)  # older shards are read with those arrays re-encoded in memory (Shard._map)
MANIFEST_NAME = "mpillm-model"
MANIFEST_FILE = "manifest.json"
MANIFEST_SPLITS = "splits"       # world size -> {"weights": per-rank split weights, "gbps": measured speeds}
ALIGNMENT = 4096

ATTR_FORMAT = "format"
ATTR_VERSION = "format_version"
ATTR_WORLD_SIZE = "world_size"
ATTR_RANK = "rank"
ATTR_CONFIG = "config"
ATTR_SLICE = "slice"           # the RankSlice this shard holds, JSON
ATTR_NOTES = "notes"           # JSON list of what the converter changed for this rank (lossless
                               # re-encodings, e.g. a K-quant cut by the column split), optional
T_ATTR_TYPE = "type"
T_ATTR_SHAPE = "shape"
T_ATTR_CHECKSUM = "checksum"    # "<algorithm>:<hex digest>" over the tensor's arrays
CHECKSUM_ALGORITHM = "xxh3_64"
_CHUNK = 64 << 20               # bytes hashed per update (bounded memory, progress granularity)

# Internal tensor names ({i}: layer index). Everything else in a shard is an error.
TENSOR_PATTERNS = (
    "tok_embd",            # (vocab_per_partition, dim)  vocabulary-parallel embedding
    "output",              # (vocab_per_partition, dim)  untied output projection
    "output_norm",         # (dim,)
    "rope_freqs",          # (head_dim / 2,)  per-frequency RoPE divisors (Llama 3.x), optional
    "layers/{i}/attn_norm",  # (dim,)
    "layers/{i}/wq",       # (n_heads_per_partition * head_dim, dim)     column-parallel
    "layers/{i}/wk",       # (n_kv_heads_per_partition * head_dim, dim)
    "layers/{i}/wv",       # (n_kv_heads_per_partition * head_dim, dim)
    "layers/{i}/wo",       # (dim, n_heads_per_partition * head_dim)     row-parallel
    "layers/{i}/bq",       # (n_heads_per_partition * head_dim,)  optional q/k/v biases (Qwen2, gpt-oss),
    "layers/{i}/bk",       # (n_kv_heads_per_partition * head_dim,)   sliced with their heads
    "layers/{i}/bv",       # (n_kv_heads_per_partition * head_dim,)   like wq / wk / wv
    "layers/{i}/q_norm",   # (head_dim,)  Qwen3
    "layers/{i}/k_norm",   # (head_dim,)  Qwen3
    "layers/{i}/ffn_norm",  # (dim,)
    "layers/{i}/w_gate",   # (ffn_per_partition, dim)                    column-parallel
    "layers/{i}/w_up",     # (ffn_per_partition, dim)
    "layers/{i}/w_down",   # (dim, ffn_per_partition)                    row-parallel
    "layers/{i}/router",   # (n_experts, dim)  replicated
    "layers/{i}/exp_gate",  # (n_experts, expert_ffn_per_partition, dim)
    "layers/{i}/exp_up",   # (n_experts, expert_ffn_per_partition, dim)
    "layers/{i}/exp_down",  # (n_experts, dim, expert_ffn_per_partition)
    # gpt-oss (f32 vectors; convert/names.py has their splits)
    "layers/{i}/bo",       # (dim,)  o_proj bias, replicated, added once after Allreduce #1
    "layers/{i}/sinks",    # (n_heads_per_partition,)  learned sink logit per query head
    "layers/{i}/router_b",  # (n_experts,)  router bias, replicated
    "layers/{i}/exp_gate_b",  # (n_experts, expert_ffn_per_partition)
    "layers/{i}/exp_up_b",  # (n_experts, expert_ffn_per_partition)
    "layers/{i}/exp_down_b",  # (n_experts, dim)  replicated, added once after Allreduce #2
    # deepseek2: multi-head latent attention (wq or wq_a/q_a_norm/wq_b; wo as above with v_head_dim per
    # head), the sigmoid router's correction bias, the shared experts (layers before n_dense_layers
    # are dense: w_gate/w_up/w_down)
    "layers/{i}/wq_a",     # (q_lora_rank, dim)  replicated
    "layers/{i}/q_a_norm",  # (q_lora_rank,)
    "layers/{i}/wq_b",     # (n_heads_per_partition * head_dim, q_lora_rank)  column-parallel
    "layers/{i}/wkv_a",    # (kv_lora_rank + qk_rope_dim, dim)  replicated: the latent and the RoPE key
    "layers/{i}/kv_a_norm",  # (kv_lora_rank,)
    "layers/{i}/wk_b",     # (n_heads_per_partition, kv_lora_rank, qk_nope_dim)  kv_b's key rows, transposed
    "layers/{i}/wv_b",     # (n_heads_per_partition, v_head_dim, kv_lora_rank)  kv_b's value rows
    "layers/{i}/router_corr",  # (n_experts,)  selection-only correction bias, replicated
    "layers/{i}/shexp_gate",  # (n_shared_experts, expert_ffn_per_partition, dim)
    "layers/{i}/shexp_up",  # (n_shared_experts, expert_ffn_per_partition, dim)
    "layers/{i}/shexp_down",  # (n_shared_experts, dim, expert_ffn_per_partition)
)
_NAME_RE = re.compile("^(" + "|".join(p.replace("{i}", r"\d+") for p in TENSOR_PATTERNS) + ")$")


def shard_relpath(world_size: int, rank: int) -> str:
    return f"ws{world_size}/rank{rank}.h5"


def check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise ValueError(f"unknown tensor name {name!r}")


@dataclass
class Tensor:
    """One weight: its type, logical shape and split-layout arrays (memory-mapped when read)."""
    name: str
    wtype: str
    shape: tuple[int, ...]          # (rows, cols), (n,) for vectors, (E, rows, cols) for experts
    arrays: dict[str, np.ndarray]
    checksum: str | None = None     # as stored in the shard; None: written before checksums existed
    stored: dict[str, np.ndarray] | None = None  # the arrays as stored when ``arrays`` re-encodes them

    @property
    def rows(self) -> int:
        return self.shape[-2] if len(self.shape) >= 2 else 1

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def checksum(arrays: dict[str, np.ndarray], progress=None) -> str:
    """XXH3-64 of the arrays' bytes (sorted by array name), read in chunks so a memory-mapped
    multi-GB tensor is hashed without a copy; ``progress(nbytes)`` is called after each chunk."""
    import xxhash

    h = xxhash.xxh3_64()
    for key in sorted(arrays):
        a = arrays[key]
        if not a.size:
            continue
        mv = memoryview(np.ascontiguousarray(a)).cast("B")
        for off in range(0, len(mv), _CHUNK):
            piece = mv[off:off + _CHUNK]
            h.update(piece)
            if progress is not None:
                progress(len(piece))
    return f"{CHECKSUM_ALGORITHM}:{h.hexdigest()}"


@dataclass
class VerifyResult:
    """What ``Shard.verify`` found: tensors whose bytes do not match their checksum, tensors
    without a checksum (older shards), and the bytes hashed."""
    path: Path
    bad: list[str]
    unverifiable: list[str]
    nbytes: int
    seconds: float

    @property
    def status(self) -> str:
        """"damaged", "unverifiable" (some tensors have no checksum) or "intact"."""
        return "damaged" if self.bad else "unverifiable" if self.unverifiable else "intact"

    def describe(self, rank: int | None = None) -> str:
        who = f"rank {rank}: " if rank is not None else ""
        if self.bad:
            more = f" (and {len(self.bad) - 3} more)" if len(self.bad) > 3 else ""
            return (f"{who}shard file {self.path} is damaged: tensor {', '.join(self.bad[:3])}{more} "
                    f"does not match its checksum; copy or convert it again")
        if self.unverifiable:
            return (f"{who}{self.path}: unverifiable, {len(self.unverifiable)} tensor(s) carry no checksum "
                    f"(written by an older converter; convert again to add them)")
        return f"{who}{self.path}: intact ({self.nbytes / 2**20:.1f} MiB checked in {self.seconds:.2f} s)"


def expected_arrays(wtype: str, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], str]]:
    if len(shape) == 1:
        if wtype not in ("f32", "f16"):
            raise ValueError(f"vectors are stored as f32 or f16, got {wtype}")
        return {"w": (tuple(shape), quant.ARRAYS[wtype][0][1])}
    lead, (rows, cols) = tuple(shape[:-2]), shape[-2:]
    return {k: (lead + s, dt) for k, (s, dt) in quant.array_shapes(wtype, rows, cols).items()}


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
class ShardWriter:
    """Writes one shard; the file appears under its final name only when closed successfully."""

    def __init__(self, path: Path, cfg: ModelConfig, world_size: int, rank: int, slice_json: str):
        import h5py

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        self.f = h5py.File(self.tmp, "w", alignment_threshold=ALIGNMENT, alignment_interval=ALIGNMENT)
        self.f.attrs[ATTR_FORMAT] = FORMAT_NAME
        self.f.attrs[ATTR_VERSION] = FORMAT_VERSION
        self.f.attrs[ATTR_WORLD_SIZE] = world_size
        self.f.attrs[ATTR_RANK] = rank
        self.f.attrs[ATTR_CONFIG] = cfg.to_json()
        self.f.attrs[ATTR_SLICE] = slice_json
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        """Record a change the converter made to this rank's tensors (printed in the plan)."""
        self.notes.append(text)
    def add(self, name: str, wtype: str, shape: tuple[int, ...], arrays: dict[str, np.ndarray]) -> None:
        check_name(name)
        want = expected_arrays(wtype, tuple(shape))
        if set(want) != set(arrays):
            raise ValueError(f"{name}: {wtype} needs arrays {sorted(want)}, got {sorted(arrays)}")
        g = self.f.create_group(name)
        g.attrs[T_ATTR_TYPE] = wtype
        g.attrs[T_ATTR_SHAPE] = np.asarray(shape, dtype=np.int64)
        for key, (s, dt) in want.items():
            a = np.ascontiguousarray(arrays[key], dtype=dt)
            if a.shape != s:
                raise ValueError(f"{name}/{key}: expected shape {s}, got {a.shape}")
            # data= makes the dataset contiguous and allocated, so it has a file offset
            g.create_dataset(key, data=a if a.size else None, shape=s, dtype=dt)
        g.attrs[T_ATTR_CHECKSUM] = checksum({k: np.ascontiguousarray(arrays[k], dtype=dt)
                                             for k, (_, dt) in want.items()})

    def close(self) -> None:
        self.f.attrs[ATTR_NOTES] = json.dumps(self.notes)
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.f.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def write_manifest(model_dir: Path, cfg: ModelConfig, world_sizes: list[int], source: str, extra: dict | None = None) -> None:
    """Create or update manifest.json, merging world sizes converted earlier."""
    path = Path(model_dir) / MANIFEST_FILE
    old = read_manifest(model_dir) if path.exists() else None
    sizes = set(world_sizes) | set(old["world_sizes"] if old else [])
    # compared as read back (fields added since the old manifest was written take their defaults)
    if old and ModelConfig.from_dict(old["config"]).to_dict() != cfg.to_dict():
        sizes = set(world_sizes)  # a different model in the same directory: drop the stale sizes
    m = {"format": MANIFEST_NAME, "format_version": FORMAT_VERSION, "config": cfg.to_dict(),
         "world_sizes": sorted(sizes), "source": source, **(extra or {})}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(m, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def split_of(manifest: dict, world_size: int) -> dict | None:
    """The uneven split a world size was converted with: {"weights": [...], "gbps": [...] or None},
    or None for the even split. ``partition.plan(cfg, ws, split["weights"])`` rebuilds the slices."""
    sp = (manifest.get(MANIFEST_SPLITS) or {}).get(str(world_size))
    if sp is None:
        return None
    if not isinstance(sp, dict) or len(sp.get("weights") or []) != world_size:
        raise ValueError(f"manifest: split for world size {world_size} is malformed: {sp}")
    return sp


def read_manifest(model_dir: Path) -> dict:
    path = Path(model_dir) / MANIFEST_FILE
    if not Path(model_dir).is_dir():
        raise ValueError(f"model directory {model_dir} does not exist")
    if not path.exists():
        raise ValueError(f"{model_dir} is not a converted mpillm model (no {MANIFEST_FILE}); "
                         f"convert it with `python -m convert`")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is corrupt: {e}") from None
    if m.get("format") != MANIFEST_NAME:
        raise ValueError(f"{path}: not an mpillm manifest")
    if m.get("format_version") not in READ_VERSIONS:
        raise ValueError(f"{path}: format version {m.get('format_version')}, this mpillm reads {READ_VERSIONS}; reconvert")
    ModelConfig.from_dict(m["config"])  # validates
    return m


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------
class Shard:
    """A rank's shard, opened read-only with every tensor memory-mapped."""

    def __init__(self, path: Path, world_size: int, rank: int):
        self.path = Path(path)
        self.tensors: dict[str, Tensor] = {}
        if not self.path.exists():
            raise ValueError(f"shard file {self.path} is missing")
        import h5py

        try:
            f = h5py.File(self.path, "r")
        except OSError as e:
            raise ValueError(f"shard file {self.path} is corrupt or not HDF5 ({e})") from None
        size = self.path.stat().st_size
        with f:
            try:
                attrs = dict(f.attrs)
            except Exception as e:  # noqa: BLE001 - h5py raises several types for damaged headers
                raise ValueError(f"shard file {self.path} is corrupt ({e})") from None
            if attrs.get(ATTR_FORMAT) != FORMAT_NAME:
                raise ValueError(f"{self.path} is not an mpillm shard (format attribute {attrs.get(ATTR_FORMAT)!r})")
            self.version = int(attrs.get(ATTR_VERSION, -1))
            if self.version not in READ_VERSIONS:
                raise ValueError(f"{self.path}: format version {attrs.get(ATTR_VERSION)}, expected one of {READ_VERSIONS}")
            ws, rk = int(attrs[ATTR_WORLD_SIZE]), int(attrs[ATTR_RANK])
            if ws != world_size or rk != rank:
                raise ValueError(f"{self.path} was converted for world size {ws} rank {rk}, "
                                 f"but this is rank {rank} of {world_size}")
            self.config = ModelConfig.from_json(attrs[ATTR_CONFIG])
            self.slice = json.loads(attrs[ATTR_SLICE])
            self.notes = json.loads(attrs.get(ATTR_NOTES, "[]"))
            try:
                f.visititems(lambda n, obj: self._map(n, obj, size))
            except ValueError:
                raise
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"shard file {self.path} is corrupt ({e})") from None
        if self.reencoded:
            # said in the plan under this rank's line: these arrays are copies in anonymous memory,
            # read and re-encoded at every start, not pages of the file
            n, b = len(self.reencoded), sum(self.reencoded.values())
            types = "/".join(sorted({self.tensors[k].wtype for k in self.reencoded}))
            self.notes.append(f"format-{self.version} shard: {b / 2**20:.1f} MiB of {n} {types} tensor(s) "
                              f"re-encoded into memory at load (resident, not mapped); reconvert to map them")

    def _map(self, name: str, obj, file_size: int) -> None:
        import h5py

        if not isinstance(obj, h5py.Group) or T_ATTR_TYPE not in obj.attrs:
            return
        check_name(name)
        wtype = str(obj.attrs[T_ATTR_TYPE])
        shape = tuple(int(s) for s in obj.attrs[T_ATTR_SHAPE])
        want = expected_arrays(wtype, shape)
        arrays = {}
        for key, (s, dt) in want.items():
            if key not in obj:
                raise ValueError(f"{self.path}: tensor {name} lacks its {key!r} array")
            ds = obj[key]
            if ds.shape != s or ds.dtype != np.dtype(dt):
                raise ValueError(f"{self.path}: {name}/{key} has shape {ds.shape} {ds.dtype}, expected {s} {dt}")
            if ds.size == 0:
                arrays[key] = np.zeros(s, dtype=dt)
                continue
            off = ds.id.get_offset()
            if off is None or ds.chunks is not None or ds.compression is not None:
                raise ValueError(f"{self.path}: {name}/{key} is not a contiguous dataset; reconvert")
            if off + ds.nbytes > file_size:
                raise ValueError(f"shard file {self.path} is truncated ({name}/{key} ends at byte "
                                 f"{off + ds.nbytes}, file has {file_size})")
            arrays[key] = np.memmap(self.path, dtype=dt, mode="r", offset=off, shape=s)
        ck = obj.attrs.get(T_ATTR_CHECKSUM)
        stored = None
        if self.version < 2 and quant.base_type(wtype) in quant.FORMAT1_QH and arrays["qh"].size:
            # format 1's q5_K / q6_K high bits: re-encoded into memory (lossless; reconverting the
            # model maps them from the file instead); the checksum stays over the bytes as stored
            stored = dict(arrays)
            arrays["qh"] = quant.qh_from_format1(arrays["qh"], wtype)
        if self.version < 3 and quant.base_type(wtype) == "q3_K" and arrays["qh"].size:
            # formats 1 and 2: q3_K's qs and qh re-encoded likewise (q2_K's qs and a bit mask before)
            stored = dict(arrays)
            arrays["qs"], arrays["qh"] = quant.q3_K_from_format2(arrays["qs"], arrays["qh"])
        self.tensors[name] = Tensor(name, wtype, shape, arrays, str(ck) if ck is not None else None, stored)

    def verify(self, progress=None) -> VerifyResult:
        """Hash every tensor's mapped bytes and compare with its stored checksum.
        ``progress(nbytes)`` is called as bytes are hashed (for a progress bar)."""
        import time

        t0 = time.perf_counter()
        bad, unverifiable, n = [], [], 0
        for name in sorted(self.tensors):
            t = self.tensors[name]
            n += t.nbytes
            if t.checksum is None:
                unverifiable.append(name)
                if progress is not None:
                    progress(t.nbytes)
                continue
            algo = t.checksum.split(":", 1)[0]
            if algo != CHECKSUM_ALGORITHM:
                raise ValueError(f"{self.path}: tensor {name} has a {algo!r} checksum; this mpillm knows "
                                 f"{CHECKSUM_ALGORITHM!r}")
            if checksum(t.stored or t.arrays, progress) != t.checksum:
                bad.append(name)
        return VerifyResult(self.path, bad, unverifiable, n, time.perf_counter() - t0)

    def get(self, name: str) -> Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise ValueError(f"{self.path}: tensor {name} is missing") from None

    def has(self, name: str) -> bool:
        return name in self.tensors

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def reencoded(self) -> dict[str, int]:
        """Tensor -> bytes of it re-encoded into memory at load (a shard of an older format)."""
        return {n: sum(v.nbytes for k, v in t.arrays.items() if v is not t.stored[k])
                for n, t in self.tensors.items() if t.stored is not None}
