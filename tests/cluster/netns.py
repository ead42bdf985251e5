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
import re
import shlex
import statistics
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
    rate: str          # tc rate (line rate)
    mtu: int
    about: str
    rtt_us: float = 0.0     # round trip of a small ping, end to end; 0 = no relay (veth + bridge only)
    goodput_bps: float = 0.0  # what a bulk TCP transfer gets on the real link (iperf3-style)


# Figures and where they come from: tests/cluster/README.md ("Link profiles"). A profile with
# an RTT runs every frame through the delay relay (linkemu.py) instead of the kernel bridge.
PROFILES = {
    "1gbe": LinkProfile("1gbe", "1gbit", 1500, "1 Gigabit Ethernet through a switch (Raspberry Pi 5)",
                        300, 940e6),
    "2.5gbe": LinkProfile("2.5gbe", "2500mbit", 1500, "2.5 Gigabit Ethernet (most mini PCs)", 250, 2.35e9),
    "5gbe": LinkProfile("5gbe", "5gbit", 1500, "5 Gigabit Ethernet (Framework Desktop)", 250, 4.7e9),
    "10gbe": LinkProfile("10gbe", "10gbit", 1500, "10 Gigabit Ethernet", 200, 9.4e9),
    "thunderbolt": LinkProfile("thunderbolt", "10gbit", 9000,
                               "Thunderbolt networking, ~10 Gbit/s usable, large MTU", 300, 9.4e9),
    "wifi": LinkProfile("wifi", "600mbit", 1500, "Wi-Fi 6 through one access point", 4000, 560e6),
    "none": LinkProfile("none", "", 1500, "unshaped veth (memory speed)"),
    # the relay with a delay but no rate limit: how much the emulator itself can carry here
    "relay-unshaped": LinkProfile("relay-unshaped", "", 1500, "the delay relay, no rate limit", 250),
}
# the same rates on the kernel bridge without added latency (the round-1 emulation)
for _k in ("1gbe", "2.5gbe", "5gbe", "10gbe", "thunderbolt"):
    _p = PROFILES[_k]
    PROFILES[_k + "-nodelay"] = LinkProfile(_p.name + "-nodelay", _p.rate, _p.mtu, _p.about + ", no added delay")

LINKEMU = HERE / "linkemu.py"


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


def rtt_p25(rtts: list[float]) -> float | None:
    """The 25th percentile of ping RTTs: the link's RTT under noise that only ever adds delay."""
    return statistics.quantiles(rtts, n=4)[0] if len(rtts) >= 2 else (rtts[0] if rtts else None)


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
        self.relay: subprocess.Popen | None = None
        self.one_way_us = 0.0          # what the relay holds each frame (after calibration)
        self.base_rtt_us = None        # median ping RTT through the relay with no hold: its own cost

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
        if self.profile.rtt_us:
            return self._build_relay()
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
            # Linux's default congestion control (this machine's root namespace runs bbr, whose
            # pacing reads the relay's scheduling jitter as a slower link)
            subprocess.run(["ip", "netns", "exec", h, "sysctl", "-qw", "net.ipv4.tcp_congestion_control=cubic"],
                           capture_output=True, timeout=10)
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

    # -- links with latency: TAP devices served by the relay ------------------------------------
    def _build_relay(self) -> None:
        """The relay (linkemu.py) runs in the switch namespace and creates one TAP per host;
        each TAP moves into its host's namespace as eth0 and gets the profile's tbf on egress
        (the line rate, with TCP's back-pressure); the relay adds the delay. The relay does not
        also serialize its ports (it could: ``--rate``): on this shared machine it is sometimes
        descheduled for milliseconds, and a serializing relay then loses that time for good,
        while a plain delay lets the backlog catch up, so the tbf pacing sets the rate."""
        import select as _select

        sw = self.switch
        _ip("netns", "add", sw)
        self.created.append(sw)
        _ip("link", "set", "lo", "up", ns=sw)
        self.relay = subprocess.Popen(
            ["ip", "netns", "exec", sw, "nice", "-n", "-10", sys.executable, str(LINKEMU), "--ports", str(self.n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            start_new_session=True)
        ready, _, _ = _select.select([self.relay.stdout], [], [], 20)
        line = self.relay.stdout.readline() if ready else ""
        if line.strip() != "ready":
            raise RuntimeError(f"link relay did not start (got {line!r}, exit {self.relay.poll()})")
        mtu = str(self.profile.mtu)
        for i, (h, addr) in enumerate(zip(self.hosts, self.addrs)):
            _ip("netns", "add", h)
            self.created.append(h)
            _ip("link", "set", f"p{i}", "netns", h, ns=sw)
            _ip("link", "set", f"p{i}", "name", "eth0", ns=h)
            _ip("link", "set", "eth0", "mtu", mtu, ns=h)
            _ip("link", "set", "lo", "up", ns=h)
            _ip("addr", "add", f"{addr}/24", "dev", "eth0", ns=h)
            _ip("link", "set", "eth0", "up", ns=h)
            # Linux's default congestion control (this machine's root namespace runs bbr, whose
            # pacing reads the relay's scheduling jitter as a slower link)
            subprocess.run(["ip", "netns", "exec", h, "sysctl", "-qw", "net.ipv4.tcp_congestion_control=cubic"],
                           capture_output=True, timeout=10)
            if self.profile.rate:
                _tc(h, "qdisc", "add", "dev", "eth0", "root", "tbf", *_tbf_args(self.profile.rate))
        deadline = time.monotonic() + 10
        for a in self.addrs[1:]:
            while not self.ping(0, a, count=1, interval=0.2):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"host {a} unreachable through the link relay")
        self.calibrate()

    def relay_cmd(self, line: str) -> str | None:
        """Send a command to the relay; ``stats`` returns its JSON line."""
        self.relay.stdin.write(line + "\n")
        self.relay.stdin.flush()
        return self.relay.stdout.readline().strip() if line == "stats" else None

    def bulk(self, i: int, j: int, seconds: int = 2) -> float:
        """Bits per second of one iperf3 TCP stream from host i to host j (receiver's count)."""
        import json as _json

        srv = subprocess.Popen(self.exec_argv(j, ["iperf3", "-s", "-1", "-B", self.addrs[j]]),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(50):        # until the server listens
                r = subprocess.run(self.exec_argv(i, ["iperf3", "-c", self.addrs[j], "-t", str(seconds), "-J"]),
                                   capture_output=True, text=True, timeout=30 + seconds)
                try:
                    return float(_json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"])
                except (ValueError, KeyError):      # not listening yet: iperf3 reports an error
                    time.sleep(0.1)
            raise RuntimeError(f"iperf3 from h{i} to h{j} failed: {r.stdout[-500:]} {r.stderr[-500:]}")
        finally:
            try:
                srv.wait(timeout=10)
            except subprocess.TimeoutExpired:
                srv.kill()
                srv.wait(timeout=5)

    def ping(self, i: int, addr: str, count: int = 20, interval: float = 0.005, size: int = 56) -> list[float]:
        """RTTs in microseconds of ``ping`` from host i to addr (empty when nothing came back)."""
        r = subprocess.run(["ip", "netns", "exec", self.hosts[i], "ping", "-n", "-c", str(count), "-i", str(interval),
                            "-s", str(size), "-W", "1", addr], capture_output=True, text=True, timeout=30 + count)
        return [float(t) * 1e3 for t in re.findall(r"time=([\d.]+) ms", r.stdout)]

    def rtt(self, i: int = 0, j: int = 1) -> float:
        """The RTT h_i -> h_j as the profiles define it: 25th percentile of 40 pings 2 ms apart."""
        return rtt_p25(self.ping(i, self.addrs[j], count=40, interval=0.002)) or 0.0

    def calibrate(self, rounds: int = 5) -> None:
        """Set the relay's hold so the ping RTT h0 -> h1 matches the profile. RTTs here are the
        25th percentile of 40 pings (``rtt_p25``): the machine's other tenants only ever add
        delay, and on a busy 2-core machine the median swings by half its value from one minute
        to the next. The relay and the TAP path cost some tens of microseconds of their own
        (measured first with no hold: ``base_rtt_us``), which the hold leaves out; feedback
        rounds then absorb the extra cost of a timed wake-up (within 3% ends it)."""
        if self.n < 2:
            return
        self.relay_cmd("delay 0")
        self.base_rtt_us = self.rtt()
        hold = max(0.0, (self.profile.rtt_us - self.base_rtt_us) / 2)
        for _ in range(rounds):
            self.relay_cmd(f"delay {hold:.1f}")
            got = self.rtt()
            if not got:
                break
            err = got - self.profile.rtt_us
            if abs(err) < 0.03 * self.profile.rtt_us:
                break
            hold = min(self.profile.rtt_us / 2, max(0.0, hold - err / 2))
        self.one_way_us = hold
        self.relay_cmd(f"delay {hold:.1f}")
        self.relay_cmd("reset")

    def set_shaping(self, on: bool) -> None:
        """Remove (or restore) every host's tbf: what the links carry without the rate limit."""
        for h in self.hosts:
            if on and self.profile.rate:
                _tc(h, "qdisc", "replace", "dev", "eth0", "root", "tbf", *_tbf_args(self.profile.rate))
            elif not on:
                subprocess.run(["ip", "netns", "exec", h, "tc", "qdisc", "del", "dev", "eth0", "root"],
                               capture_output=True, timeout=10)

    def down(self) -> None:
        if self.relay is not None:
            try:
                self.relay.stdin.close()          # the relay exits on end of input
                self.relay.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.relay.kill()
                self.relay.wait(timeout=5)
            self.relay = None
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
        if self.relay is not None:
            # the relay needs the cores as much as the ranks do: ranks that busy-poll while
            # waiting starve it and every message waits for a time slice (measured: 2304-byte
            # Allreduce at 1gbe 0.6-1.4 ms polling, against ~0.2 ms yielding)
            env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
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
