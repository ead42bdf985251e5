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
