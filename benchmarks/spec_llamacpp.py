"""llama.cpp's own speculative decoding as the baseline of ``mpillm.bench_spec``.

One ``llama-server`` per mode on 127.0.0.1 (the speculative type is a start-up flag), all started
before the first repetition and idle until asked; each repetition sends the same prompt token ids
to every mode with greedy sampling (temperature 0), ``ignore_eos`` and no prompt cache, and reads
the server's own figures: ``timings.predicted_per_second`` (generation only, prompt excluded, as
in mpillm's figures), ``draft_n`` and ``draft_n_accepted``. Modes:

  llama_plain                 no speculation
  llama_ngram_simple          --spec-type ngram-simple (llama.cpp's prompt lookup, its defaults:
                              12-token match, 48-token drafts)
  llama_ngram_simple_n4_m8    the same with a 4-token match and 8-token drafts (closest to
                              mpillm's --draft lookup defaults)
  llama_draft_model           -md DRAFT (with --draft-model, when it is a GGUF)

Threads wait with ``--poll 0`` by default (sleep, not spin): on a shared, oversubscribed machine
spinning threads starve the one that has work (mpillm's ranks yield the same way).
Standard library only; the binary is a baseline, never a dependency.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark process dies (a killed MPI job would
    otherwise leave idle servers behind)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def modes(draft_gguf: str | None) -> dict[str, list[str]]:
    m = {"llama_plain": [],
         "llama_ngram_simple": ["--spec-type", "ngram-simple"],
         "llama_ngram_simple_n4_m8": ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "4",
                                      "--spec-ngram-simple-size-m", "8"]}
    if draft_gguf and str(draft_gguf).endswith(".gguf"):
        m["llama_draft_model"] = ["-md", str(draft_gguf), "--spec-draft-n-max", "8"]
    return m


class LlamaServers:
    """The llama-server processes of every mode; ``close()`` stops them all (process groups)."""

    def __init__(self, binary: str, gguf: str, threads: int, ctx: int, draft_gguf: str | None = None,
                 log_dir: Path | None = None, start_timeout: float = 300, poll: int = 0):
        if not Path(binary).is_file():
            raise ValueError(f"--llama-server {binary} does not exist")
        self.procs: dict[str, subprocess.Popen] = {}
        self.urls: dict[str, str] = {}
        self.cmds: dict[str, list[str]] = {}
        try:
            for name, extra in modes(draft_gguf).items():
                port = free_port()
                cmd = [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--parallel", "1",
                       "--threads", str(threads), "--threads-batch", str(threads), "-c", str(ctx), "--no-webui",
                       "--poll", str(poll), *extra]
                log = open(log_dir / f"{name}.log", "w") if log_dir else subprocess.DEVNULL
                self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                    start_new_session=True, preexec_fn=_die_with_parent)
                self.urls[name], self.cmds[name] = f"http://127.0.0.1:{port}", cmd
            deadline = time.monotonic() + start_timeout
            for name, url in self.urls.items():
                self._wait(name, url, deadline)
        except BaseException:
            self.close()
            raise

    def _wait(self, name: str, url: str, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"llama-server ({name}) exited with {self.procs[name].returncode}: "
                                   f"{' '.join(self.cmds[name])}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"llama-server ({name}) not ready in time")

    def complete(self, name: str, ids: list[int], n: int, timeout: float = 600) -> dict:
        body = {"prompt": ids, "n_predict": n, "temperature": 0.0, "ignore_eos": True, "cache_prompt": False,
                "return_tokens": True, "stream": False}
        req = urllib.request.Request(self.urls[name] + "/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            res = json.loads(r.read())
        t = res["timings"]
        drafted, accepted = int(t.get("draft_n", 0)), int(t.get("draft_n_accepted", 0))
        return {"tokens": [int(x) for x in res.get("tokens", [])], "gen_tokens": int(t["predicted_n"]),
                "tok_s": float(t["predicted_per_second"]), "drafted": drafted, "accepted": accepted,
                "acceptance_rate": accepted / drafted if drafted else 0.0}

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
