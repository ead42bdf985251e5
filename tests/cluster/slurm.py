"""A real single-node Slurm cluster in a temporary directory, for tests.

    with SlurmCluster(tmpdir) as sl:
        job = sl.sbatch("slurm/generate.sbatch", ["--ntasks=2"], env={...}, timeout=180)

Starts munged, slurmctld and slurmd (Debian ``slurm-wlm`` and ``munge``) in the
foreground of processes this module owns, with a minimal slurm.conf: no systemd, no
cgroups (proctrack/linuxproc, task/none), select/cons_tres, ports picked free on the
loopback, everything (key, sockets, state, spool, logs) under the given directory.
``stop`` cancels the jobs left, then ends exactly the daemons it started. The daemons get
SIGTERM from the kernel if the process that started them dies (PR_SET_PDEATHSIG), and under
pytest a job's timeout is clipped to the running test's own (tests/mpiutil.py ``budget``).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

try:  # under pytest: keep job timeouts inside the test's pytest-timeout, and reap with it
    from mpiutil import term_with_parent, budget
except ImportError:  # pragma: no cover - used outside the test suite
    term_with_parent = None

    def budget(timeout: float) -> tuple[float, str]:
        return timeout, ""

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun", "sbcast")
# The node advertises this many CPUs (slurmd's config_overrides) so a 2-core CI machine
# can run 4-rank jobs, as it does with mpirun's oversubscription.
NODE_CPUS = 4


def missing_reason() -> str | None:
    """None when Slurm and munge are installed, else why the Slurm tests must skip."""
    need = [b for b in DAEMONS + CLIENTS + ("mungekey",) if not shutil.which(b, path=os.environ.get("PATH", "") +
                                                                             ":/usr/sbin:/sbin")]
    if need:
        return (f"Slurm/munge not installed (missing {', '.join(need)}): "
                f"apt-get install slurm-wlm munge  (or slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        return "the single-node Slurm test cluster runs its daemons as root"
    return None


def pmix_missing_reason() -> str | None:
    """Slurm's mpi/pmix plugin dlopens the unversioned libpmix.so (Debian: libpmix-dev)."""
    import glob

    if glob.glob("/usr/lib/*/pmix*/lib/libpmix.so") or glob.glob("/usr/lib*/libpmix.so"):
        return None
    return "srun --mpi=pmix needs libpmix.so: apt-get install libpmix-dev"


def _which(b: str) -> str:
    return shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or b


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Job:
    id: int
    returncode: int
    state: str
    stdout: str
    stderr: str
    sbatch_out: str


class SlurmCluster:
    def __init__(self, workdir: Path, cpus: int = NODE_CPUS):
        self.dir = Path(workdir)
        self.node = socket.gethostname().split(".")[0]
        self.cpus = cpus
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.dir / "slurm.conf"

    # -- lifecycle ---------------------------------------------------------------------------
    def write_conf(self) -> None:
        d = self.dir
        for sub in ("state", "spool", "munge", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d / "munge", 0o700)
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2
        self.conf.write_text(f"""\
# minimal single-node cluster for mpillm's tests (written by tests/cluster/slurm.py)
ClusterName=mpillmtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d / 'munge' / 'munge.socket'}
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd.pid'}
SlurmctldLogFile={d / 'log' / 'slurmctld.log'}
SlurmdLogFile={d / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=5
InactiveLimit=0
MinJobAge=300
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=60 State=UP
""")

    def env(self, extra: dict | None = None) -> dict:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
            del env[k]
        if extra:
            env.update(extra)
        return env

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.dir / "log" / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                            start_new_session=True, preexec_fn=term_with_parent)
        log.close()

    def start(self, timeout: float = 60) -> "SlurmCluster":
        self.write_conf()
        m = self.dir / "munge"
        key = m / "munge.key"
        try:
            if key.exists():
                key.unlink()
            subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True, timeout=30,
                           capture_output=True)
            os.chmod(key, 0o400)
            self._spawn("munged", [_which("munged"), "-F", "-f", f"--socket={m / 'munge.socket'}",
                                   f"--key-file={key}", f"--pid-file={m / 'munged.pid'}",
                                   f"--seed-file={m / 'munged.seed'}", f"--log-file={self.dir / 'log' / 'munged.log'}"])
            self._wait(lambda: (m / "munge.socket").exists(), 10, "munged")
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait(lambda: self._run(["scontrol", "ping"], 10).stdout.count("UP") > 0, timeout / 2, "slurmctld")
            self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
            self._wait(self._node_ready, timeout / 2, "slurmd")
        except BaseException:
            self.stop()
            raise
        return self

    def _node_ready(self) -> bool:
        r = self._run(["sinfo", "-h", "-N", "-o", "%T"], 10)
        return r.returncode == 0 and r.stdout.strip() in ("idle", "mixed", "allocated")

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}:\n{self.logs()}")
            try:
                if ok():
                    return
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready after {timeout}s:\n{self.logs()}")
            time.sleep(0.2)

    def logs(self, tail: int = 2000) -> str:
        out = []
        for f in sorted((self.dir / "log").glob("*")):
            out.append(f"== {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self._run(["scancel", "--full", "--user=root"], 10)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self._run(["squeue", "-h"], 10).stdout.strip():
                time.sleep(0.2)
        for name in reversed(DAEMONS):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- using it ----------------------------------------------------------------------------
    def _run(self, argv: list[str], timeout: float, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([_which(argv[0])] + argv[1:], capture_output=True, text=True, timeout=timeout,
                                  env=self.env(env), cwd=cwd)
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(argv, 124, e.stdout or "", f"timed out after {timeout}s")

    def job_info(self, jid: int) -> dict:
        r = self._run(["scontrol", "-o", "show", "job", str(jid)], 10)
        return dict(tok.split("=", 1) for tok in r.stdout.split() if "=" in tok)

    def sbatch(self, script: Path, options: list[str] | None = None, args: list[str] | None = None,
               env: dict | None = None, timeout: float = 300, cwd: Path | None = None, wait: str = "poll") -> Job:
        """Submit and wait for the job; it is cancelled if it outlives ``timeout``.

        ``wait="sbatch"`` uses ``sbatch --wait``, whose poll interval grows to tens of seconds
        (a 10 s job can take 40 s to return); the default submits with ``sbatch`` and polls
        ``scontrol show job`` every 0.2 s, which returns as soon as the job has ended."""
        timeout, note = budget(timeout)
        outdir = self.dir / "jobs"
        outdir.mkdir(exist_ok=True)
        stamp = f"{time.monotonic_ns()}"
        out, err = outdir / f"{stamp}.out", outdir / f"{stamp}.err"
        argv = [_which("sbatch"), "--parsable", f"--output={out}", f"--error={err}",
                f"--time={max(1, int(timeout // 60) + 1)}"] + (["--wait"] if wait == "sbatch" else []) + \
            list(options or []) + [str(script)] + list(args or [])
        deadline = time.monotonic() + timeout
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env(env), cwd=cwd, start_new_session=True)
        so = se = ""
        jid, state, rc = -1, "", None
        try:
            if wait == "sbatch":
                so, se = proc.communicate(timeout=timeout)
                rc = proc.returncode
                jid = int(so.split(";")[0]) if so.split(";")[0].strip().isdigit() else -1
            else:
                so, se = proc.communicate(timeout=30)
                if proc.returncode != 0:
                    return Job(-1, proc.returncode, "NOT_SUBMITTED", "", "", so + se)
                jid = int(so.split(";")[0])
                while True:
                    info = self.job_info(jid)
                    state = info.get("JobState", "")
                    if state and state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED"):
                        code, sig = (int(x) for x in info.get("ExitCode", "0:0").split(":"))
                        rc = code or (128 + sig if sig else 0) or (0 if state == "COMPLETED" else 1)
                        break
                    if time.monotonic() > deadline:
                        raise subprocess.TimeoutExpired(argv, timeout)
                    time.sleep(0.2)
        except subprocess.TimeoutExpired:
            self._run(["scancel", "--full", "--user=root"], 10)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise AssertionError(f"sbatch {script} did not finish in {timeout:.0f}s{note}; cancelled\n{so}\n{se}\n"
                                 f"{out.read_text() if out.exists() else ''}\n{err.read_text() if err.exists() else ''}")
        if jid > 0 and not state:
            state = self.job_info(jid).get("JobState", "")
        return Job(jid, rc, state, out.read_text() if out.exists() else "",
                   err.read_text() if err.exists() else "", so + se)
