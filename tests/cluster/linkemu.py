"""A switch with real latency: a userspace relay between TAP devices (this kernel has no netem).

    ip netns exec NS python tests/cluster/linkemu.py --ports 2 --one-way-us 110 --rate 1gbit

creates TAP devices ``p0 .. p{n-1}`` in its own network namespace, prints ``ready`` and then
forwards Ethernet frames between them like a learning switch, holding every frame until
``arrival + one-way delay`` (a timer heap; frames leave in the order of their due time) and
serializing each egress port at the link rate (``depart = max(arrival + delay, port busy
until)``, so several senders into one port queue up as on a real switch; a frame that
would wait more than ``--queue-ms`` beyond its delay is dropped, the switch's buffer).
The caller moves each TAP into its host's namespace (``ip link set p{i} netns ...``): the
file descriptors stay with the relay, so every frame between hosts passes through it, and
when the relay exits the devices vanish with it.

The TAPs carry virtio-net headers with TSO/GSO offloads on, so a bulk TCP stream arrives
as up to 64 KiB super-frames and the relay handles ~20 k frames/s at 10 Gbit/s instead of
800 k; the header travels with the frame to the receiving TAP, which segments or
coalesces as the kernel's own bridge would.

Commands on stdin (one per line): ``delay US`` sets the one-way delay, ``stats`` prints one
JSON line (frames, bytes, drops, and how late the relay wrote frames against their due time:
median / 99th percentile / max in microseconds, the emulator's own overhead), ``quit``.
The timer slack of this process is set to 1 ns so that ``select`` wakes on time.
"""
from __future__ import annotations

import argparse
import ctypes
import fcntl
import heapq
import json
import os
import select
import struct
import sys
import time

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
VNET_HDR = 10                  # sizeof(struct virtio_net_hdr), the TAP default
PR_SET_TIMERSLACK = 29
FRAME_MAX = 65536 + VNET_HDR + 64


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    return fd


def rate_bits(rate: str) -> float:
    for suffix, mult in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if rate.endswith(suffix):
            return float(rate[: -len(suffix)]) * mult
    return float(rate)


class Relay:
    def __init__(self, n_ports: int, one_way_s: float, rate_bps: float, queue_s: float, prefix: str = "p"):
        self.fds = [open_tap(f"{prefix}{i}") for i in range(n_ports)]
        self.port_of_fd = {fd: i for i, fd in enumerate(self.fds)}
        self.delay = one_way_s
        self.byte_s = 8.0 / rate_bps if rate_bps else 0.0   # seconds per byte on the wire
        self.queue_s = queue_s
        self.busy = [0.0] * n_ports                         # egress port busy until
        self.mac: dict[bytes, int] = {}                     # learned source MAC -> port
        self.heap: list = []                                # (due, seq, port, frame)
        self.seq = 0
        self.frames = self.bytes = self.drops = 0
        self.late: list[float] = []                         # write time - due time, seconds

    def _enqueue(self, now: float, port: int, frame: bytes) -> None:
        due = max(now + self.delay, self.busy[port])
        if due - (now + self.delay) > self.queue_s:
            self.drops += 1
            return
        self.busy[port] = due + (len(frame) - VNET_HDR) * self.byte_s
        self.seq += 1
        heapq.heappush(self.heap, (due, self.seq, port, frame))

    def _receive(self, fd: int, now: float) -> None:
        src = self.port_of_fd[fd]
        for _ in range(64):                      # drain what is queued, bounded
            try:
                frame = os.read(fd, FRAME_MAX)
            except BlockingIOError:
                return
            if len(frame) < VNET_HDR + 14:
                continue
            self.mac[frame[VNET_HDR + 6:VNET_HDR + 12]] = src
            dst = frame[VNET_HDR:VNET_HDR + 6]
            port = self.mac.get(dst) if not dst[0] & 1 else None   # multicast bit: flood
            if port is None:
                for p in range(len(self.fds)):
                    if p != src:
                        self._enqueue(now, p, frame)
            elif port != src:
                self._enqueue(now, port, frame)

    def _send_due(self, now: float) -> None:
        heap = self.heap
        while heap and heap[0][0] <= now:
            due, _, port, frame = heapq.heappop(heap)
            try:
                os.write(self.fds[port], frame)
            except (BlockingIOError, OSError):
                self.drops += 1
                continue
            self.frames += 1
            self.bytes += len(frame) - VNET_HDR
            if len(self.late) < 200000:
                self.late.append(time.monotonic() - due)

    def stats(self) -> dict:
        late = sorted(self.late)
        pick = (lambda q: round(late[min(len(late) - 1, int(q * len(late)))] * 1e6, 1)) if late else (lambda q: None)
        return {"frames": self.frames, "bytes": self.bytes, "drops": self.drops, "one_way_us": self.delay * 1e6,
                "late_us_p50": pick(0.5), "late_us_p99": pick(0.99), "late_us_max": pick(1.0)}

    def command(self, line: str) -> bool:
        words = line.split()
        if not words:
            return True
        if words[0] == "delay":
            self.delay = float(words[1]) * 1e-6
            self.late.clear()
        elif words[0] == "stats":
            print(json.dumps(self.stats()), flush=True)
        elif words[0] == "reset":
            self.late.clear()
            self.frames = self.bytes = self.drops = 0
        elif words[0] == "quit":
            return False
        return True

    def run(self, control: int | None = None) -> None:
        rlist = list(self.fds) + ([control] if control is not None else [])
        pending = b""
        while True:
            now = time.monotonic()
            self._send_due(now)
            timeout = max(0.0, self.heap[0][0] - time.monotonic()) if self.heap else None
            ready, _, _ = select.select(rlist, [], [], timeout)
            now = time.monotonic()
            for fd in ready:
                if fd == control:
                    data = os.read(control, 4096)
                    if not data:
                        return
                    pending += data
                    while b"\n" in pending:
                        line, pending = pending.split(b"\n", 1)
                        if not self.command(line.decode()):
                            return
                else:
                    self._receive(fd, now)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ports", type=int, required=True)
    p.add_argument("--one-way-us", type=float, default=0.0, help="delay added to every frame")
    p.add_argument("--rate", default="", help="egress rate of every port, e.g. 1gbit (default: unlimited)")
    p.add_argument("--queue-ms", type=float, default=20.0, help="egress queue beyond the delay before drops")
    p.add_argument("--prefix", default="p", help="TAP device name prefix")
    a = p.parse_args(argv)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    relay = Relay(a.ports, a.one_way_us * 1e-6, rate_bits(a.rate) if a.rate else 0.0, a.queue_ms * 1e-3, a.prefix)
    print("ready", flush=True)
    relay.run(control=sys.stdin.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
