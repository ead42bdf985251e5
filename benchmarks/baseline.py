"""llama.cpp as a benchmark baseline, run on the same GGUF as mpillm.

llama.cpp comes from the llama-cpp-python package, built with native CPU flags by
``scripts/setup_llamacpp.sh`` into a separate venv (``$MPILLM_ROOT/.bench-venv`` or
``$MPILLM_BENCH_VENV``). It is never a runtime dependency of mpillm: this module
imports only the standard library and talks to ``_llamacpp_worker.py``, which runs
in that venv as a subprocess and prints JSON.

Figures follow llama-bench: prompt tok/s is one batch of ``n_prompt`` tokens on an
empty KV cache (pp64), generate tok/s is ``n_gen`` single-token steps with greedy
argmax (tg64); model load and a warm-up run are excluded. Each figure is the best
of ``repeats`` runs (the machine is shared, so the best is the least disturbed);
the medians and every sample come along too.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

__all__ = ["BenchVenvMissing", "available", "bench_python", "run_llamacpp", "quantize"]

_WORKER = Path(__file__).with_name("_llamacpp_worker.py")
_ROOT = Path(__file__).resolve().parent.parent


class BenchVenvMissing(RuntimeError):
    """The benchmark venv with llama-cpp-python is not installed."""


def bench_venv() -> Path:
    env = os.environ.get("MPILLM_BENCH_VENV")
    if env:
        return Path(env)
    root = os.environ.get("MPILLM_ROOT")
    return Path(root if root else _ROOT) / ".bench-venv"


def bench_python() -> Path:
    """The bench venv's interpreter, or BenchVenvMissing with the command that makes it."""
    py = bench_venv() / "bin" / "python"
    if not py.exists():
        raise BenchVenvMissing(
            f"llama.cpp baseline unavailable: no benchmark venv at {bench_venv()}. "
            "Create it with `bash scripts/setup_llamacpp.sh` (builds llama-cpp-python "
            "from source, ~8 minutes), or point MPILLM_BENCH_VENV at one.")
    return py


def available() -> bool:
    """True when the bench venv exists and can import llama_cpp."""
    try:
        py = bench_python()
    except BenchVenvMissing:
        return False
    r = subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True)
    return r.returncode == 0


def _run_worker(args: list[str], timeout: float | None) -> dict:
    py = bench_python()
    r = subprocess.run([str(py), str(_WORKER), *args], capture_output=True, text=True,
                       timeout=timeout)
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        tail = "\n".join(r.stderr.strip().splitlines()[-20:])
        raise RuntimeError(f"llama.cpp worker failed ({r.returncode}): {' '.join(args)}\n{tail}")
    return json.loads(lines[-1])


def run_llamacpp(gguf_path, threads: int, n_prompt: int = 64, n_gen: int = 64,
                 repeats: int = 3, timeout: float | None = 1800) -> dict:
    """Benchmark llama.cpp on ``gguf_path`` with ``threads`` threads.

    Returns a dict with ``prompt_tok_s`` and ``generate_tok_s`` (best of ``repeats``),
    ``prompt_tok_s_median`` / ``generate_tok_s_median``, the raw samples,
    ``threads``, ``llama_cpp_python`` (the package version, which pins the vendored
    llama.cpp) and ``system_info`` (llama.cpp's CPU feature line, e.g. AVX512 = 1).
    """
    if threads < 1 or n_prompt < 1 or n_gen < 1 or repeats < 1:
        raise ValueError("threads, n_prompt, n_gen and repeats must be positive")
    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(path)
    res = _run_worker(["bench", str(path), "--threads", str(threads), "--n-prompt",
                       str(n_prompt), "--n-gen", str(n_gen), "--repeats", str(repeats)],
                      timeout)
    res["gguf"] = str(path)
    res["engine"] = "llama.cpp"
    return res


def quantize(src, dst, ftype: str = "q4_0", pure: bool = False,
             threads: int | None = None) -> dict:
    """Requantize ``src`` into ``dst`` with llama.cpp's own quantizer (allow_requantize)."""
    args = ["quantize", str(src), str(dst), "--ftype", ftype]
    if pure:
        args.append("--pure")
    if threads:
        args += ["--threads", str(threads)]
    return _run_worker(args, timeout=1800)


def _main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="llama.cpp baseline on a GGUF (bench venv).")
    ap.add_argument("gguf")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--n-prompt", type=int, default=64)
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    out = [run_llamacpp(a.gguf, t, a.n_prompt, a.n_gen, a.repeats) for t in a.threads]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    _main()
