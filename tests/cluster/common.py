"""What the cluster tests share: the fixed prompt and single-host reference outputs."""
from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))        # tests/ (mpiutil)

from mpiutil import mpirun  # noqa: E402

PROMPT = "The capital of France is"
GEN_ARGS = ["-m", "mpillm.generate", "--prompt", PROMPT, "--max-tokens", "16", "--quiet"]
STATS_RE = re.compile(r"^\[prompt .*\]$", re.M)


def text_of(stdout: str) -> str:
    """The generated text of a --quiet run, without the stats line."""
    return STATS_RE.sub("", stdout).strip()


def stats_of(stdout: str) -> dict:
    m = re.search(r"generate (\d+) tok, ([\d.]+) tok/s \| ([\d.]+) ms/tok = ([\d.]+) compute \+ ([\d.]+) comm", stdout)
    if not m:
        return {}
    return {"tokens": int(m[1]), "tok_s": float(m[2]), "ms_tok": float(m[3]), "comm_ms": float(m[5])}


@functools.lru_cache(maxsize=None)
def single_host_text(np_: int, model: str | None = None, sync: str | None = None) -> str:
    """Greedy text of the fixed prompt on this host alone with np_ ranks (cached per session);
    ``sync`` an explicit --sync (on one host --sync auto always picks the Allreduce)."""
    args = GEN_ARGS + (["--model", model] if model else []) + (["--sync", sync] if sync else [])
    r = mpirun(np_, args, timeout=240)
    assert r.returncode == 0, f"single-host reference run failed:\n{r.stdout}\n{r.stderr}"
    return text_of(r.stdout)
