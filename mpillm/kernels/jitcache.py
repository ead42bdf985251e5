"""numba's on-disk cache, made safe for several processes (the ranks of a node) at once.

numba saves a compiled function in two steps -- the index (signature -> data file name, the name
picked as the first number the index it just read does not use) then the data file -- with no
lock. Two ranks saving different signatures of one function at the same moment can both pick
``.1.nbc``: the index then names one signature's file while the file holds the other's machine
code, and a later process that loads that signature runs code compiled for other argument types.
A reader between the two steps can likewise pair a new index with an old data file.

``install()`` wraps numba's ``IndexDataCacheFile.save`` in an exclusive and ``load`` in a shared
``flock`` on one lock file per cache directory, so a save (index and data) is atomic to every
other process's save and load. It costs one flock per cached function loaded or saved
(microseconds) and does nothing where ``fcntl`` is missing.
"""
from __future__ import annotations

import contextlib
import os

LOCK_NAME = ".mpillm-cache.lock"
_installed = False


@contextlib.contextmanager
def _flock(cache_path: str, exclusive: bool):
    import fcntl

    os.makedirs(cache_path, exist_ok=True)
    fd = os.open(os.path.join(cache_path, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)     # releases the lock


def install() -> bool:
    """Patch numba's cache file class once per process; False where it cannot (no fcntl, or a
    numba without ``IndexDataCacheFile``: the cache then works as numba ships it)."""
    global _installed
    if _installed:
        return True
    try:
        import fcntl  # noqa: F401
        from numba.core.caching import IndexDataCacheFile
    except ImportError:
        return False
    save, load = IndexDataCacheFile.save, IndexDataCacheFile.load

    def locked_save(self, key, data):
        with _flock(self._cache_path, exclusive=True):
            return save(self, key, data)

    def locked_load(self, key):
        if not os.path.isdir(self._cache_path):
            return None          # nothing cached yet; do not create the directory just to look
        with _flock(self._cache_path, exclusive=False):
            return load(self, key)

    locked_save.__wrapped__, locked_load.__wrapped__ = save, load
    IndexDataCacheFile.save, IndexDataCacheFile.load = locked_save, locked_load
    _installed = True
    return True
