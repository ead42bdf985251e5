"""Emulated hosts on one machine: network namespaces joined by a shaped bridge.

    python tests/cluster/netns.py run --hosts 4 --profile 1gbe -- \\
        python -m mpillm.generate --prompt "The capital of France is" --max-tokens 16 --quiet

Layout for a cluster with tag T and n hosts (everything lives inside namespaces this
module creates; the root namespace gets no interface, address or route):

    netns mpillm-T-sw   bridge br0, ports p0..p{n-1}            (the "switch")
    netns mpillm-T-h{i} eth0 = 10.213.57.{i+1}/24, lo up         (host i, hostname h{i})
    veth p{i} <-> eth0 of host i, tc tbf on both ends at the profile's rate

mpirun runs inside host 0 with a hostfile of the hosts' addresses; PRRTE reaches the
other hosts through ``nsexec.sh`` (an ssh stand-in: ``ip netns exec`` + a private UTS
namespace so each host has its own hostname). Open MPI's TCP traffic is restricted to
the cluster subnet, so it can only flow over the shaped links.

The subnet is private and used only inside these namespaces; it is never routed
anywhere. Teardown (``down``) kills every process left in the namespaces and deletes
them; it runs from ``__exit__``, so a failing test cleans up too, and ``reap_stale``
removes clusters whose creating process died.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
AGENT = HERE / "nsexec.sh"
PREFIX = "mpillm-"
SUBNET_BASE = "10.213.57"          # a /24 used only inside the namespaces created here
SUBNET = f"{SUBNET_BASE}.0/24"


@dataclass(frozen=True)
class LinkProfile:
    name: str
    rate: str          # tc rate
    mtu: int
    about: str


# Rates are the nominal line rates; tbf at 1 Gbit measures ~952 Mbit/s of TCP payload here.
PROFILES = {
    "1gbe": LinkProfile("1gbe", "1gbit", 1500, "1 Gigabit Ethernet (Raspberry Pi 5)"),
    "2.5gbe": LinkProfile("2.5gbe", "2500mbit", 1500, "2.5 Gigabit Ethernet (most mini PCs)"),
    "5gbe": LinkProfile("5gbe", "5gbit", 1500, "5 Gigabit Ethernet (Framework Desktop)"),
    "10gbe": LinkProfile("10gbe", "10gbit", 1500, "10 Gigabit Ethernet"),
    "thunderbolt": LinkProfile("thunderbolt", "10gbit", 9000,
                               "Thunderbolt networking, ~10 Gbit/s usable, large MTU"),
    "none": LinkProfile("none", "", 1500, "unshaped veth (memory speed)"),
}


def have_netns() -> str | None:
    """None when namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"{PREFIX}probe{os.getpid()}"
    try:
        r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`ip netns` unavailable: {e}"
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
    return None


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip"] + (["-n", ns] if ns else []) + list(args)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r


def _tc(ns: str, *args: str) -> None:
    cmd = ["ip", "netns", "exec", ns, "tc"] + list(args)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


def _tbf_args(rate: str) -> list[str]:
    bits = _rate_bits(rate)
    # burst: ~1 ms of line rate, at least 64 KiB so GSO super-packets pass without drops
    burst = max(64 * 1024, bits // 8 // 1000)
    return ["rate", rate, "burst", str(burst), "latency", "20ms"]


def _rate_bits(rate: str) -> int:
    for suffix, mult in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if rate.endswith(suffix):
            return int(float(rate[: -len(suffix)]) * mult)
    return int(rate)


def list_namespaces() -> list[str]:
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def ns_pids(ns: str) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10)
    return [int(p) for p in r.stdout.split()]


def kill_and_delete(ns: str) -> None:
    for _ in range(3):
        pids = ns_pids(ns)
        if not pids:
            break
        for p in pids:
            try:
                os.kill(p, 9)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    _ip("netns", "del", ns, check=False)


def reap_stale() -> list[str]:
    """Delete clusters left behind by a process that no longer exists (tag ``p<pid>x<n>``)."""
    gone = []
    for ns in list_namespaces():
        if not ns.startswith(PREFIX + "p"):
            continue
        tag = ns[len(PREFIX) + 1:].split("x", 1)[0]
        if tag.isdigit() and not Path(f"/proc/{tag}").exists():
            kill_and_delete(ns)
            gone.append(ns)
    return gone


_counter = 0


class Cluster:
    """n emulated hosts on a shaped bridge. Use as a context manager; ``down`` always runs."""

    def __init__(self, n_hosts: int, profile: str = "1gbe", tag: str | None = None):
        if not 1 <= n_hosts <= 16:
            raise ValueError("1 to 16 hosts")
        if profile not in PROFILES:
            raise ValueError(f"unknown link profile {profile!r}; known: {', '.join(PROFILES)}")
        global _counter
        _counter += 1
        self.n = n_hosts
        self.profile = PROFILES[profile]
        self.tag = tag or f"p{os.getpid()}x{_counter}"
        self.switch = f"{PREFIX}{self.tag}-sw"
        self.hosts = [f"{PREFIX}{self.tag}-h{i}" for i in range(n_hosts)]
        self.addrs = [f"{SUBNET_BASE}.{i + 1}" for i in range(n_hosts)]
        self.created: list[str] = []

    # -- lifecycle ---------------------------------------------------------------------------
    def up(self) -> "Cluster":
        reap_stale()
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        sw = self.switch
        _ip("netns", "add", sw)
        self.created.append(sw)
        _ip("link", "set", "lo", "up", ns=sw)
        _ip("link", "add", "br0", "type", "bridge", ns=sw)
        _ip("link", "set", "br0", "up", ns=sw)
        mtu = str(self.profile.mtu)
        for i, (h, addr) in enumerate(zip(self.hosts, self.addrs)):
            _ip("netns", "add", h)
            self.created.append(h)
            port = f"p{i}"
            # both ends are born inside namespaces: the root namespace never sees them
            _ip("link", "add", port, "mtu", mtu, "type", "veth", "peer", "name", "eth0", "mtu", mtu,
                "netns", h, ns=sw)
            _ip("link", "set", port, "master", "br0", ns=sw)
            _ip("link", "set", port, "up", ns=sw)
            _ip("link", "set", "lo", "up", ns=h)
            _ip("addr", "add", f"{addr}/24", "dev", "eth0", ns=h)
            _ip("link", "set", "eth0", "up", ns=h)
            if self.profile.rate:
                _tc(h, "qdisc", "add", "dev", "eth0", "root", "tbf", *_tbf_args(self.profile.rate))
                _tc(sw, "qdisc", "add", "dev", port, "root", "tbf", *_tbf_args(self.profile.rate))
        self._wait_links()

    def _wait_links(self, timeout: float = 10.0) -> None:
        """Until every host's eth0 is up and every bridge port forwards."""
        deadline = time.monotonic() + timeout
        while True:
            ok = all("state UP" in _ip("link", "show", "eth0", ns=h).stdout for h in self.hosts)
            ports = _ip("-d", "link", "show", "master", "br0", ns=self.switch).stdout
            ok = ok and ports.count("state forwarding") == self.n
            if ok:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"links of cluster {self.tag} not up after {timeout}s:\n{ports}")
            time.sleep(0.05)

    def down(self) -> None:
        for ns in reversed(self.created):
            kill_and_delete(ns)
        self.created.clear()

    def __enter__(self) -> "Cluster":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # -- running things ----------------------------------------------------------------------
    def exec_argv(self, i: int, argv: list[str]) -> list[str]:
        """argv run as host i: its network namespace and its own hostname h{i}."""
        return ["ip", "netns", "exec", self.hosts[i], "unshare", "--uts", "sh", "-c",
                f'hostname h{i} && exec "$@"', "sh"] + list(argv)

    def write_hostfile(self, path: Path, slots: int = 1) -> Path:
        path = Path(path)
        path.write_text("".join(f"{a} slots={slots}\n" for a in self.addrs))
        return path

    def mpirun_argv(self, np_: int, hostfile: Path, argv: list[str], mpirun: str | None = None) -> list[str]:
        """mpirun across the hosts, launched from host 0; TCP only, only on the cluster subnet."""
        mpirun = mpirun or str(Path(sys.executable).parent / "mpirun")
        cmd = [mpirun, "-np", str(np_), "--hostfile", str(hostfile), "--bind-to", "none",
               "--prtemca", "plm_ssh_agent", str(AGENT),
               "--prtemca", "oob_tcp_if_include", SUBNET,
               "--mca", "pml", "ob1", "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", SUBNET]
        return self.exec_argv(0, cmd + list(argv))

    def env(self, extra: dict | None = None) -> dict:
        """Environment for mpirun: what nsexec.sh needs to map an address to its namespace."""
        env = dict(os.environ)
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        env.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache"))
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["MPILLM_NETNS_PREFIX"] = f"{PREFIX}{self.tag}-h"
        env["MPILLM_NETNS_SUBNET_BASE"] = SUBNET_BASE
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        if extra:
            env.update(extra)
        return env

    def pids(self, i: int) -> list[int]:
        return ns_pids(self.hosts[i])

    def all_pids(self) -> list[int]:
        return [p for h in self.hosts for p in ns_pids(h)]


def _cmd_line(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tests/cluster/netns.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="bring a cluster up, run mpirun across it, tear it down")
    r.add_argument("--hosts", type=int, default=2)
    r.add_argument("--np", type=int, default=None, help="ranks (default: one per host)")
    r.add_argument("--profile", default="1gbe", choices=list(PROFILES))
    r.add_argument("--timeout", type=float, default=600)
    r.add_argument("--show", action="store_true", help="print the mpirun command line")
    r.add_argument("argv", nargs=argparse.REMAINDER, help="-- command run on every rank")
    sub.add_parser("reap", help="delete clusters whose creator has exited")
    sub.add_parser("profiles", help="list the link profiles")
    a = p.parse_args(argv)
    if a.cmd == "reap":
        print("\n".join(reap_stale()))
        return 0
    if a.cmd == "profiles":
        for pr in PROFILES.values():
            print(f"{pr.name:12s} {pr.rate or '-':9s} mtu {pr.mtu:5d}  {pr.about}")
        return 0
    cmd = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
    if not cmd:
        p.error("run: give the command after --")
    reason = have_netns()
    if reason:
        print(f"netns: {reason}", file=sys.stderr)
        return 2
    import tempfile

    with Cluster(a.hosts, a.profile) as c, tempfile.TemporaryDirectory() as td:
        hf = c.write_hostfile(Path(td) / "hostfile", slots=max(1, -(-(a.np or a.hosts) // a.hosts)))
        full = c.mpirun_argv(a.np or a.hosts, hf, cmd)
        if a.show:
            print(_cmd_line(full), file=sys.stderr)
        proc = subprocess.Popen(full, env=c.env(), start_new_session=True)
        try:
            return proc.wait(timeout=a.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            print(f"netns: timed out after {a.timeout}s", file=sys.stderr)
            return 124
        except KeyboardInterrupt:
            os.killpg(proc.pid, 9)
            return 130


if __name__ == "__main__":
    sys.exit(main())
