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

numba caches only functions that live in files, so code generated at run time (the kernel
runners of ``x86``, ``portable``, ``kquant`` and ``exact``; the fused blocks of
``mpillm.runtime.fused``) is written into the cache directory (``cache_dir()``) and imported
from there: ``load_generated()``, which writes each file once (``publish()``).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

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


def cache_dir() -> Path:
    """numba's cache directory (``mpillm/__init__.py`` keys NUMBA_CACHE_DIR by the package sources)."""
    return Path(os.environ.get("NUMBA_CACHE_DIR") or Path.home() / ".cache" / "mpillm" / "numba")


def publish(file: Path, src: str) -> None:
    """Write ``file`` whole, once: processes (the ranks of a node) that generate the same module at
    the same moment each write a private copy and hard-link it into place, and only the first link
    lands; an existing file is never rewritten. (Replacing it would change its mtime, numba's stamp
    of the cache entries already compiled from it, and the other ranks would discard and recompile
    them.)"""
    tmp = file.with_name(file.name + f".tmp{os.getpid()}")
    tmp.write_text(src)
    try:
        os.link(tmp, file)
    except FileExistsError:
        pass
    except OSError:              # a file system without hard links: replace, as before
        if not file.exists():
            os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)


def load_generated(group: str, stem: str, src: str, namespace: dict | None = None) -> ModuleType:
    """Import generated source ``src`` as module ``mpillm_<stem>_<hash of src>`` from the file
    ``<cache_dir()>/mpillm_<group>/<stem>_<hash>.py`` (written by ``publish`` when missing), once per
    process. ``namespace``: names bound in the module before its code runs (the intrinsics and
    constants its functions use), so the generated file imports nothing from its generator."""
    tag = hashlib.sha1(src.encode()).hexdigest()[:12]
    base = cache_dir() / f"mpillm_{group}"
    base.mkdir(parents=True, exist_ok=True)
    file = base / f"{stem}_{tag}.py"
    if not file.exists():
        publish(file, src)
    modname = f"mpillm_{stem}_{tag}"
    if modname in sys.modules:
        return sys.modules[modname]
    spec = importlib.util.spec_from_file_location(modname, file)
    mod = importlib.util.module_from_spec(spec)
    mod.__dict__.update(namespace or {})
    sys.modules[modname] = mod
    spec.loader.exec_module(mod)
    return mod
