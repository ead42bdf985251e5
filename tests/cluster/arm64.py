"""An emulated arm64 node: a Debian arm64 root run through qemu-user (binfmt_misc).

    python tests/cluster/arm64.py build                       # build or reuse the root, install mpillm
    python tests/cluster/arm64.py run --cpu cortex-a72 -- python -c "import platform; print(platform.machine())"
    python tests/cluster/arm64.py why                         # why this machine cannot (exit 1), or nothing

The root is made once with ``debootstrap --foreign --arch=arm64`` (its second stage runs
under qemu) from the Debian mirror this machine's apt sources name, read at run time. It
lives in ``$MPILLM_ARM64_CACHE/root`` (default: ``cache/arm64/root`` in the checkout) and is
reused by later runs. mpillm goes in the way ``scripts/setup.sh`` installs it: the checkout's
tracked files are copied to ``/src/mpillm`` in the root and ``scripts/setup.sh`` runs there
(venv ``/opt/mpillm-venv``; pip reinstalls only when pyproject.toml changed). pip inside
the root uses this machine's pip configuration: its config files, the files and local wheel
directories they name, the CA bundle and ``PIP_*`` variables are bind-mounted / passed in,
read-only; nothing about them is written into the root.

Every command runs in a private mount namespace (``unshare --mount``: /proc, /dev, /sys
and the pip files are mounted there and vanish with it) and a chroot, under
``QEMU_CPU=<cpu>`` (qemu-user emulates that CPU: its ``AT_HWCAP`` says which instructions
exist and an instruction it lacks raises SIGILL) and a timeout that kills the whole
process group. The numba cache of each CPU model stays in the root
(``/var/cache/mpillm/<cpu>``), so later steps of a run reuse what earlier ones compiled.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))        # tests/ (mpiutil)

from mpiutil import kill_session  # noqa: E402
CACHE = Path(os.environ.get("MPILLM_ARM64_CACHE") or REPO / "cache" / "arm64")
ROOT = CACHE / "root"
SRC = "/src/mpillm"                 # the checkout's copy inside the root
VENV = "/opt/mpillm-venv"           # the project venv inside the root
BINFMT = Path("/proc/sys/fs/binfmt_misc")
PACKAGES = "python3,python3-venv"   # debootstrap --include (minbase has no Python)
CPUS = ("cortex-a76", "cortex-a72")  # Raspberry Pi 5 (ARMv8.2 + dot product), Raspberry Pi 4 (ARMv8.0)
STAMP = ROOT / ".mpillm-root"


class Unavailable(RuntimeError):
    """This machine cannot run the emulated node (the message says why)."""


# -- what the machine needs -------------------------------------------------------------------
def _qemu_registered() -> bool:
    f = BINFMT / "qemu-aarch64"
    return f.exists() and f.read_text().startswith("enabled")


def ensure_binfmt() -> None:
    """Mount binfmt_misc if needed and enable qemu-aarch64 (Debian's entry has the F flag:
    the kernel opens qemu at registration, so the root needs no copy of it)."""
    if not (BINFMT / "register").exists():
        r = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], capture_output=True, text=True)
        if r.returncode:
            raise Unavailable(f"cannot mount binfmt_misc on {BINFMT}: {r.stderr.strip()}")
    if not _qemu_registered() and shutil.which("update-binfmts"):
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True, text=True)
    if not _qemu_registered():
        raise Unavailable("binfmt_misc has no enabled qemu-aarch64 entry (install qemu-user-static and "
                          "binfmt-support, then `update-binfmts --enable qemu-aarch64`)")


def why_not() -> str | None:
    """None if the emulated node can run here, else the reason (for pytest.skip)."""
    if platform.system() != "Linux":
        return "the emulated arm64 node needs Linux (binfmt_misc, namespaces)"
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "this machine is aarch64 itself: run the tests natively"
    if os.geteuid() != 0:
        return "the emulated arm64 node needs root (debootstrap, chroot, mounts)"
    missing = [c for c in ("debootstrap", "unshare", "chroot", "mount") if not shutil.which(c)]
    if not Path("/usr/libexec/qemu-binfmt/aarch64-binfmt-P").exists() and not shutil.which("qemu-aarch64-static"):
        missing.append("qemu-aarch64-static")
    if missing:
        return f"the emulated arm64 node needs {', '.join(missing)} (Debian: qemu-user-static debootstrap binfmt-support)"
    try:
        ensure_binfmt()
    except Unavailable as e:
        return str(e)
    return None


def apt_mirror() -> tuple[str, str]:
    """(mirror URI, suite) of this machine's main Debian archive, from its apt sources (deb822
    ``*.sources`` or one-line ``sources.list``); the security archive is skipped."""
    entries: list[tuple[str, list[str], list[str]]] = []  # (uri, suites, components)
    src = Path("/etc/apt")
    for f in sorted((src / "sources.list.d").glob("*.sources")):
        for para in re.split(r"\n\s*\n", f.read_text()):
            kv = {}
            for line in para.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                k, v = line.split(":", 1)
                kv[k.strip().lower()] = v.split()
            if "deb" in kv.get("types", []) and kv.get("enabled", ["yes"])[0] != "no":
                for uri in kv.get("uris", []):
                    entries.append((uri, kv.get("suites", []), kv.get("components", [])))
    for f in [src / "sources.list", *sorted((src / "sources.list.d").glob("*.list"))]:
        for line in f.read_text().splitlines() if f.exists() else []:
            w = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(w) >= 4 and w[0] == "deb":
                entries.append((w[1], [w[2]], w[3:]))
    codename = _os_release().get("VERSION_CODENAME", "bookworm")
    for uri, suites, comps in entries:
        if codename in suites and "main" in comps and "security" not in uri:
            return uri, codename
    raise Unavailable(f"no apt source for Debian {codename} main found in /etc/apt (needed for debootstrap)")


def _os_release() -> dict:
    out = {}
    for line in Path("/etc/os-release").read_text().splitlines() if Path("/etc/os-release").exists() else []:
        if "=" in line:
            k, v = line.split("=", 1)
            out[k] = v.strip('"')
    return out


# -- pip configuration of this machine ----------------------------------------------------------
def pip_binds() -> list[str]:
    """Host paths pip needs inside the root: its config files and every existing absolute path
    their values or the PIP_* variables name (constraints, CA bundle, local wheel/index dirs)."""
    r = subprocess.run([sys.executable, "-m", "pip", "config", "debug"], capture_output=True, text=True)
    words: list[str] = []
    for line in r.stdout.splitlines():
        m = re.match(r"\s+(/\S+), exists: True", line)
        if m:
            words.append(m.group(1))
        elif ":" in line or "=" in line:
            words += re.split(r"[\s'=:]+", line.split(":", 1)[-1] if ":" in line else line)
    for k, v in os.environ.items():
        if k.startswith("PIP_"):
            words += v.split()
    out: list[str] = []
    for w in words:
        w = w.strip("'\"")
        w = w[len("file://"):] if w.startswith("file://") else w
        if w.startswith("/"):
            w = "/" + w.lstrip("/")
            if w.endswith("/simple"):   # a local index: its pages link to ../../files
                w = w[: -len("/simple")]
        if w.startswith("/") and os.path.exists(w) and w not in out:
            out.append(w)
    # a directory already in the list covers the files under it
    return [p for p in out if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in out)]


def pip_env() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith("PIP_")}


# -- building the root ---------------------------------------------------------------------------
@contextmanager
def _lock():
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def build_root(log=print) -> Path:
    """The Debian arm64 root, made on first use (debootstrap, ~4 min) and reused after."""
    if STAMP.exists():
        return ROOT
    why = why_not()
    if why:
        raise Unavailable(why)
    with _lock():
        if STAMP.exists():
            return ROOT
        mirror, suite = apt_mirror()
        tmp = CACHE / "root.tmp"
        if tmp.exists():
            _unmount_under(tmp)
            shutil.rmtree(tmp)
        t0 = time.time()
        log(f"arm64: debootstrap --foreign --arch=arm64 {suite} (the mirror of this machine's apt sources)")
        _check(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase", f"--include={PACKAGES}",
                suite, str(tmp), mirror], timeout=1200)
        log(f"arm64: second stage under qemu ({time.time() - t0:.0f} s so far)")
        _check(["chroot", str(tmp), "/debootstrap/debootstrap", "--second-stage"], timeout=1800,
               env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"})
        # no registry host stays in a file: the root never runs apt again
        for f in (tmp / "etc/apt/sources.list", *(tmp / "etc/apt/sources.list.d").glob("*")):
            f.unlink(missing_ok=True)
        (tmp / STAMP.name).write_text(f"debootstrap {suite} arm64 {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        tmp.rename(ROOT)
        log(f"arm64: root ready in {time.time() - t0:.0f} s")
    return ROOT


def _unmount_under(path: Path) -> None:
    for line in reversed(Path("/proc/mounts").read_text().splitlines()):
        mnt = line.split()[1]
        if mnt.startswith(str(path) + "/"):
            subprocess.run(["umount", "-l", mnt], capture_output=True)


def _check(argv, timeout, env=None):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode:
        raise RuntimeError(f"{' '.join(argv[:3])} ... failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r


def sync_project() -> None:
    """Copy the checkout's tracked files (as they are in the working tree) to /src/mpillm."""
    dest = ROOT / SRC.lstrip("/")
    r = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       capture_output=True)
    if r.returncode:
        raise RuntimeError(f"git ls-files failed in {REPO}: {r.stderr.decode()}")
    files = [f for f in r.stdout.decode().split("\0") if f and (REPO / f).is_file()]
    # in place (a process running from the copy keeps its working directory): changed files are
    # replaced, files the checkout no longer has are removed, caches and mount points stay
    keep = set(files)
    for f in files:
        src, dst = REPO / f, dest / f
        if dst.is_file() and not dst.is_symlink() and dst.stat().st_size == src.stat().st_size \
                and dst.read_bytes() == src.read_bytes():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    for d in ("mpillm", "convert", "tests", "scripts", "benchmarks", "hpl"):
        for p in (dest / d).rglob("*.py") if (dest / d).exists() else []:
            if str(p.relative_to(dest)) not in keep and "__pycache__" not in p.parts:
                p.unlink()


def install(log=print, timeout: float = 1500) -> None:
    """Install mpillm into the root the way scripts/setup.sh does (kernels compile later, per CPU)."""
    build_root(log)
    with _lock():
        sync_project()
        host_paths()
        t0 = time.time()
        r = run(["scripts/setup.sh"], timeout=timeout, env={"MPILLM_SKIP_WARMUP": "1"}, check=False)
        if r.returncode:
            raise RuntimeError(f"scripts/setup.sh in the arm64 root failed ({r.returncode}):\n"
                               f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        if time.time() - t0 > 5:
            log(f"arm64: setup.sh in the root took {time.time() - t0:.0f} s")


# -- running commands in it -----------------------------------------------------------------------
def numba_cache(cpu: str) -> str:
    """The numba cache of one emulated CPU model inside the root (fresh_numba_cache empties it)."""
    return f"/var/cache/mpillm-numba/{cpu}"


def fresh_numba_cache(cpu: str) -> None:
    d = ROOT / numba_cache(cpu).lstrip("/")
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)


def env_for(cpu: str | None, extra: dict | None = None) -> dict:
    env = {
        "PATH": f"{VENV}/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "HOME": "/root", "LANG": "C.UTF-8", "TMPDIR": "/tmp",
        "MPILLM_VENV": VENV,
        # pip byte-compiles every module it installs (minutes under emulation); imports compile
        # and cache only the modules a run uses
        "PIP_NO_COMPILE": "1",
        "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
        **pip_env(),
    }
    env["MPILLM_CACHE"] = "/var/cache/mpillm"   # converted models; numba's cache: numba_cache(cpu)
    if cpu:
        env["QEMU_CPU"] = cpu
        env["NUMBA_CACHE_DIR"] = numba_cache(cpu)
    env.update(extra or {})
    return env


def wrap(argv: list[str], cpu: str | None = None, env: dict | None = None, cwd: str = SRC,
         binds: list[str] | None = None) -> list[str]:
    """The host command line that runs ``argv`` inside the root (private mounts + chroot)."""
    binds = pip_binds() + ["/etc/resolv.conf"] + list(binds or [])
    for b in binds:                       # mount points inside the root (empty files / dirs)
        target = ROOT / b.lstrip("/")
        if os.path.isdir(b):
            target.mkdir(parents=True, exist_ok=True)
        elif not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
    r = shlex.quote(str(ROOT))
    script = [f"mount -t proc proc {r}/proc", f"mount --rbind /dev {r}/dev", f"mount --rbind /sys {r}/sys"]
    for b in binds:
        t = f"{r}{shlex.quote(b)}"
        script.append(f"mount --bind {shlex.quote(b)} {t} && mount -o remount,bind,ro {t}")
    e = env_for(cpu, env)
    script.append(f"exec chroot {r} /usr/bin/env -i " + " ".join(shlex.quote(f"{k}={v}") for k, v in e.items())
                  + f" /bin/sh -c 'cd {shlex.quote(cwd)} && exec \"$@\"' sh " + " ".join(map(shlex.quote, argv)))
    return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-ec", "\n".join(script)]


def run(argv: list[str], cpu: str | None = None, timeout: float = 600, env: dict | None = None,
        check: bool = True, cwd: str = SRC, capture: bool = True) -> subprocess.CompletedProcess:
    """Run ``argv`` in the root under QEMU_CPU=cpu; the whole process group dies at the timeout."""
    p = subprocess.Popen(wrap(argv, cpu, env, cwd), start_new_session=True, text=True,
                         stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(p)
        out, err = p.communicate()
        raise TimeoutError(f"arm64 ({cpu}): {' '.join(argv)} did not finish in {timeout:.0f} s\n"
                           f"{(out or '')[-2000:]}\n{(err or '')[-2000:]}")
    finally:
        if p.poll() is None:
            kill_session(p)
    r = subprocess.CompletedProcess(argv, p.returncode, out, err)
    if check and r.returncode:
        raise RuntimeError(f"arm64 ({cpu}): {' '.join(argv)} exited {r.returncode}\n{(out or '')[-3000:]}\n{(err or '')[-3000:]}")
    return r


def host_paths() -> None:
    """Make this checkout's own paths work inside the root (a launcher on an x86 host names its
    venv and working directory in the commands it sends): <checkout> -> /src/mpillm and
    /src/mpillm/.venv -> /opt/mpillm-venv, as symlinks in the root."""
    # relative links: they resolve inside the root from the host side too (bind-mount targets)
    link = ROOT / str(REPO).lstrip("/")
    if not link.is_symlink():
        if link.exists():
            raise RuntimeError(f"{link} exists in the root and is not a symlink")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(ROOT / SRC.lstrip("/"), link.parent))
    venv = ROOT / SRC.lstrip("/") / ".venv"
    if not venv.is_symlink():
        venv.symlink_to(os.path.relpath(ROOT / VENV.lstrip("/"), venv.parent))


def agent(argv: list[str]) -> int:
    """PRRTE's ssh stand-in for a cluster of emulated hosts some of which are arm64 nodes:
    ``agent [ssh options] HOST COMMAND...``. A host whose index is in MPILLM_ARM64_HOSTS
    (comma-separated) runs COMMAND in its network namespace *inside the arm64 root* under
    QEMU_CPU=MPILLM_ARM64_CPU, with the host paths of MPILLM_ARM64_BIND (colon-separated;
    e.g. the converted-model cache) bind-mounted; the others go to nsexec.sh as usual."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in ("-o", "-p", "-l", "-i") else 1
    host, cmd = argv[i], argv[i + 1:]
    base = os.environ.get("MPILLM_NETNS_SUBNET_BASE", "10.213.57")
    idx = int(host.rsplit(".", 1)[1]) - 1 if host.startswith(base + ".") else int(host.lstrip("h"))
    arm = {int(x) for x in os.environ.get("MPILLM_ARM64_HOSTS", "").split(",") if x.strip()}
    if idx not in arm:
        os.execvp("sh", ["sh", str(HERE / "nsexec.sh"), *argv])
    ns = os.environ["MPILLM_NETNS_PREFIX"] + str(idx)
    binds = [b for b in os.environ.get("MPILLM_ARM64_BIND", "").split(":") if b]
    cpu = os.environ.get("MPILLM_ARM64_CPU", CPUS[0])
    # a numba cache of its own: the ranks of a mixed job must not share (or wipe) a test session's
    extra = {"NUMBA_CACHE_DIR": numba_cache(cpu) + "-mixed"}
    inner = wrap(["/bin/sh", "-c", " ".join(cmd)], cpu, env=extra, cwd="/", binds=binds)
    os.execvp("ip", ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c",
                     f'hostname h{idx} && exec "$@"', "sh", *inner])
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("why", help="print why this machine cannot run the emulated node (exit 1), else nothing")
    sub.add_parser("build", help="build or reuse the root and install mpillm into it")
    rp = sub.add_parser("run", help="run a command in the root")
    rp.add_argument("--cpu", default=CPUS[0], help="QEMU_CPU (default %(default)s)")
    rp.add_argument("--timeout", type=float, default=3600)
    rp.add_argument("argv", nargs=argparse.REMAINDER)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["agent"]:
        return agent(argv[1:])
    a = ap.parse_args(argv)
    if a.cmd == "why":
        w = why_not()
        if w:
            print(w)
        return 1 if w else 0
    if a.cmd == "build":
        t0 = time.time()
        install(log=lambda s: print(s, file=sys.stderr, flush=True))
        print(f"arm64 root ready: {ROOT} ({time.time() - t0:.0f} s)")
        return 0
    args = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
    return run(args, a.cpu, a.timeout, check=False, capture=False).returncode


if __name__ == "__main__":
    sys.exit(main())
