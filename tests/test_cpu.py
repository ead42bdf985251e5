"""mpillm.runtime.cpu: the aarch64 kernel path and numba CPU decided from AT_HWCAP (pure logic, any host;
the emulated Pi 5 / Pi 4 runs in tests/test_arm64.py exercise it for real)."""
from __future__ import annotations

from mpillm.runtime import cpu

FP_ASIMD = 1 << 0 | 1 << 1
DOT = 1 << 20


def test_dot_product_picks_neon_dot_for_a76():
    t = cpu.decide({}, FP_ASIMD | DOT, "generic")
    assert (t.path, t.cpu_name) == ("neon-dot", "cortex-a76")
    assert "+dotprod" in t.features.split(",") and "+neon" in t.features.split(",")
    assert "generic" in t.source


def test_no_dot_product_picks_neon_for_a72():
    t = cpu.decide({}, FP_ASIMD, "generic")
    assert (t.path, t.cpu_name) == ("neon", "cortex-a72")
    assert "-dotprod" in t.features.split(",") and "+dotprod" not in t.features


def test_forced_neon_drops_dotprod_on_a_cpu_that_has_it():
    t = cpu.decide({"MPILLM_KERNELS": "neon"}, FP_ASIMD | DOT, "cortex-a76")
    assert (t.path, t.cpu_name) == ("neon", "cortex-a76")   # LLVM knew the core: its name is kept
    assert t.features.split(",").count("-dotprod") == 1 and "+dotprod" not in t.features


def test_portable_leaves_numba_alone():
    t = cpu.decide({"MPILLM_KERNELS": "portable"}, FP_ASIMD | DOT, "generic")
    assert (t.path, t.cpu_name, t.features) == ("portable", None, None)


def test_user_numba_cpu_wins_but_our_own_mark_does_not():
    user = cpu.decide({"NUMBA_CPU_NAME": "cortex-a76", "NUMBA_CPU_FEATURES": "+dotprod"}, FP_ASIMD, "generic")
    assert (user.path, user.cpu_name, user.features) == ("neon", "cortex-a76", "+dotprod")
    ours = cpu.decide({"NUMBA_CPU_NAME": "cortex-a76", "NUMBA_CPU_FEATURES": "x",
                       cpu.MARK: cpu._mark("cortex-a76", "x"), "MPILLM_KERNELS": "neon"}, FP_ASIMD | DOT, "generic")
    assert (ours.path, ours.cpu_name) == ("neon", "cortex-a72")   # a parent's choice is redone


def test_hwcap_bits():
    f = cpu.arm_features(FP_ASIMD | DOT | 1 << 10)
    assert f["dotprod"] and f["fullfp16"] and f["neon"] and not f["aes"]
