"""mpillm.runtime.memory: MemAvailable capped by the cgroup's memory limit (v2 and v1), on fake files."""
from mpillm.runtime.memory import available_memory

GIB = 1 << 30


def _meminfo(tmp_path, kib=None):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       16000000 kB\n" + (f"MemAvailable:   {kib} kB\n" if kib is not None else ""))
    return f


def _v2(tmp_path, limit, used, rel="user.slice/job_1"):
    cg = tmp_path / "self_cgroup"
    cg.write_text(f"0::/{rel}\n")
    d = tmp_path / "cgroup" / rel
    d.mkdir(parents=True)
    (d / "memory.max").write_text(f"{limit}\n")
    (d / "memory.current").write_text(f"{used}\n")
    return cg, tmp_path / "cgroup"


def test_meminfo_only(tmp_path):
    assert available_memory(_meminfo(tmp_path, 8 * GIB // 1024), tmp_path / "none", tmp_path) == 8 * GIB


def test_unknown_is_none(tmp_path):
    assert available_memory(_meminfo(tmp_path), tmp_path / "none", tmp_path) is None
    assert available_memory(tmp_path / "nothing", tmp_path / "none", tmp_path) is None


def test_cgroup_v2_limit_caps_memavailable(tmp_path):
    cg, root = _v2(tmp_path, 4 * GIB, 1 * GIB)
    assert available_memory(_meminfo(tmp_path, 8 * GIB // 1024), cg, root) == 3 * GIB
    # a limit above what the host has left does not raise the figure
    assert available_memory(_meminfo(tmp_path, 2 * GIB // 1024), cg, root) == 2 * GIB
    # no MemAvailable: the cgroup's headroom alone
    assert available_memory(tmp_path / "nothing", cg, root) == 3 * GIB


def test_cgroup_v2_without_limit(tmp_path):
    cg, root = _v2(tmp_path, "max", 1 * GIB)
    assert available_memory(_meminfo(tmp_path, 8 * GIB // 1024), cg, root) == 8 * GIB


def test_cgroup_over_its_limit_gives_zero(tmp_path):
    cg, root = _v2(tmp_path, 1 * GIB, 2 * GIB)
    assert available_memory(_meminfo(tmp_path, 8 * GIB // 1024), cg, root) == 0


def test_cgroup_v1(tmp_path):
    cg = tmp_path / "self_cgroup"
    cg.write_text("12:cpu,cpuacct:/slurm/job_7\n5:memory:/slurm/job_7\n0::/\n")
    d = tmp_path / "cgroup" / "memory" / "slurm" / "job_7"
    d.mkdir(parents=True)
    (d / "memory.limit_in_bytes").write_text(f"{6 * GIB}\n")
    (d / "memory.usage_in_bytes").write_text(f"{2 * GIB}\n")
    assert available_memory(_meminfo(tmp_path, 8 * GIB // 1024), cg, tmp_path / "cgroup") == 4 * GIB
    # v1's "no limit" is a huge number
    (d / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert available_memory(_meminfo(tmp_path, 8 * GIB // 1024), cg, tmp_path / "cgroup") == 8 * GIB
