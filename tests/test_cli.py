"""The ``mpillm`` console script: subcommands run the modules' ``python -m`` entry points, alone
and under mpirun; ``python -m mpillm`` is the same command."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mpiutil import ROOT, mpi_env, mpirun_cmd, run_killing_on_timeout

from mpillm.cli import COMMANDS


def mpillm_exe() -> str:
    exe = Path(sys.executable).parent / "mpillm"
    if not exe.exists():   # not installed as a console script here: the module form is the same
        pytest.skip("the mpillm console script is not installed in this environment")
    return str(exe)


def run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_subcommand():
    for cmd in ([mpillm_exe(), "--help"], [sys.executable, "-m", "mpillm", "--help"]):
        r = run(cmd)
        assert r.returncode == 0, r.stderr
        for name in ("generate", "chat", "serve", "convert", "check", "bench", "hpl", "perplexity"):
            assert name in COMMANDS and f"  {name}" in r.stdout, r.stdout


def test_unknown_and_missing_subcommands_exit_2():
    r = run([sys.executable, "-m", "mpillm", "frobnicate"])
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr, r.stderr
    from mpillm import cli

    cli.COMMANDS["ghost"] = ("mpillm.no_such_module", "test")
    try:
        assert cli.main(["ghost"]) == 2
    finally:
        del cli.COMMANDS["ghost"]


def test_subcommand_passes_arguments_and_exit_code():
    r = run([mpillm_exe(), "generate", "--max-tokens", "-1", "--bogus-flag"])
    assert r.returncode == 2 and "--bogus-flag" in r.stderr, r.stderr   # argparse's usage error, via the module


def test_convert_and_check_under_mpirun(tmp_path):
    out = tmp_path / "tiny"
    r = run([mpillm_exe(), "convert", "synth", "--shape", "tiny", str(out), "--world-size", "2", "--no-progress"])
    assert r.returncode == 0 and (out / "ws2" / "rank1.h5").exists(), r.stderr
    cmd = mpirun_cmd(2) + [mpillm_exe(), "check", "--model", str(out), "--no-comm", "--max-seq-len", "64"]
    r = run_killing_on_timeout(cmd, mpi_env(), 180, "mpirun -np 2 mpillm check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 rank(s) on 1 host(s)" in r.stdout and "mpillm.check: OK" in r.stdout, r.stdout
    assert f"rank 1: {out}/ws2/rank1.h5: intact" in r.stdout, r.stdout
    # a damaged shard fails the same command on every rank
    shutil.copy(out / "ws2" / "rank0.h5", out / "ws2" / "rank1.h5")   # rank 0's shard where rank 1's belongs
    r = run_killing_on_timeout(cmd, mpi_env(), 180, "mpirun -np 2 mpillm check (damaged)")
    assert r.returncode == 1 and "rank 1" in r.stderr, r.stdout + r.stderr


def test_perplexity_refuses_draft_flags(tmp_path):
    """perplexity generates nothing: --draft / --draft-model are refused before any model is loaded."""
    text = tmp_path / "t.txt"
    text.write_text("hello world\n")
    for flags in (["--draft", "lookup"], ["--draft-model", str(text)]):
        r = run([sys.executable, "-m", "mpillm.perplexity", "--file", str(text), *flags])
        assert r.returncode == 2 and "perplexity scores the given text" in r.stderr, r.stdout + r.stderr
