"""The CPU numba compiles the kernels for on aarch64, decided at start-up from AT_HWCAP.

On x86 numba's own host detection is right and nothing here changes it. On aarch64 LLVM
names the host CPU and its features from /proc/cpuinfo, which under qemu-user (and in some
containers) describes the machine underneath: LLVM then says "generic" with no features and
the kernels get no dot-product instructions. The kernel's auxiliary vector is reliable
(``getauxval(AT_HWCAP)``; qemu-user reports the emulated CPU's), so the features come from
there, and the CPU name (instruction scheduling only) from LLVM when it knows the core, else
the Raspberry Pi core with those features:

    HWCAP_ASIMDDP set    kernel path "neon-dot": numba CPU cortex-a76 (Pi 5), +dotprod -> sdot
    HWCAP_ASIMDDP clear  kernel path "neon":     numba CPU cortex-a72 (Pi 4), -dotprod

``MPILLM_KERNELS=neon`` compiles without dot products on a CPU that has them;
``MPILLM_KERNELS=portable`` leaves numba's own detection alone. An explicit
``NUMBA_CPU_NAME`` in the environment always wins (the run then gets exactly that code:
compiled for cortex-a76 on a CPU without dot products it dies of SIGILL at the first kernel).

``configure()`` runs from ``mpillm/__init__.py``, before any function is jitted (numba reads
its CPU name once, when its code generator starts). Every process decides for itself, so
ranks on different nodes each compile for their own CPU.
"""
from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass

AT_HWCAP = 16
# linux/arch/arm64/include/uapi/asm/hwcap.h -> LLVM feature names
HWCAP_BITS = {
    "fp-armv8": 0, "neon": 1, "aes": 3, "sha2": 6, "crc": 7, "lse": 8, "fullfp16": 10,
    "rdm": 12, "rcpc": 15, "dotprod": 20,
}
PI_CORE = {True: "cortex-a76", False: "cortex-a72"}   # dot product present / absent


@dataclass(frozen=True)
class Target:
    path: str            # kernel path name: "neon-dot", "neon" or "portable"
    cpu_name: str | None  # what numba compiles for (None: numba's own detection)
    features: str | None  # LLVM feature string (None: numba's own detection)
    source: str          # how it was decided


TARGET: Target | None = None   # set by configure() on aarch64
MARK = "MPILLM_NUMBA_CPU"      # NUMBA_CPU_NAME/FEATURES set by configure(), not by the user


def _mark(name, features) -> str:
    return f"{name} {features or ''}"


def is_aarch64() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


def hwcap() -> int:
    """The kernel's AT_HWCAP word (0 if it cannot be read)."""
    try:
        libc = ctypes.CDLL(None)
        libc.getauxval.restype = ctypes.c_ulong
        libc.getauxval.argtypes = [ctypes.c_ulong]
        return int(libc.getauxval(AT_HWCAP))
    except (OSError, AttributeError):
        return 0


def arm_features(word: int | None = None) -> dict[str, bool]:
    """LLVM feature -> present, for the AArch64 features the kernels can use."""
    word = hwcap() if word is None else word
    return {name: bool(word >> bit & 1) for name, bit in HWCAP_BITS.items()}


def decide(env: dict | None = None, word: int | None = None, llvm_name: str | None = None) -> Target:
    """The aarch64 target for this process (pure: arguments stand in for the machine in tests)."""
    env = os.environ if env is None else env
    want = env.get("MPILLM_KERNELS", "").strip().lower()
    feats = arm_features(word)
    if env.get("NUMBA_CPU_NAME") and env.get(MARK) != _mark(env["NUMBA_CPU_NAME"], env.get("NUMBA_CPU_FEATURES")):
        name = env["NUMBA_CPU_NAME"]
        return Target("neon-dot" if feats["dotprod"] else "neon", name, env.get("NUMBA_CPU_FEATURES"),
                      "NUMBA_CPU_NAME from the environment")
    if want == "portable":
        return Target("portable", None, None, "MPILLM_KERNELS=portable (numba's own detection)")
    dot = feats["dotprod"] and want != "neon"
    if llvm_name is None:
        try:
            from llvmlite import binding as llvm

            llvm_name = llvm.get_host_cpu_name()
        except Exception:  # noqa: BLE001 - llvmlite cannot tell: use the Pi core
            llvm_name = "generic"
    known = llvm_name not in ("", "generic")
    name = llvm_name if known else PI_CORE[dot]
    flags = [("+" if have else "-") + f for f, have in feats.items()]
    if not dot:
        flags = [f for f in flags if f[1:] != "dotprod"] + ["-dotprod"]
    src = "AT_HWCAP" + (f", LLVM host CPU {llvm_name}" if known else f" (LLVM sees a generic CPU: {name} assumed)")
    if want == "neon" and feats["dotprod"]:
        src += ", MPILLM_KERNELS=neon"
    return Target("neon-dot" if dot else "neon", name, ",".join(flags), src)


def configure() -> Target | None:
    """On aarch64: decide the target and hand it to numba's config (before anything is jitted)."""
    global TARGET
    if not is_aarch64():
        return None
    TARGET = t = decide()
    if t.source.startswith("NUMBA_CPU_NAME"):
        return t
    for k in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", MARK):
        os.environ.pop(k, None)
    if t.cpu_name is not None:
        # in the environment, so numba's config reloads keep it (a child process decides anew:
        # the mark tells it these are ours, not the user's)
        os.environ.update(NUMBA_CPU_NAME=t.cpu_name, NUMBA_CPU_FEATURES=t.features or "")
        os.environ[MARK] = _mark(t.cpu_name, t.features)
    import sys

    if "numba" in sys.modules:  # imported before us: its config has already read the variables
        from numba.core import config

        config.CPU_NAME, config.CPU_FEATURES = t.cpu_name, t.features
    return t


def describe() -> str:
    """One phrase for the plan line: what the kernels were compiled for."""
    if TARGET is None or TARGET.cpu_name is None:
        return ""
    dot = "+dotprod" in (TARGET.features or "") or (TARGET.features is None and TARGET.path == "neon-dot")
    return f"{TARGET.cpu_name}, {'dot product' if dot else 'no dot product'}"
