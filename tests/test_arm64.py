"""The aarch64 path run, not only compiled: an emulated Raspberry Pi 5 and Pi 4 (tests/cluster/arm64.py).

Per CPU model (QEMU_CPU; qemu-user reports its features in AT_HWCAP and raises SIGILL on an
instruction the model lacks), in the order they run, sharing one numba cache per CPU that
starts empty in every session:

    compile   scripts/asm_check.py --arm: the active path's kernels for every weight type,
              compiled into the cache; path and numba CPU chosen from AT_HWCAP; sdot/udot in
              every quantized matmul on cortex-a76, none anywhere on cortex-a72
    kernels   the kernel tests of that path against their numpy references (tests/test_kernels.py,
              tests/test_kquant.py), loading what the compile step stored
    fixtures  transformers fixtures under mpirun -np 1 and -np 2 (tests/mpi/test_tp_mpi.py)
    generate  the bundled model at -np 2, same greedy text as this x86 host at -np 2 (f64 buffers)

and on the cortex-a72 the negative control: the cortex-a76 code (loaded from that CPU's
cache, NUMBA_CPU_NAME forcing it) dies of SIGILL at its first matmul.
"""
from __future__ import annotations

import functools
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "cluster"))

import arm64  # noqa: E402
from common import PROMPT, text_of  # noqa: E402
from mpiutil import mpirun  # noqa: E402

pytestmark = [pytest.mark.arm64, pytest.mark.timeout(3600)]

PATH_OF = {"cortex-a76": "neon-dot", "cortex-a72": "neon"}
REPORTS: dict[str, dict] = {}
TIMES: dict[str, float] = {}
OUT = Path(arm64.CACHE) / "reports"

# What runs. The numba compile under emulation is the cost (45-70 s per weight type and CPU on
# the loaded 2-core machine): MPILLM_ARM64_SCOPE=full runs every weight type, the fixtures at
# -np 1 and 2 and the bundled model on both CPUs; the default (CI) scope proves each path with
# q4_0 (both CPUs), q8_0 and q6_K (the 8-bit and K-quant dot products, cortex-a76) and the
# negative control (the fused whole-model blocks of the fixtures and the bundled model take tens
# of minutes more to compile under emulation).
FULL = os.environ.get("MPILLM_ARM64_SCOPE", "ci") == "full"
ALL_TYPES = ("q4_0", "q4_1", "q8_0", "f16", "f32", "q5_0", "q5_1", "q4_K", "q5_K", "q6_K", "mxfp4", "q2_K", "q3_K")
ALL_TYPES += ("iq4_nl", "iq4_xs")
TYPES = {cpu: ALL_TYPES for cpu in PATH_OF} if FULL else {"cortex-a76": ("q4_0", "q8_0", "q6_K"),
                                                         "cortex-a72": ("q4_0",)}
KERNEL_TESTS = ["tests/test_kernels.py", "tests/test_kquant.py", "tests/test_lowk.py",
                "tests/test_iquant.py"]
FIXTURE_K = "test_fixture_logits and llama and not tied and (q4_0 or q8_0)"
FIXTURES = {cpu: (1, 2) for cpu in PATH_OF} if FULL else {}
GENERATE = set(PATH_OF) if FULL else set()


def _timed(key, fn):
    t0 = time.time()
    try:
        return fn()
    finally:
        TIMES[key] = round(time.time() - t0, 1)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "times.json").write_text(json.dumps(TIMES, indent=1))


@pytest.fixture(scope="session")
def node():
    why = arm64.why_not()
    if why:
        pytest.skip(why)
    _timed("install", lambda: arm64.install(log=lambda s: print(s, file=sys.stderr, flush=True)))
    return arm64


@pytest.fixture(scope="session", params=list(PATH_OF))
def compiled(request, node):
    """One emulated CPU model with its kernels compiled into a fresh numba cache."""
    cpu = request.param
    arm64.fresh_numba_cache(cpu)
    out = f"/tmp/asm-{cpu}.json"
    rep_file = arm64.ROOT / out.lstrip("/")
    rep_file.unlink(missing_ok=True)   # no stale report from an earlier session
    r = _timed(f"{cpu} compile", lambda: arm64.run(
        ["nice", "-n", "10", "python", "scripts/asm_check.py", "--arm", "--cache-dir", arm64.numba_cache(cpu),
         "--types", ",".join(TYPES[cpu]), "--json", out], cpu=cpu, timeout=2400, check=False))
    print(r.stdout)
    assert rep_file.exists(), f"asm_check wrote no report ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    rep = json.loads(rep_file.read_text())
    rep["returncode"] = r.returncode
    REPORTS[cpu] = rep
    (OUT / f"asm-{cpu}.json").write_text(json.dumps(rep, indent=1))
    return cpu


def test_path_from_hwcap_and_dot_products(compiled):
    cpu, rep = compiled, REPORTS[compiled]
    assert rep["path"] == PATH_OF[cpu], rep
    dot = bool(rep["hwcap"] >> 20 & 1)                     # HWCAP_ASIMDDP, as qemu reports it
    assert dot == (cpu == "cortex-a76")
    assert ("+dotprod" in rep["features"]) == dot and rep["cpu"] == cpu
    q = {k: v for k, v in rep["kernels"].items() if k.startswith(("matmul_q", "matmul_mx", "matmul_iq"))}
    assert len(rep["kernels"]) == len(TYPES[cpu]), rep["kernels"]
    if dot:
        assert all(v["sdot"] + v["udot"] > 0 for v in q.values()), q
    else:
        assert all(v["sdot"] + v["udot"] == 0 for v in rep["kernels"].values()), rep["kernels"]
        assert all(v["smull/smlal"] > 0 for v in q.values()), q   # the plain-NEON widening products instead
    assert rep["ok"] and rep["returncode"] == 0


SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)\b")


def pytest_counts(text: str) -> dict[str, int]:
    """The counts of pytest's last summary line ("12 passed, 3 skipped, 40 deselected in 5.3s",
    with or without its "===" frame); empty when no such line."""
    for line in reversed(text.strip().splitlines()):
        found = SUMMARY.findall(line)
        if found and " in " in line:
            return {("error" if k.startswith("error") else k): int(n) for n, k in found}
    return {}


def kernel_run_problems(counts: dict[str, int], expected: int) -> list[str]:
    """What is wrong with the emulated kernel-test run: anything failed, errored or skipped, or fewer
    passed than the selection collects on this host (the same files, the same -k)."""
    problems = [f"{counts[k]} {k}" for k in ("failed", "error", "skipped") if counts.get(k)]
    if counts.get("passed", 0) < expected:
        problems.append(f"{counts.get('passed', 0)} passed, the selection has {expected} tests")
    return problems


def collected_here(args: list[str]) -> int:
    """How many tests pytest collects here for these arguments (--collect-only)."""
    import subprocess

    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                       cwd=HERE.parent, capture_output=True, text=True, timeout=300)
    m = re.search(r"(\d+)(?:/\d+)? tests? collected", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr[-2000:]
    return int(m[1])


def test_kernels(compiled):
    """The path's kernel tests for its weight types against the numpy references (the q8_0
    activation quantizer with them), loading the kernels the compile step stored."""
    cpu = compiled
    sel = f"{PATH_OF[cpu]} and not agree_with_portable" + (" and not neon-dot" if PATH_OF[cpu] == "neon" else "")
    if not FULL:
        sel += " and not strided and (" + " or ".join(TYPES[cpu]) + " or quantize_q8_0)"
    expected = collected_here([*KERNEL_TESTS, "-k", sel])
    assert expected > 0, sel
    r = _timed(f"{cpu} kernels", lambda: arm64.run(
        ["nice", "-n", "10", "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *KERNEL_TESTS, "-k", sel],
        cpu=cpu, timeout=2400, check=False, env={"MPILLM_NO_WARMUP": "1"}))  # conftest's engine warm-up: not here
    tail = r.stdout[-3000:]
    print(f"{cpu}: {tail.strip().splitlines()[-1] if tail.strip() else ''}")
    assert r.returncode == 0, f"{tail}\n{r.stderr[-2000:]}"
    problems = kernel_run_problems(pytest_counts(tail), expected)   # a skipped kernel test is a path not run
    assert not problems, f"{cpu} kernel tests: {'; '.join(problems)}\n{tail}"


@pytest.mark.parametrize("np_", [1, 2])
def test_transformers_fixtures(compiled, np_):
    cpu = compiled
    if np_ not in FIXTURES.get(cpu, ()):
        pytest.skip("arm64 fixtures: runs with MPILLM_ARM64_SCOPE=full (emulated compile time)")
    r = _timed(f"{cpu} fixtures np{np_}", lambda: arm64.run(
        ["mpirun", "-np", str(np_), "--bind-to", "none", "python", "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "--with-mpi", "-m", "mpi", "--timeout=1200", "tests/mpi/test_tp_mpi.py", "-k", FIXTURE_K],
        cpu=cpu, timeout=1500, check=False))
    tail = r.stdout[-3000:]
    assert r.returncode == 0, f"{tail}\n{r.stderr[-2000:]}"
    assert " passed" in tail and "failed" not in tail and "skipped" not in tail, tail


def test_bundled_generate_np2(compiled):
    cpu = compiled
    if cpu not in GENERATE:
        pytest.skip("arm64 generate: runs with MPILLM_ARM64_SCOPE=full (emulated compile time)")
    args = ["-m", "mpillm.generate", "--prompt", PROMPT, "--max-tokens", "8", "--buffer-type", "f64"]
    r = _timed(f"{cpu} generate np2", lambda: arm64.run(
        ["nice", "-n", "10", "mpirun", "-np", "2", "--bind-to", "none", "python", *args], cpu=cpu, timeout=2400,
         check=False))
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert f"kernels {PATH_OF[cpu]} ({cpu}, " in r.stdout, f"the plan line names the path and CPU:\n{r.stdout[:2000]}"
    text = text_of(r.stdout.split("start-up ", 1)[1].split("\n", 1)[1])   # what follows the start-up line
    assert text == _x86_text(tuple(args)), r.stdout


@functools.lru_cache(maxsize=None)
def _x86_text(args: tuple) -> str:
    r = mpirun(2, [*args, "--quiet"], timeout=300)
    assert r.returncode == 0, f"x86 reference run failed:\n{r.stdout}\n{r.stderr}"
    return text_of(r.stdout)


def test_a76_code_runs_on_a76_and_dies_on_a72(compiled):
    """Negative control: the code the cortex-a76 session compiled (its cache, its target; the
    same q4_0 matmul) runs under an emulated cortex-a76 and dies of SIGILL under a cortex-a72 --
    so the cortex-a72 session passing means its code has no instruction that CPU lacks."""
    cpu = compiled
    a76 = REPORTS.get("cortex-a76")
    if a76 is None:
        pytest.skip("needs the cortex-a76 session first (its cache and target)")
    code = ("import numpy as np; from mpillm import kernels; from mpillm.formats import quant; p = kernels.get_path(kernels.active_path()); "
            "x = np.ones((1, 256), np.float32); xq = np.empty((1, 256), np.int8); xd = np.empty((1, 8), np.float32); "
            "xs = np.empty((1, 8), np.int32); out = np.empty((1, 4), np.float32); p.quantize_q8_0(x, xq, xd, xs); "
            "a = quant.random_arrays('q4_0', 4, 256, np.random.default_rng(0)); print('calling', flush=True); "
            "p.matmul('q4_0', a, xq, xd, xs, x, out); print('returned', flush=True)")
    env = {"NUMBA_CPU_NAME": a76["cpu"], "NUMBA_CPU_FEATURES": a76["features"],
           "NUMBA_CACHE_DIR": arm64.numba_cache("cortex-a76")}
    r = _timed(f"{cpu} a76 code", lambda: arm64.run(["python", "-c", code], cpu=cpu, env=env, timeout=900, check=False))
    if cpu == "cortex-a76":
        assert r.returncode == 0 and "calling" in r.stdout and "returned" in r.stdout, \
            (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    else:
        # the first a76-only instruction may come before the matmul (the activation quantizer is
        # compiled for the a76 too): any SIGILL of this code is the point
        assert r.returncode == -signal.SIGILL, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
        assert "returned" not in r.stdout and "Illegal instruction" in r.stderr


def _bundled_dir(np_: int) -> Path:
    """The bundled model converted for np_ ranks in this host's cache (made by the x86 reference)."""
    cache = Path(os.environ.get("MPILLM_CACHE", Path.home() / ".cache" / "mpillm"))
    found = sorted(d for d in cache.glob("SmolLM2-135M-Instruct*") if (d / f"ws{np_}").is_dir())
    assert found, f"no converted bundled model for {np_} ranks under {cache}"
    return found[-1]


@pytest.mark.netns
def test_mixed_cluster_x86_and_arm64(node):
    """One x86 rank (emulated host h0) and one emulated cortex-a76 rank (host h1, inside the arm64
    root) in one mpirun job: the same greedy text as two x86 ranks (f64 buffers)."""
    if not FULL:
        pytest.skip("arm64 mixed cluster: runs with MPILLM_ARM64_SCOPE=full (emulated compile time)")
    import subprocess

    import netns

    why = netns.have_netns()
    if why:
        pytest.skip(why)
    args = ["-m", "mpillm.generate", "--prompt", PROMPT, "--max-tokens", "8", "--buffer-type", "f64"]
    want = _x86_text(tuple(args))
    model = str(_bundled_dir(2))
    arm64.host_paths()
    with netns.Cluster(2, "1gbe-nodelay") as c:
        hf = c.write_hostfile(OUT / "mixed-hosts")
        argv = c.mpirun_argv(2, hf, [sys.executable, *args, "--model", model, "--quiet"])
        argv = [str(arm64.HERE / "arm64_agent.sh") if a == str(netns.AGENT) else a for a in argv]
        env = c.env({"MPILLM_ARM64_HOSTS": "1", "MPILLM_ARM64_CPU": "cortex-a76", "MPILLM_ARM64_BIND": model})
        t0 = time.time()
        r = subprocess.run(argv, env=env, timeout=2700, capture_output=True, text=True)
        TIMES["mixed x86 + cortex-a76 generate np2"] = round(time.time() - t0, 1)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert text_of(r.stdout) == want, (r.stdout, want)
