"""Tests of the hpl package: distribution, BLAS glue, HPL.dat, whole runs under mpirun, bad input, report.

The multi-rank cases run ``mpirun`` as a subprocess with a hard timeout
(tests/mpiutil.py), so a hang fails the test instead of stalling the suite.
"""
from __future__ import annotations

import json
import re
import textwrap

import numpy as np
import pytest

from hpl import blas, dat
from hpl.grid import closest_square, first_local_at_or_after, g2l, l2g, local_indices, numroc, owner
from mpiutil import ROOT, mpirun

RESID = re.compile(r"\|\|Ax-b\|\|_oo/.*=\s*([0-9.eE+-]+) \.+ (PASSED|FAILED)")
TV = re.compile(r"^W[RC]\S+\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([0-9.]+)\s+([0-9.eE+-]+)", re.M)


# ---------------------------------------------------------------- block-cyclic bookkeeping (one process)

@pytest.mark.parametrize("n,nb,nprocs", [(1, 1, 1), (10, 3, 4), (100, 7, 3), (97, 32, 2), (5, 8, 3), (64, 16, 4)])
def test_index_maps_are_consistent(n, nb, nprocs):
    seen = []
    for p in range(nprocs):
        g = local_indices(n, nb, p, nprocs)
        assert len(g) == numroc(n, nb, p, nprocs)
        assert np.all(np.diff(g) > 0)
        for loc, gi in enumerate(g):
            assert owner(int(gi), nb, nprocs) == p
            assert g2l(int(gi), nb, nprocs) == loc
            assert l2g(loc, nb, p, nprocs) == gi
        for start in range(0, n + 1):
            assert first_local_at_or_after(start, nb, p, nprocs) == int(np.searchsorted(g, start))
        seen.extend(g.tolist())
    assert sorted(seen) == list(range(n))


def test_closest_square():
    assert [closest_square(s) for s in (1, 2, 3, 4, 6, 8, 12)] == [(1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (2, 4),
                                                                   (3, 4)]


# ---------------------------------------------------------------- BLAS glue

def test_blas_wrappers_on_strided_views():
    rng = np.random.default_rng(1)
    big = np.asfortranarray(rng.random((60, 70)))
    ref = big.copy(order="F")
    a = np.asfortranarray(rng.random((20, 5)))
    b = np.asfortranarray(rng.random((5, 30)))
    blas.gemm_update(big[7:27, 11:41], a, b)
    ref[7:27, 11:41] -= a @ b
    np.testing.assert_allclose(big, ref, rtol=0, atol=1e-13)
    l11 = np.asfortranarray(rng.random((6, 6)) + 6 * np.eye(6))
    rhs = big[0:6, 3:13]
    want = np.linalg.solve(np.tril(l11, -1) + np.eye(6), rhs)
    blas.trsm_left(l11, rhs, lower=True, unit=True)
    np.testing.assert_allclose(big[0:6, 3:13], want, atol=1e-12)
    panel = np.asfortranarray(rng.random((40, 8)))
    orig = panel.copy(order="F")
    piv = blas.getrf(panel)
    blas.laswp(orig, piv)
    lower = np.tril(panel, -1) + np.eye(40, 8)
    np.testing.assert_allclose(lower @ np.triu(panel[:8]), orig, atol=1e-13)
    assert np.all(np.abs(np.tril(panel, -1)) <= 1.0 + 1e-15)     # partial pivoting: |l_ij| <= 1


# ---------------------------------------------------------------- HPL.dat

def test_reads_the_stock_hpl_dat():
    d = dat.read(ROOT / "hpl" / "HPL.dat")
    assert d.ns == [29, 30, 34, 35]
    assert d.nbs == [1, 2, 3, 4]
    assert d.grids == [(2, 2), (1, 4), (4, 1)]
    assert d.pmap == 0 and d.threshold == 16.0 and d.device == 6 and d.output == "HPL.out"
    assert d.extra["PFACTs"] == [0, 1, 2] and d.extra["DEPTHs"] == [0] and d.extra["alignment"] == [8]


def test_written_dat_reads_back():
    ns = [15000, 200, 1, 2, 5, 17, 64, 101]
    d = dat.parse(dat.format_dat(ns, [192, 1], [(1, 2), (2, 1), (1, 4), (4, 1)]))
    assert (d.ns, d.nbs, d.threshold) == (ns, [192, 1], 16.0)
    assert d.grids == [(1, 2), (2, 1), (1, 4), (4, 1)]


@pytest.mark.parametrize("change,msg", [
    ((5, "x            Ns"), "line 6"),
    ((4, "0            # of problems sizes (N)"), "line 5"),
    ((8, "7            PMAP"), "PMAP"),
])
def test_bad_hpl_dat_says_where(change, msg):
    lines = (ROOT / "hpl" / "HPL.dat").read_text().splitlines()
    lines[change[0]] = change[1]
    with pytest.raises(ValueError, match=msg):
        dat.parse("\n".join(lines))


# ---------------------------------------------------------------- whole runs under mpirun

def _run_hpl(np_, *args, timeout=90):
    return mpirun(np_, ["-m", "hpl", "--quiet", *args], timeout=timeout)


@pytest.mark.parametrize("np_,p,q,n,nb", [
    (1, 1, 1, 301, 32),       # N not a multiple of NB
    (2, 1, 2, 333, 40),
    (2, 2, 1, 290, 32),
    (4, 2, 2, 250, 24),
])
def test_residual_passes_on_grids(np_, p, q, n, nb):
    r = _run_hpl(np_, "--n", str(n), "--nb", str(nb), "--p", str(p), "--q", str(q))
    assert r.returncode == 0, r.stdout + r.stderr
    m = TV.search(r.stdout)
    assert m and tuple(map(int, m.groups()[:4])) == (n, nb, p, q), r.stdout
    assert float(m.group(6)) > 0
    res = RESID.findall(r.stdout)
    assert len(res) == 1 and res[0][1] == "PASSED" and float(res[0][0]) < 1.0, r.stdout


def test_stock_hpl_dat_runs_every_grid_on_four_ranks():
    r = _run_hpl(4, "--dat", str(ROOT / "hpl" / "HPL.dat"), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = TV.findall(r.stdout)
    assert len(rows) == 4 * 4 * 3                                    # Ns x NBs x grids
    assert {(int(x[2]), int(x[3])) for x in rows} == {(2, 2), (1, 4), (4, 1)}
    assert [v for _, v in RESID.findall(r.stdout)] == ["PASSED"] * 48


def test_corrupted_factorization_is_caught():
    r = _run_hpl(2, "--n", "200", "--nb", "32", "--p", "1", "--q", "2", "--corrupt")
    res = RESID.findall(r.stdout)
    assert res and res[0][1] == "FAILED" and float(res[0][0]) > 16, r.stdout
    assert r.returncode != 0
    assert "1 tests completed and failed residual checks" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["--n", "100", "--p", "2", "--q", "2"], "does not match the 2 MPI ranks"),
    (["--n", "0"], "N must be >= 1"),
    (["--n", "100", "--nb", "0"], "NB must be >= 1"),
    (["--n", "3000000"], "memory too small for N=3000000"),
])
def test_bad_input_fails_on_every_rank_without_hanging(args, needle):
    r = _run_hpl(2, *args, timeout=60)
    assert r.returncode != 0
    for rank in (0, 1):
        assert f"[rank {rank} of 2]: " in r.stderr, r.stderr
    assert r.stderr.count(needle) == 2, r.stderr
    assert "T/V" not in r.stdout


def test_mem_fraction_sizes_n():
    r = _run_hpl(1, "--mem-fraction", "0.0001", "--nb", "64")
    assert r.returncode == 0, r.stdout + r.stderr
    n = int(TV.search(r.stdout).group(1))
    assert n % 64 == 0 and 200 < n < 3000


_ROUNDTRIP = textwrap.dedent("""
    import numpy as np
    from mpi4py import MPI
    from hpl.grid import Grid, scatter, gather, generate_local, global_matrix
    comm = MPI.COMM_WORLD
    for (p, q, colmaj) in {grids}:
        for (m, n, nb) in [(37, 29, 5), (64, 65, 16), (7, 3, 8), (50, 51, 7)]:
            g = Grid(comm, p, q, colmaj)
            full = np.arange(m * n, dtype=float).reshape(m, n) if comm.rank == 0 else None
            loc = scatter(g, full, m, n, nb)
            assert loc.shape == g.local_shape(m, n, nb)
            back = gather(g, loc, m, n, nb)
            gen = gather(g, generate_local(g, m, n, nb, 7), m, n, nb)
            if comm.rank == 0:
                assert np.array_equal(back, full), (p, q, m, n, nb)
                assert np.array_equal(gen, global_matrix(m, n, nb, 7)), (p, q, m, n, nb)
            g.free()
    if comm.rank == 0:
        print("ROUNDTRIP OK")
""")


@pytest.mark.parametrize("np_,grids", [(3, [(1, 3, False), (3, 1, False)]), (4, [(2, 2, False), (2, 2, True)])])
def test_block_cyclic_round_trip(np_, grids):
    r = mpirun(np_, ["-c", _ROUNDTRIP.format(grids=grids)], timeout=60)
    assert r.returncode == 0 and "ROUNDTRIP OK" in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------- STREAM and the report

def test_triad_bandwidth_is_a_positive_rate():
    from hpl.stream import triad_bandwidth

    gbs = triad_bandwidth(n_bytes=8 << 20, threads=1, repeats=2)
    assert 0.1 < gbs < 10000


_FAKE_BENCH = """
import json, sys
print("loading model ...")
print(json.dumps({"model": "fake-135m", "prompt_tok_s": 500.0, "generate_tok_s": 100.0,
                  "weight_bytes_per_token": 90e6, "comm_bytes_per_token": 80e3, "flops_per_token": 270e6}))
"""


def test_report_with_a_stand_in_bench(tmp_path):
    (tmp_path / "fakebench.py").write_text(_FAKE_BENCH)
    out = tmp_path / "rep" / "cluster"
    r = mpirun(2, ["-m", "hpl.compare", "--n", "400", "--nb", "32", "--stream-mib", "24", "--quiet",
                   "--bench-module", "fakebench", "--out", str(out)], timeout=120,
               env={"PYTHONPATH": f"{ROOT}:{tmp_path}"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| LLM generate throughput" in r.stdout and "100.0 tok/s" in r.stdout, r.stdout
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["hpl"]["passed"] and rep["stream"]["total_gbs"] > 0
    assert rep["derived"]["weight_gbs"] == pytest.approx(9.0)
    assert rep["derived"]["gen_gflops"] == pytest.approx(27.0)
    pytest.importorskip("matplotlib")
    assert out.with_suffix(".png").stat().st_size > 10000


def test_report_skips_llm_when_bench_missing(tmp_path):
    from hpl.compare import llm_figures

    got = llm_figures(module="no_such_bench_module_xyz")
    assert "skipped" in got and "not available" in got["skipped"]


def test_report_table_with_partial_bench_figures(tmp_path):
    from hpl.compare import chart, derive, table

    hpl = {"n": 1000, "nb": 64, "p": 1, "q": 2, "time": 1.0, "gflops": 50.0, "resid": 3e-3, "passed": True}
    stream = {"per_node": {"a": 20.0, "b": 22.0}, "total_gbs": 42.0, "threads_per_rank": 1}
    llm = {"model": "m", "prompt_tok_s": 400.0, "generate_tok_s": 80.0, "weight_bytes_per_token": 2.1e8,
           "comm_bytes_per_token": None, "flops_per_token": None}
    d = derive(hpl, stream, llm, 2)
    assert d["weight_gbs"] == pytest.approx(16.8) and d["weight_frac_stream"] == pytest.approx(0.4)
    assert "gen_gflops" not in d and "net_mbs_generate" not in d
    rep = {"hpl": hpl, "stream": stream, "llm": llm, "derived": d,
           "cluster": {"nodes": 2, "ranks": 2, "cpus_per_node": 2, "mem_per_node_gib": 24.0, "date": "today"}}
    text = table(rep)
    assert "| Network per token" in text and "n/a" in text and "40 % of STREAM" in text
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert len({len(ln) for ln in lines}) == 1                       # columns line up
    pytest.importorskip("matplotlib")
    assert chart(rep, tmp_path / "c.png") is None and (tmp_path / "c.png").exists()
