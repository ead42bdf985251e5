"""The CFS quota ``--wait auto`` reads (mpillm.runtime.collectives.cpu_quota): a rank under a
CPU quota must block instead of polling, so the quota has to be found where the kernel keeps it
for this process, on cgroup v1, hybrid and v2 hosts."""
from __future__ import annotations

from pathlib import Path

from mpillm.runtime.collectives import cpu_quota


def _cg(root: Path, rel: str, **files) -> None:
    d = root / rel
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name.replace("__", ".")).write_text(text + "\n")


def test_cpu_quota_reads_this_process_cgroup(tmp_path):
    """The quota is read from the process's own cgroup and its parents, not from the
    hierarchy's root, which never has one. Control: reading only the root (the old lookup on a
    v1 / hybrid host such as this machine, where scripts/split_bench.py's throttled rank then
    polled under --wait auto) returns None in the first two cases."""
    # cgroup v1 / hybrid: the cpu controller's line names the cgroup; 0:: is the empty v2 root
    v1 = tmp_path / "v1"
    _cg(v1, "cpu", cpu__cfs_quota_us="-1", cpu__cfs_period_us="100000")
    _cg(v1, "cpu/job/rank1", cpu__cfs_quota_us="5000", cpu__cfs_period_us="10000")
    assert cpu_quota("2:cpuacct:/\n1:cpu:/job/rank1\n0::/\n", v1) == 0.5
    # a limit on a parent binds its children
    _cg(v1, "cpu/job", cpu__cfs_quota_us="25000", cpu__cfs_period_us="100000")
    assert cpu_quota("1:cpu:/job/rank1\n0::/\n", v1) == 0.25
    # the controllers co-mounted under their joint name
    _cg(v1, "cpu,cpuacct/x", cpu__cfs_quota_us="150000", cpu__cfs_period_us="100000")
    (v1 / "cpu").rename(v1 / "cpu-gone")
    assert cpu_quota("1:cpu,cpuacct:/x\n", v1) == 1.5
    # cgroup v2: cpu.max, the smallest on the way up
    v2 = tmp_path / "v2"
    _cg(v2, "a", cpu__max="50000 100000")
    _cg(v2, "a/b", cpu__max="max 100000")
    assert cpu_quota("0::/a/b\n", v2) == 0.5
    # no quota anywhere
    assert cpu_quota("0::/a/b\n", tmp_path / "none") is None
    assert cpu_quota("1:cpu:/job/rank1\n0::/\n", tmp_path / "none") is None

