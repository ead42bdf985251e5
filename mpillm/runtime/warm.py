"""The compile turn: kernels compiled once per CPU and model type, before the first token, never
twice at once.

numba compiles a kernel the first time it meets a new combination of argument types and
keeps the machine code in its cache (``NUMBA_CACHE_DIR``, keyed by the package sources:
see ``mpillm/__init__.py``); the whole-block functions (``mpillm.runtime.fused``) are generated per
combination of weight types. The first run on a machine therefore spends about a minute
compiling -- on every rank of the node at once, if nothing stops them.

``ensure_shard(shard, ..., compile_tiny)`` (called by the Engine before it loads, and by the
commands' start-up through ``mpillm.startup``) makes that happen at most once per node, outside
any MPI collective:

* a *signature* of what will be compiled (the weight types of each distinct layer, the
  embedding and output types, the architecture's options, KV cache and sync buffer types,
  the kernel path, whether this rank's weights will be repacked, and the CPU) names a marker
  file in the cache directory; if it exists the cache is warm and nothing happens (a few
  milliseconds);
* otherwise the rank takes a file lock in the cache directory: the first rank of the node
  compiles, the others wait and then find the marker and load from the cache;
* compiling means running a tiny model with the same weight types (a few KiB of random
  weights written in the real shard format) through a prompt step and a token step on
  ``COMM_SELF``, so every kernel the real model calls is compiled for the same types. The run
  itself is the engine's (``compile_tiny``, handed in by the caller: this module does not import
  the engine, which imports it).

``python -m mpillm.warmup`` (``scripts/setup.sh`` runs it) does this for the bundled model with
a progress bar; a run that has to compile says so first.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from mpillm.formats import format as fmt
from mpillm.kernels import jitcache

DEFAULT_ESTIMATE_S = 60.0   # the bundled model's kernels on a 2-core x86 machine: ~55 s


def cache_dir() -> Path:
    """numba's cache directory for these sources (set by mpillm/__init__.py)."""
    return jitcache.cache_dir()


def _layer_types(shard: fmt.Shard) -> list[dict[str, str]]:
    """The distinct weight-type combinations of the shard's layers (a model quantized with mixed
    types, e.g. a K-quant GGUF, has several), in first-use order."""
    per: dict[int, dict[str, str]] = {}
    for name, t in shard.tensors.items():
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == "layers":
            per.setdefault(int(parts[1]), {})[parts[2]] = t.wtype
    out: list[dict[str, str]] = []
    for i in sorted(per):
        if per[i] not in out:
            out.append(per[i])
    return out


def signature(shard: fmt.Shard, kv_type: str, buffer_type: str, repack: bool | None = None) -> dict:
    """What the kernels are compiled for; equal signatures compile identical code. ``repack``: whether
    the rank's weights will be repacked, as the Engine decided (None: decide here, by the same rule)."""
    from mpillm import kernels
    from mpillm.runtime.model import repack_decision

    if repack is None:
        repack = repack_decision(shard, buffer_type)[0]
    cfg = shard.config
    top = {n: shard.tensors[n].wtype for n in ("tok_embd", "output", "output_norm", "rope_freqs")
           if n in shard.tensors}
    return {"arch": cfg.arch, "qk_norm": cfg.qk_norm, "moe": cfg.is_moe, "tied": cfg.tied_embeddings,
            "top": top, "layers": _layer_types(shard), "kv_type": kv_type, "buffer_type": buffer_type,
            "path": kernels.active_path(), "repack": repack, "cpu": _cpu_name()}


def _cpu_name() -> str:
    try:
        from numba.core import config

        if config.CPU_NAME:
            return str(config.CPU_NAME)
        from llvmlite import binding as llvm

        return llvm.get_host_cpu_name()
    except Exception:  # noqa: BLE001 - only part of a cache key
        return "unknown"


def marker(sig: dict) -> Path:
    key = hashlib.sha1(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "warm" / f"{key}.json"


def is_warm(sig: dict) -> bool:
    return marker(sig).exists()


def estimate_s() -> float:
    """How long compiling took here last time (any signature), else the default estimate."""
    times = []
    for f in (cache_dir() / "warm").glob("*.json"):
        try:
            times.append(float(json.loads(f.read_text())["seconds"]))
        except (OSError, ValueError, KeyError):
            pass
    return max(times) if times else DEFAULT_ESTIMATE_S


@contextmanager
def node_lock():
    """An exclusive lock in the cache directory: ranks (and jobs) on one node compile one at a time."""
    import fcntl

    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "warmup.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def tiny_config(cfg):
    """The model's architecture at a few KiB: the same options, dimensions every weight type's
    block size divides (256 for K-quants)."""
    kw = dict(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=0 if cfg.is_moe else 256,
              vocab_size=256, context_length=64)
    if cfg.is_moe:
        kw.update(n_experts=4, n_experts_used=min(2, cfg.n_experts_used), expert_ffn_dim=256)
    if cfg.is_mla:  # deepseek2: every matrix's columns a multiple of 256; dense layers first (write_tiny)
        kw.update(n_kv_heads=4, head_dim=320, qk_nope_dim=256, qk_rope_dim=64, v_head_dim=256, kv_lora_rank=256,
                  q_lora_rank=256 if cfg.q_lora_rank else 0, ffn_dim=256, n_dense_layers=0,
                  n_expert_groups=2 if cfg.n_expert_groups > 1 else 1, n_groups_used=1,
                  n_shared_experts=min(cfg.n_shared_experts, 1))
    return dataclasses.replace(cfg, **kw)


def write_tiny(shard: fmt.Shard, out: Path) -> None:
    """A one-rank model with the weight types of ``shard`` and one layer per distinct layer-type
    combination, written in the real shard format (so it is memory-mapped like the real one)."""
    import numpy as np

    from convert.synth import logical_shape, random_tensor

    from mpillm.formats.partition import plan

    layer_types = _layer_types(shard)
    cfg = dataclasses.replace(tiny_config(shard.config), n_layers=len(layer_types),
                              n_dense_layers=sum("w_gate" in t for t in layer_types) if shard.config.is_mla else 0)
    rs = plan(cfg, 1)[0]
    w = fmt.ShardWriter(out / fmt.shard_relpath(1, 0), cfg, 1, 0, json.dumps(dataclasses.asdict(rs)))
    rng = np.random.default_rng(0)
    try:
        names = [(n, shard.tensors[n].wtype) for n in ("tok_embd", "rope_freqs") if n in shard.tensors]
        for i, types in enumerate(layer_types):
            names += [(f"layers/{i}/{k}", t) for k, t in types.items()]
        names += [(n, shard.tensors[n].wtype) for n in ("output_norm", "output") if n in shard.tensors]
        for name, wtype in names:
            s = logical_shape(cfg, name)
            w.add(name, wtype, s, random_tensor(rng, wtype, s))
        w.close()
    except BaseException:
        w.abort()
        raise
    fmt.write_manifest(out, cfg, [1], source="mpillm.warmup")


# compile_tiny(model_dir, kv_type, buffer_type, repack, step): runs a model directory through every
# kind of step on COMM_SELF, its weights repacked or not (mpillm.runtime.engine.compile_tiny)
CompileTiny = Callable[[Path, str, str, bool, Callable[[str], None]], None]


def compile_for(shard: fmt.Shard, kv_type: str, buffer_type: str, compile_tiny: CompileTiny, progress=None,
                repack: bool = True) -> None:
    """Write the tiny twin of ``shard``'s model and run it through ``compile_tiny``, repacked when the
    real one will be (a model too large to repack runs, and so compiles, the stored layout's kernels).
    ``progress(step_name)`` is called before each step."""
    step = progress or (lambda name: None)
    with tempfile.TemporaryDirectory(prefix="mpillm-warmup-") as tmp:
        step("writing a tiny model with the same weight types")
        try:
            write_tiny(shard, Path(tmp))
        except (KeyError, ValueError) as e:  # a tensor kind the tiny model does not know: compile on use
            raise Unsupported(str(e)) from None
        compile_tiny(Path(tmp), kv_type, buffer_type, repack, step)


STEPS = 4


class Unsupported(Exception):
    """The tiny twin cannot be built for this model; its kernels compile at first use instead."""


def ensure_shard(shard: fmt.Shard, kv_type: str, buffer_type: str, compile_tiny: CompileTiny,
                 announce: bool = False, progress: bool = False, repack: bool | None = None) -> bool:
    """Make sure the kernels this shard's model needs are in the cache; True if it compiled.
    Not collective: each rank decides alone (a rank whose signature is warm returns at once).
    The Engine calls it quietly, with its own repack decision (see ``signature``), so ranks that
    build an Engine directly (the MPI tests) also take turns compiling instead of all compiling the
    same kernels."""
    sig = signature(shard, kv_type, buffer_type, repack)
    if is_warm(sig):
        return False
    if announce:
        print(f"compiling kernels for this CPU ({sig['path']}, {sig['cpu']}), once: about "
              f"{estimate_s():.0f} s", file=sys.stderr, flush=True)
    with node_lock():
        if is_warm(sig):   # another rank (or job) compiled them while this one waited
            return False
        t0 = time.perf_counter()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=STEPS, desc="compiling kernels", unit="step", file=sys.stderr,
                       bar_format="{desc}: {n}/{total} {bar} {elapsed}{postfix}")

        started = []

        def step(name: str) -> None:
            if bar is None:
                return
            if started:
                bar.n += 1
            started.append(name)
            bar.set_postfix_str(name)   # refreshes: the count of steps done and the one now running

        try:
            compile_for(shard, kv_type, buffer_type, compile_tiny, step, sig["repack"])
        except (Unsupported, ValueError):   # the engine itself reports a real problem, by name
            return False
        except Exception as e:  # noqa: BLE001 - a warm-up is an optimization: the run compiles on use
            print(f"mpillm: kernel warm-up failed ({type(e).__name__}: {e}); the kernels compile at first "
                  f"use instead", file=sys.stderr, flush=True)
            return False
        finally:
            if bar is not None:
                bar.n = STEPS
                bar.set_postfix_str("done")
                bar.close()
        dt = time.perf_counter() - t0
        m = marker(sig)
        m.parent.mkdir(parents=True, exist_ok=True)
        tmp = m.with_name(m.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"seconds": round(dt, 1), "signature": sig, "when": time.time()}))
        os.replace(tmp, m)
    return True
