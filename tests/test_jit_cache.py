"""The jit cache directory is keyed by the package's sources (mpillm/__init__.py)."""
import os
import subprocess
import sys
import time

from mpiutil import ROOT


def _cache_dir(env: dict) -> str:
    code = "import os, mpillm; print(os.environ['NUMBA_CACHE_DIR'])"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True, timeout=120).stdout.strip()


def test_keyed_by_sources_inherited_and_pruned(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    env.pop("PYTHONPATH", None)
    d = _cache_dir(env)
    assert os.path.dirname(d) == str(tmp_path) and os.path.basename(d).startswith("src-")
    # a child that inherits the keyed directory keeps it (no src-x/src-x nesting)
    assert _cache_dir(dict(env, NUMBA_CACHE_DIR=d)) == d
    # other versions' caches: an old one is dropped, a recent one kept
    stale, recent = tmp_path / "src-000000000000", tmp_path / "src-111111111111"
    stale.mkdir()
    recent.mkdir()
    t = time.time() - 30 * 86400
    os.utime(stale, (t, t))
    _cache_dir(env)
    assert not stale.exists() and recent.exists()


# -- several processes on one cache (the ranks of a node): mpillm/kernels/jitcache.py -------------------
SAVER = """
import os, sys, time
cache, tag, procs, lock, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5])
if lock:
    from mpillm.kernels import jitcache
    assert jitcache.install()
from numba.core.caching import IndexDataCacheFile
f = IndexDataCacheFile(cache, "fn", ("stamp", 1))
open(os.path.join(cache, "ready." + tag), "w").close()
while sum(x.startswith("ready.") for x in os.listdir(cache)) < procs:     # all begin together
    time.sleep(0.001)
for i in range(n):
    f.save((tag, i), ("payload", tag, i, b"x" * 20000))
"""


def _concurrent_saves(cache, lock: bool, procs: int = 4, n: int = 100) -> tuple[int, int]:
    """``procs`` processes save ``n`` entries each (distinct keys) into one function's cache at
    once; returns (entries the index lost, entries whose data file holds another key's data)."""
    from numba.core.caching import IndexDataCacheFile

    cache.mkdir()
    ps = [subprocess.Popen([sys.executable, "-c", SAVER, str(cache), f"p{k}", str(procs), str(int(lock)), str(n)],
                           cwd=ROOT, env=dict(os.environ)) for k in range(procs)]
    for p in ps:
        assert p.wait(timeout=300) == 0
    f = IndexDataCacheFile(str(cache), "fn", ("stamp", 1))
    index = f._load_index()
    wrong = sum(1 for key, name in index.items() if f._load_data(name)[1:3] != key)
    return procs * n - len(index), wrong


def test_concurrent_saves_keep_every_entry_with_its_own_code(tmp_path):
    """numba's cache picks a data file name from the index it read, unlocked: processes saving at
    once lose entries and, worse, leave an index entry naming another signature's machine code.
    With mpillm.kernels.jitcache nothing is lost or crossed. Negative control first: without the lock the
    same run damages the cache (up to 5 tries, in case the processes did not overlap)."""
    damage = []
    for k in range(5):
        damage.append(_concurrent_saves(tmp_path / f"unlocked{k}", lock=False))
        if any(damage[-1]):
            break
    assert any(lost or wrong for lost, wrong in damage), damage
    assert _concurrent_saves(tmp_path / "locked", lock=True) == (0, 0)


def test_generated_module_is_written_once(tmp_path):
    """A generated module (mpillm.runtime.fused's blocks, the kernels' runners): a second writer (another
    rank, the same moment) leaves the first file as it is -- same inode and mtime, numba's stamp of what
    was compiled from it."""
    from mpillm.kernels.jitcache import publish as _publish

    f = tmp_path / "fused_x.py"
    _publish(f, "A = 1\n")
    st = f.stat()
    time.sleep(0.05)
    _publish(f, "A = 2\n")
    st2 = f.stat()
    assert f.read_text() == "A = 1\n" and (st2.st_ino, st2.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused_x.py"]      # no temporary left
