"""distributed-llama as a baseline in the emulated cluster (tests/cluster/netns.py).

distributed-llama is a benchmark tool here, never a dependency of mpillm: its binary is built
by ``scripts/build_dllama.sh`` into ``cache/dllama/dllama`` from a source snapshot, its weights
are made with its own converter (docs/cluster.md, "distributed-llama baseline"). This module
imports only the standard library.

One run in a cluster of n hosts: ``dllama worker`` on hosts 1..n-1 (one node per host,
``--nthreads 1``), listening on the host's cluster address; once all of them listen,
``dllama inference`` on host 0 connects, sends each worker its slice of the weights over the
shaped links, and generates. Its stdout has one line per generated token,

    🔶 Pred   37 ms Sync    0 ms | Sent     0 kB Recv     0 kB | <piece>

(Pred: the node's own compute; Sync: the time spent synchronizing with the workers; both
truncated to whole ms by its printf; Sent/Recv: kB over all the root's sockets during that
token, truncated too: its getStats resets the counters), and a summary whose ``Prediction ... tokens/s: X (Y ms/tok)`` comes from the
microsecond totals of Pred + Sync. The workers never exit on their own (they go back to
listening after a run): every one is started in its own session and killed with its process
group in ``finally``, and the cluster's teardown kills whatever is left in its namespaces.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BIN = ROOT / "cache" / "dllama" / "dllama"
PORT = 9998

PRED = re.compile(r"Pred\s*(\d+) ms Sync\s*(\d+) ms \| Sent\s*(\d+) kB Recv\s*(\d+) kB")
EVAL = re.compile(r"Eval\s*(\d+) ms Sync\s*(\d+) ms \| Sent\s*(\d+) kB Recv\s*(\d+) kB \| \((\d+) tokens\)")
SUMMARY = re.compile(r"Prediction\s+nTokens: (\d+)\s+tokens/s: ([\d.]+) \(([\d.]+) ms/tok\)")


def version(binary: Path = DEFAULT_BIN) -> str | None:
    """What build_dllama.sh recorded of the source snapshot (tag and commit), if anything."""
    for f in (Path(binary).parent / "src" / ".snapshot", Path(binary).parent / "build" / ".snapshot"):
        if f.is_file():
            return f.read_text().strip()
    return None


def steps_for(prompt: str, n_tokens: int) -> int:
    """dllama's --steps counts the prompt too (it generates up to position ``steps``). Its BPE
    on a gpt2-style vocabulary built by its converter splits text into about one token per byte
    (measured: "The capital of France is", 24 bytes -> 24 tokens), so bytes + BOS + n_tokens
    leaves at least n_tokens to generate; the rows report the count it actually generated."""
    return len(prompt.encode()) + 1 + n_tokens


def worker_argv(binary: Path, host: str, port: int = PORT, threads: int = 1, turbo: bool = True) -> list[str]:
    return [str(binary), "worker", "--host", host, "--port", str(port), "--nthreads", str(threads),
            "--net-turbo", "1" if turbo else "0"]


def root_argv(binary: Path, model: Path, tokenizer: Path, workers: list[str], prompt: str, steps: int,
              threads: int = 1, max_seq_len: int = 512, turbo: bool = True, buffer: str = "q80",
              seed: int = 1) -> list[str]:
    argv = [str(binary), "inference", "--model", str(model), "--tokenizer", str(tokenizer),
            "--buffer-float-type", buffer, "--nthreads", str(threads), "--prompt", prompt,
            "--steps", str(steps), "--temperature", "0", "--seed", str(seed),
            "--max-seq-len", str(max_seq_len), "--net-turbo", "1" if turbo else "0"]
    if workers:
        argv += ["--workers"] + workers
    return argv


def parse(out: str) -> dict | None:
    """tok/s, ms/token (its own microsecond totals), Sync ms per token (mean of the printed,
    truncated values: up to 1 ms low) and KiB the root sent per token, from the root's stdout."""
    preds = [tuple(int(x) for x in m.groups()) for m in PRED.finditer(out)]
    s = SUMMARY.search(out)
    if not preds or not s:
        return None
    evals = [tuple(int(x) for x in m.groups()) for m in EVAL.finditer(out)]
    n = len(preds)
    return {"tok_s": float(s[2]), "ms_tok": float(s[3]), "n_tokens": int(s[1]),
            "comm_ms": round(sum(p[1] for p in preds) / n, 3),
            "compute_ms": round(sum(p[0] for p in preds) / n, 3),
            "kib_tok": round(sum(p[2] for p in preds) / n, 2),
            "recv_kib_tok": round(sum(p[3] for p in preds) / n, 2),
            "prompt_tokens": sum(e[4] for e in evals) + 1}


def _listening(cluster, i: int, port: int) -> bool:
    r = subprocess.run(["ip", "netns", "exec", cluster.hosts[i], "ss", "-Hltn", "sport", "=", f":{port}"],
                       capture_output=True, text=True, timeout=10)
    return bool(r.stdout.strip())


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def run_in_cluster(cluster, model: Path, tokenizer: Path, prompt: str, n_tokens: int, timeout: float,
                   binary: Path = DEFAULT_BIN, turbo: bool = True, max_seq_len: int = 512,
                   log_dir: Path | None = None) -> tuple[dict | None, dict]:
    """One distributed-llama generation across every host of ``cluster`` (root on host 0).
    Returns (parsed figures or None, {"argv": root argv, "worker_argv": ..., "error": ...})."""
    n = cluster.n
    workers = [f"{cluster.addrs[i]}:{PORT}" for i in range(1, n)]
    argv = root_argv(binary, model, tokenizer, workers, prompt, steps_for(prompt, n_tokens),
                     max_seq_len=max_seq_len, turbo=turbo)
    info: dict = {"argv": argv, "worker_argv": worker_argv(binary, "ADDR", turbo=turbo) if n > 1 else None}
    procs: list[subprocess.Popen] = []
    logs = []
    deadline = time.monotonic() + timeout
    try:
        for i in range(1, n):
            log = open(log_dir / f"dllama-worker-h{i}.log", "w") if log_dir else subprocess.DEVNULL
            logs.append(log)
            procs.append(subprocess.Popen(cluster.exec_argv(i, worker_argv(binary, cluster.addrs[i], turbo=turbo)),
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        for i in range(1, n):
            while not _listening(cluster, i, PORT):
                if procs[i - 1].poll() is not None:
                    info["error"] = f"worker on h{i} exited with {procs[i - 1].returncode}"
                    return None, info
                if time.monotonic() > deadline:
                    info["error"] = f"worker on h{i} not listening"
                    return None, info
                time.sleep(0.1)
        root = subprocess.Popen(cluster.exec_argv(0, argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
        procs.append(root)
        try:
            out, _ = root.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            info["error"] = f"timed out after {timeout:.0f} s"
            return None, info
        if log_dir:
            (log_dir / "dllama-root.log").write_text(out)
        if root.returncode != 0:
            info["error"] = f"root exited with {root.returncode}: {out[-600:]}"
            return None, info
        r = parse(out)
        if r is None:
            info["error"] = f"no Prediction figures in its output: {out[-600:]}"
        return r, info
    finally:
        for p in procs:
            _kill_group(p)
        for log in logs:
            if log is not subprocess.DEVNULL:
                log.close()
