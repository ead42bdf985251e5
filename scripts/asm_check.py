#!/usr/bin/env python
"""Compile every kernel of the x86 and portable paths in a fresh numba cache and count the
SIMD instructions in the generated assembly (inspect_asm does not work for cache-loaded
functions, hence the fresh cache).

    python scripts/asm_check.py [--dump DIR]    # DIR: write each kernel's assembly there
    python scripts/asm_check.py --cpu haswell   # as compiled for an AVX2-only CPU
    python scripts/asm_check.py --aarch64       # portable path: lower its IR for aarch64
    python scripts/asm_check.py --arm [--cache-dir D] [--types q4_0,...] [--json F]
                                                # ON an aarch64 host (a Pi, or the emulated node of
                                                # tests/cluster/arm64.py): the active path's real kernels

``--aarch64`` takes the portable kernels' unoptimized IR (NUMBA_OPT=0: numba's optimized IR
already contains x86-specific intrinsics from LLVM's x86 passes), runs LLVM's O3 pipeline
for a Cortex-A76 (Raspberry Pi 5, +dotprod) target machine and emits its assembly: the path
has no x86 dependence, and the block dot products become ``sdot``.

``--arm`` runs on the aarch64 machine itself: it compiles the active path's kernels
(``neon-dot`` or ``neon``, for the CPU ``mpillm.runtime.cpu`` chose from AT_HWCAP) into ``--cache-dir``
(which must not hold them yet: numba has no assembly for cache-loaded code; later processes
pointed at the same directory load exactly this code) and counts the dot-product instructions
in each kernel's assembly. It fails unless every quantized matmul of ``neon-dot`` has
``sdot``/``udot`` and no kernel of ``neon`` has any.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

PATTERNS = {
    "vpdpbusd": r"\bvpdpbusd\b",
    "vpmaddubsw": r"\bvpmaddubsw\b",
    "vpmaddwd": r"\bvpmaddwd\b",
    "vpsignb": r"\bvpsignb\b",
    "vshufi64x2/vperm2i128": r"\b(vshufi64x2|vperm2i128|vpermt2q|vpermi2q|vinserti)",
    "vcvtph2ps": r"\bvcvtph2ps\b",
    "vfmadd*ps": r"\bvfmadd\w*ps\b",
    "zmm": r"%zmm",
    "ymm": r"%ymm",
    "stack spills": r"(\(%rsp\)|\(%rbp\)).*%[xyz]mm|%[xyz]mm.*(\(%rsp\)|\(%rbp\))",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dump", help="directory for the full assembly of each kernel")
    ap.add_argument("--cpu", help="compile for this LLVM CPU name (e.g. haswell) instead of the host")
    ap.add_argument("--features", default="+avx2,+fma,+f16c,+bmi2,+popcnt",
                    help="LLVM features with --cpu (default: AVX2 without AVX-512)")
    ap.add_argument("--aarch64", action="store_true", help="lower the portable path for aarch64")
    ap.add_argument("--paths", help="comma-separated paths (default: the host's; with --cpu: avx2,portable)")
    ap.add_argument("--arm", action="store_true", help="on an aarch64 host: the active path's compiled kernels")
    ap.add_argument("--cache-dir", help="--arm: numba cache to compile into (default: a fresh temporary one)")
    ap.add_argument("--types", default=",".join(ARM_TYPES), help="--arm: weight types (default: all)")
    ap.add_argument("--json", help="--arm: write the counts here")
    a = ap.parse_args()
    if a.arm:
        os.environ["NUMBA_CACHE_DIR"] = a.cache_dir or tempfile.mkdtemp(prefix="mpillm-asm-")
        sys.exit(arm(a.types.split(","), a.dump, a.json))
    os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="mpillm-asm-")
    if a.cpu:
        os.environ["NUMBA_CPU_NAME"] = a.cpu
        os.environ["NUMBA_CPU_FEATURES"] = a.features
    if a.aarch64:
        os.environ["NUMBA_OPT"] = "0"
        sys.exit(aarch64(a.dump))
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from mpillm import kernels

    ok = True
    paths = a.paths.split(",") if a.paths else (["avx2", "portable"] if a.cpu else kernels.available_paths())
    for pname in paths:
        p = kernels.get_path(pname)
        p.warmup()
        for name in kernels._JitView.NAMES:
            disp = getattr(p.jit, name)
            asm = "\n".join(disp.inspect_asm(sig) for sig in disp.signatures)
            # the parallel region body is a separate function: include every gufunc numba emitted
            counts = {k: len(re.findall(v, asm)) for k, v in PATTERNS.items()}
            shown = ", ".join(f"{k}={v}" for k, v in counts.items() if v)
            print(f"{pname:9s} {name:18s} {len(disp.signatures)} sig(s): {shown}")
            if a.dump:
                os.makedirs(a.dump, exist_ok=True)
                with open(os.path.join(a.dump, f"{pname}_{name}.s"), "w") as f:
                    f.write(asm)
            if pname == "vnni" and "q8_0" in name and "matmul" in name or pname == "vnni" and "q4" in name:
                ok &= counts["vpdpbusd"] > 0
            if pname == "avx2" and name.startswith("matmul_q"):
                ok &= counts["vpmaddubsw"] > 0 and counts["vpdpbusd"] == 0
                if a.cpu:
                    ok &= counts["zmm"] == 0
    print("OK: explicit dot-product instructions present" if ok else "MISSING dot-product instructions")
    sys.exit(0 if ok else 1)


def aarch64(dump=None) -> int:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import llvmlite.binding as llvm

    from mpillm import kernels

    p = kernels.get_path("portable")
    p.warmup()
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    triple = "aarch64-unknown-linux-gnu"
    tm = llvm.Target.from_triple(triple).create_target_machine(cpu="cortex-a76", features="+dotprod,+fullfp16",
                                                               opt=3)
    bad = 0
    for name in kernels._JitView.NAMES:
        disp = getattr(p.jit, name)
        for sig in disp.signatures:
            text = disp.inspect_llvm(sig)
            bad += "llvm.x86." in text
            text = re.sub(r"^target triple = .*$", f'target triple = "{triple}"', text, flags=re.M)
            text = re.sub(r"^target datalayout = .*$", f'target datalayout = "{tm.target_data}"', text, flags=re.M)
            text = re.sub(r'"target-(cpu|features)"="[^"]*"', "", text)
            mod = llvm.parse_assembly(text)
            mod.verify()
            pto = llvm.create_pipeline_tuning_options(speed_level=3)
            pto.loop_vectorization = pto.slp_vectorization = True
            pb = llvm.create_pass_builder(tm, pto)
            pb.getModulePassManager().run(mod, pb)  # O3 for aarch64, as numba would run it there
            asm = tm.emit_assembly(mod)
            if dump:
                os.makedirs(dump, exist_ok=True)
                with open(os.path.join(dump, f"aarch64_{name}.s"), "w") as f:
                    f.write(asm)
            cnt = {k: len(re.findall(v, asm)) for k, v in
                   {"sdot": r"\bsdot\b", "fcvtl": r"\bfcvtl2?\b", "fmla": r"\bfmla\b"}.items()}
            ro = "read-only weights" if not getattr(sig[0], "mutable", True) else "writable weights"
            print(f"aarch64 {name:18s} ({ro}): {len(asm.splitlines())} asm lines, "
                  + ", ".join(f"{k}={v}" for k, v in cnt.items()))
            if name.startswith("matmul_q"):
                bad += cnt["sdot"] == 0
    print("OK: portable path lowers for aarch64, sdot in every quantized matmul" if not bad
          else "FAILED: x86 intrinsics in the portable path, or no sdot")
    return 1 if bad else 0


ARM_TYPES = ("q4_0", "q4_1", "q8_0", "f16", "f32", "q5_0", "q5_1", "q4_K", "q5_K", "q6_K", "mxfp4", "q2_K", "q3_K")
ARM_TYPES += ("iq4_nl", "iq4_xs")
ARM_PATTERNS = {"sdot": r"\bsdot\b", "udot": r"\budot\b", "smull/smlal": r"\b(smull|smlal|sadalp)2?\b",
                "fcvtl": r"\bfcvtl2?\b", "fmla": r"\bfmla\b"}


def arm(types, dump=None, json_out=None) -> int:
    """Compile the active aarch64 path's kernels for ``types`` here and count instructions."""
    import json
    import time

    import numpy as np

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from mpillm.runtime import cpu
    from mpillm import kernels
    from mpillm.formats import quant

    path = kernels.active_path()
    if path not in ("neon-dot", "neon"):
        print(f"--arm: the active path is {path!r}, not an aarch64 path (neon-dot, neon)")
        return 2
    p = kernels.get_path(path)
    rng = np.random.default_rng(0)
    T, N, K = 2, 5, 256
    x = rng.standard_normal((T, K)).astype(np.float32)
    xq, xd, xs = np.empty((T, K), np.int8), np.empty((T, K // 32), np.float32), np.empty((T, K // 32), np.int32)
    out = np.empty((T, N), np.float32)
    t0 = time.time()
    p.quantize_q8_0(x, xq, xd, xs)
    report = {"path": path, "cpu": cpu.TARGET.cpu_name, "features": cpu.TARGET.features, "hwcap": cpu.hwcap(),
              "kernels": {}, "compile_s": {}}
    bad = []
    for t in types:
        t1 = time.time()
        for readonly in (False, True):  # the tests' arrays and the model's read-only memmaps
            a = quant.random_arrays(t, N, K, rng)
            for v in a.values():
                v.flags.writeable = not readonly
            p.matmul(t, a, xq, xd, xs, x, out)
        report["compile_s"][t] = round(time.time() - t1, 1)
        name = f"matmul_{quant.base_type(t)}_q8_0" if t not in ("f16", "f32") else f"matmul_{t}_f32"
        disp = getattr(p.jit, name)
        try:
            asm = "\n".join(disp.inspect_asm(sig) for sig in disp.signatures)
        except Exception as e:  # noqa: BLE001 - numba keeps no assembly for cache-loaded code
            print(f"--arm: no assembly for {name} ({type(e).__name__}: it came from the cache?); "
                  "point --cache-dir at an empty directory")
            return 2
        cnt = {k: len(re.findall(v, asm)) for k, v in ARM_PATTERNS.items()}
        report["kernels"][name] = cnt
        print(f"{path:8s} {name:18s} {len(disp.signatures)} sig(s), {report['compile_s'][t]:6.1f} s: "
              + ", ".join(f"{k}={v}" for k, v in cnt.items()), flush=True)
        if dump:
            os.makedirs(dump, exist_ok=True)
            with open(os.path.join(dump, f"{path}_{name}.s"), "w") as f:
                f.write(asm)
        dots = cnt["sdot"] + cnt["udot"]
        if path == "neon-dot" and t not in ("f16", "f32") and dots == 0:
            bad.append(f"{name}: no sdot/udot")
        if path == "neon" and dots:
            bad.append(f"{name}: {dots} dot-product instructions on a CPU without them")
    report["total_s"] = round(time.time() - t0, 1)
    report["ok"] = not bad
    if json_out:
        with open(json_out, "w") as f:
            json.dump(report, f, indent=1)
    print("OK" if not bad else "FAILED: " + "; ".join(bad))
    return 0 if not bad else 1


if __name__ == "__main__":
    main()
