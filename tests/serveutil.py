"""Start `mpirun -np N python -m mpillm.serve` on a free 127.0.0.1 port for a test; always stop it.

The server picks the port itself (--port 0) and prints it; every wait has a deadline, and
stop() kills the whole process group (mpirun and every rank) if SIGTERM is not enough.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from mpiutil import ROOT, budget, kill_session, mpi_env, mpirun_cmd, popen_job, session_pids

LISTEN = re.compile(r"listening on (http://[^ ]+)")


class Server:
    def __init__(self, np_: int, *args: str, api_key: str | None = None, env: dict | None = None,
                 tmp: Path | None = None):
        self.np, self.api_key = np_, api_key
        cmd = mpirun_cmd(np_) + [sys.executable, "-m", "mpillm.serve", "--port", "0", "--max-seq-len", "512", *args]
        if api_key:
            assert tmp is not None
            kf = tmp / "api-key"
            kf.write_text(api_key + "\n")
            kf.chmod(0o600)
            cmd += ["--api-key-file", str(kf)]
        self.cmd = cmd
        self.proc = popen_job(cmd, mpi_env(env), ROOT, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self.url: str | None = None
        self.saw_loading = False
        self._got_url = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            m = LISTEN.search(line)
            if m and self.url is None:
                self.url = m.group(1)
                self._got_url.set()
        self._got_url.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 300) -> "Server":
        timeout, note = budget(timeout)
        deadline = time.monotonic() + timeout
        if not self._got_url.wait(timeout) or self.url is None:
            self.stop()
            raise AssertionError(f"server did not start:\n{self.output[-4000:]}")
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except urllib.error.HTTPError as e:
                if e.code == 503:
                    self.saw_loading = True
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"server not ready within {timeout:.0f}s{note}:\n{self.output[-4000:]}")

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def metrics(self) -> dict[str, float]:
        req = urllib.request.Request(self.url + "/metrics", headers=self.headers())
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def post(self, path: str, body: dict, timeout: float = 60) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **self.headers()})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def pids(self) -> list[int]:
        """Processes of this job still alive (not zombies): mpirun and the ranks, all in the session
        the test started (each rank has a process group of its own)."""
        out = []
        for pid in session_pids(self.proc.pid):
            try:
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    out.append(pid)
            except OSError:
                pass
        return out

    def rank_pid(self, rank: int) -> int:
        for pid in self.pids():
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"OMPI_COMM_WORLD_RANK={rank}".encode() in env and b"-m" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        raise AssertionError(f"no process of rank {rank} found")

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM to mpirun (it ends the ranks), then SIGKILL to whatever is left in the session."""
        kill_session(self.proc, grace=timeout)
        self.proc.wait(10)
        return self.proc.returncode
