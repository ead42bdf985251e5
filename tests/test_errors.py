"""Bad input: each case names its cause (the file, the rank, the numbers), every rank exits
through the clean path, nothing hangs.

The clean path (mpillm.runtime.errors.run): the ranks agree on the error, rank 0 prints one
``PROG: error: ...`` line, and every rank leaves with exit code 1 through ``sys.exit``. Each job
runs under tests/scripts/exits.py, which records each rank's own exit code, so the checks prove
that every rank exited by itself (not that mpirun killed the stragglers), that there was no
MPI_Abort, and that no other rank printed anything. Each MPI job runs under a 120 s timeout
(tests/mpiutil.py kills the whole job and fails the test).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mpiutil import ROOT, mpirun

FIX = ROOT / "tests" / "fixtures" / "llama"
TOKENS = ["1", "17", "305", "42"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from convert.__main__ import convert

    out = tmp_path_factory.mktemp("errs") / "llama"
    convert(FIX, out, [1, 2, 3], "q8_0", progress=False, tokenizer=False)
    return out


def fresh_copy(model: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "m"
    shutil.copytree(model, dst)
    return dst


def run_probed(np_: int, args: list[str], tmp_path: Path):
    """mpirun of ``args`` under tests/scripts/exits.py: (result, seconds, {rank: exit code})."""
    exits = tmp_path / "exits"
    shutil.rmtree(exits, ignore_errors=True)
    exits.mkdir()
    t0 = time.monotonic()
    r = mpirun(np_, ["tests/scripts/exits.py", str(exits), *args], timeout=120)
    codes = {int(p.stem[4:]): int(p.read_text()) for p in exits.glob("rank*.exit")}
    r.np, r.exits = np_, codes
    return r, time.monotonic() - t0


def run_logits(np_: int, model: Path, tmp_path: Path):
    return run_probed(np_, ["tests/scripts/logits.py", str(model), str(tmp_path / "out.npy"), *TOKENS], tmp_path)


def error_lines(r) -> list[str]:
    """Our error lines ("PROG: error: ...", "PROG: error on rank N ..."); not Open MPI's own
    "PMIX ERROR: PMIX_ERR_UNREACH" notice, which prterun sometimes prints while it tears a
    job with a non-zero exit down."""
    return [ln for ln in (r.stdout + r.stderr).splitlines() if re.search(r"(?<![A-Za-z])error(?![A-Za-z])", ln)]


def assert_failed(r, message: str, prog: str = "logits"):
    """The clean failure: every rank exited 1 by itself, and the only error output is rank 0's one
    line ``PROG: error: MESSAGE...`` (no traceback, no MPI_Abort, no per-rank crash line)."""
    text = r.stdout + r.stderr
    assert r.returncode != 0, f"expected a failure, got exit 0:\n{text}"
    assert r.exits == {k: 1 for k in range(r.np)}, \
        f"not every rank of {r.np} exited 1 through the clean path: {r.exits}\n{text[-3000:]}"
    errs = error_lines(r)
    assert len(errs) == 1 and errs[0].startswith(f"{prog}: error: {message}"), \
        f"want exactly one line '{prog}: error: {message}...', got {errs}\n{text[-3000:]}"
    assert "mpi_abort" not in text.lower(), text[-3000:]
    assert "Traceback" not in text, f"an input error must not show a traceback:\n{text[-3000:]}"
    return errs[0]


def test_good_model_runs(model, tmp_path):
    """The positive control of the probe: every rank exits 0, no error line."""
    r, _ = run_logits(2, model, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.exits == {0: 0, 1: 0} and error_lines(r) == [], (r.exits, r.stderr)
    assert np.load(tmp_path / "out.npy").shape == (4, 512)


def test_missing_shard(model, tmp_path):
    m = fresh_copy(model, tmp_path)
    (m / "ws3" / "rank1.h5").unlink()
    r, dt = run_logits(3, m, tmp_path)
    line = assert_failed(r, f"rank 1: shard file {m / 'ws3' / 'rank1.h5'} is missing")
    assert "rank 0" not in line and "rank 2" not in line, line
    assert dt < 30


def test_wrong_world_size(model, tmp_path):
    r, _ = run_logits(4, model, tmp_path)
    assert_failed(r, f"{model} was converted for world sizes [1, 2, 3], this job has 4 ranks; "
                     f"convert it with --world-size 4")


def test_shard_of_another_world_size(model, tmp_path):
    m = fresh_copy(model, tmp_path)
    shutil.copy(m / "ws3" / "rank0.h5", m / "ws2" / "rank0.h5")
    r, _ = run_logits(2, m, tmp_path)
    line = assert_failed(r, f"rank 0: {m / 'ws2' / 'rank0.h5'} was converted for world size 3 rank 0, "
                            f"but this is rank 0 of 2")
    assert "rank 1" not in line, line


def test_truncated_shard(model, tmp_path):
    m = fresh_copy(model, tmp_path)
    p = m / "ws2" / "rank1.h5"
    size = p.stat().st_size
    with open(p, "r+b") as fh:
        fh.truncate(size // 2)
    r, _ = run_logits(2, m, tmp_path)
    line = assert_failed(r, f"rank 1: shard file {p} is corrupt or not HDF5")
    assert f"truncated file: eof = {size // 2}" in line and f"stored_eof = {size}" in line, line
    assert "rank 0" not in line, line


def test_corrupt_shard(model, tmp_path):
    m = fresh_copy(model, tmp_path)
    p = m / "ws2" / "rank0.h5"
    with open(p, "r+b") as fh:
        fh.seek(0)
        fh.write(b"\0" * 4096)
    r, _ = run_logits(2, m, tmp_path)
    line = assert_failed(r, f"rank 0: shard file {p} is corrupt or not HDF5")
    assert "file signature not found" in line and "rank 1" not in line, line


def test_not_a_model_dir(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    r, _ = run_logits(2, d, tmp_path)
    assert_failed(r, f"{d} is not a converted mpillm model (no manifest.json)")
    r, _ = run_logits(2, tmp_path / "absent", tmp_path)
    assert_failed(r, f"model directory {tmp_path / 'absent'} does not exist (on every rank)")


def test_more_ranks_than_heads(tmp_path):
    """The fixture has 6 query heads: 7 ranks cannot split it, at conversion or at run time."""
    from convert.__main__ import convert

    with pytest.raises(ValueError, match="world size 7 exceeds the model's 6 query heads"):
        convert(FIX, tmp_path / "x", [7], "f32", progress=False, tokenizer=False)
    m = tmp_path / "m1"
    convert(FIX, m, [1], "f32", progress=False, tokenizer=False)
    r, _ = run_logits(7, m, tmp_path)
    line = assert_failed(r, f"{m} was converted for world sizes [1], this job has 7 ranks; ")
    assert "world size 7 exceeds the model's 6 query heads" in line and "use at most 6 ranks" in line, line


def test_assert_failed_rejects_the_abort_path(model, tmp_path):
    """Negative control for assert_failed: a failure on one rank only (MPI_Abort) does not pass as
    the clean path."""
    r, _ = run_probed(2, ["-c", "import sys; from mpi4py import MPI; from mpillm.runtime.errors import run\n"
                                "def main():\n"
                                "    if MPI.COMM_WORLD.Get_rank() == 1: raise RuntimeError('boom 42')\n"
                                "    MPI.COMM_WORLD.Barrier(); return 0\n"
                                "run(main, 'probe')"], tmp_path)
    assert r.returncode != 0
    with pytest.raises(AssertionError, match="not every rank of 2 exited 1"):
        assert_failed(r, "", prog="probe")
    assert "probe: error on rank 1 of 2" in r.stderr and "boom 42" in r.stderr, r.stderr
    assert "mpi_abort" in r.stderr.lower() and r.exits == {}, (r.exits, r.stderr)   # what the checks look for


def _convert_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convert", *map(str, args), "--no-progress"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_unknown_architecture(tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(FIX, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    r = _convert_cli(src, tmp_path / "out", "--world-size", "1")
    assert r.returncode != 0
    assert "unknown architecture 'GPT2LMHeadModel'" in r.stderr and "LlamaForCausalLM" in r.stderr


def _rewrite_gguf(path: Path, extra_kv: dict | None = None) -> Path:
    """The llama fixture's GGUF written again, with extra metadata."""
    import gguf

    src = gguf.GGUFReader(FIX / "model.gguf")
    w = gguf.GGUFWriter(path, "llama")
    for f in src.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_array(f.name, f.contents())
        else:
            w.add_key_value(f.name, f.contents(), vt)
    for k, v in (extra_kv or {}).items():
        w.add_uint32(k, v)
    for t in src.tensors:
        w.add_tensor(t.name, np.asarray(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_tensor_type(tmp_path):
    """A GGUF tensor in a type we do not store (IQ2_XXS: 256-element blocks, so in the 256-wide
    K-quant GGUF of tests/kquant_gguf.py) is refused under auto, converted when asked."""
    sys.path.insert(0, str(ROOT / "tests"))
    import kquant_gguf

    path = tmp_path / "k.gguf"
    kquant_gguf.make(path, foreign={"blk.1.attn_v.weight": "IQ2_XXS"})
    r = _convert_cli(path, tmp_path / "out", "--world-size", "1", "--no-tokenizer")
    assert r.returncode != 0
    assert "blk.1.attn_v" in r.stderr or "layers/1/wv" in r.stderr
    assert "IQ2_XXS" in r.stderr and "--weight-type" in r.stderr
    r = _convert_cli(path, tmp_path / "out", "--world-size", "1", "--no-tokenizer", "--weight-type", "q8_0")
    assert r.returncode == 0, r.stderr


def _hf_copy(tmp_path: Path, name: str, **changes) -> Path:
    """A fixture directory whose config.json has ``changes`` (None deletes a key); weights linked."""
    src, dst = ROOT / "tests" / "fixtures" / name, tmp_path / f"{name}-hf"
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    for k, v in changes.items():
        cfg.pop(k, None) if v is None else cfg.__setitem__(k, v)
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    return dst


SLIDING_REFUSED = "sliding-window attention (window 128 tokens) is not supported yet"


@pytest.mark.parametrize("name, changes", [
    ("mistral", {"sliding_window": 128}),                                           # Mistral-7B-v0.1 style
    # Qwen2/Qwen3: layers from max_window_layers on slide (transformers derives layer_types so)
    ("qwen3", {"sliding_window": 128, "use_sliding_window": True, "layer_types": None, "max_window_layers": 0}),
    ("qwen3", {"sliding_window": 128, "use_sliding_window": True, "layer_types": None, "max_window_layers": 1}),
    ("qwen3", {"sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"]}),
])
def test_sliding_window_shorter_than_context_is_refused(tmp_path, name, changes):
    """The engine attends to the whole context: a model that attends to only the last 128 tokens of
    its 256 would be converted into one that is silently wrong past 128 tokens."""
    r = _convert_cli(_hf_copy(tmp_path, name, **changes), tmp_path / "out", "--world-size", "1")
    assert r.returncode == 2, r.stdout + r.stderr
    assert SLIDING_REFUSED in r.stderr and "context length 256" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, changes", [
    ("mistral", {"sliding_window": 256}),                   # the window covers the whole context
    ("mistral", {"sliding_window": 4096}),
    ("qwen3", {"sliding_window": 128, "use_sliding_window": False, "layer_types": None}),  # Qwen: off
    # on, but max_window_layers (28) >= the fixture's layers: no layer slides
    ("qwen3", {"sliding_window": 128, "use_sliding_window": True, "layer_types": None}),
    ("qwen3", {"sliding_window": 128}),                     # layer_types: every layer full attention
])
def test_sliding_window_that_never_applies_converts(tmp_path, name, changes):
    r = _convert_cli(_hf_copy(tmp_path, name, **changes), tmp_path / "out", "--world-size", "1",
                     "--no-tokenizer")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "ws1" / "rank0.h5").exists()


def test_gguf_sliding_window(tmp_path):
    """GGUF ``llama.attention.sliding_window``: 128 of a 256 context is refused, 256 converts."""
    r = _convert_cli(_rewrite_gguf(tmp_path / "swa.gguf", {"llama.attention.sliding_window": 128}),
                     tmp_path / "out", "--world-size", "1", "--no-tokenizer")
    assert r.returncode == 2 and SLIDING_REFUSED in r.stderr and "context length 256" in r.stderr, r.stderr
    r = _convert_cli(_rewrite_gguf(tmp_path / "full.gguf", {"llama.attention.sliding_window": 256}),
                     tmp_path / "out", "--world-size", "1", "--no-tokenizer")
    assert r.returncode == 0, r.stderr


def test_prompt_longer_than_max_seq_len(tmp_path):
    r, dt = run_probed(2, ["-m", "mpillm.generate", "--max-seq-len", "8", "--quiet", "--prompt",
                           "one two three four five six seven eight nine ten eleven twelve"], tmp_path)
    assert_failed(r, "the prompt has 12 tokens but --ctx-size 8 must hold the prompt and at least one generated token",
                  prog="mpillm.generate")
    assert dt < 120


SLEEPER = ("import os, sys, time; from mpi4py import MPI\n"
           "open(os.path.join(sys.argv[1], f'pid{MPI.COMM_WORLD.Get_rank()}'), 'w').write(str(os.getpid()))\n"
           "time.sleep(600)\n")


def _rank_pids(d: Path, n: int, wait: float = 60) -> list[int]:
    deadline = time.monotonic() + wait
    while len(list(d.glob("pid*"))) < n and time.monotonic() < deadline:
        time.sleep(0.2)
    return [int(p.read_text()) for p in sorted(d.glob("pid*"))]


def _alive(pids: list[int]) -> list[int]:
    out = []
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(p)
    return out


@pytest.mark.timeout(45)
def test_hung_job_is_reaped_inside_the_test_timeout(tmp_path):
    """A hung 2-rank job asked for 300 s inside a test allowed 45: the job limit is clipped to the
    test's own (so our kill and report come before pytest-timeout's), and every rank is killed,
    though Open MPI puts each rank in a process group of its own."""
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match=r"hung for \d+s \(clipped from 300s"):
        mpirun(2, ["-c", SLEEPER, str(tmp_path)], timeout=300)
    pids = _rank_pids(tmp_path, 2, wait=0)
    assert len(pids) == 2 and time.monotonic() - t0 < 45 - 5
    time.sleep(0.5)
    assert _alive(pids) == [], f"ranks left running after the timeout: {_alive(pids)}"


def test_job_dies_with_pytest(tmp_path):
    """If the process that launched a job dies (pytest-timeout's thread method ends pytest with
    os._exit), mpirun gets SIGTERM from the kernel and ends its ranks."""
    code = ("import sys, os; sys.path.insert(0, 'tests'); import mpiutil\n"
            "mpiutil.popen_job(mpiutil.mpirun_cmd(2) + [sys.executable, '-c', sys.argv[1], sys.argv[2]],"
            " mpiutil.mpi_env(), stdout=None, stderr=None)\n"
            "import time; d = sys.argv[2]\n"
            "while len([f for f in os.listdir(d) if f.startswith('pid')]) < 2: time.sleep(0.2)\n"
            "os._exit(1)\n")
    r = subprocess.run([sys.executable, "-c", code, SLEEPER, str(tmp_path)], cwd=ROOT, timeout=90)
    assert r.returncode == 1
    pids = _rank_pids(tmp_path, 2, wait=0)
    assert len(pids) == 2
    deadline = time.monotonic() + 15
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _alive(pids) == [], f"ranks outlived the process that launched them: {_alive(pids)}"


def test_kv_slots_that_do_not_fit_are_refused(tmp_path, monkeypatch):
    """--parallel x --ctx-size beyond a rank's memory: refused before allocating, naming the need,
    what is available and the largest --parallel / --ctx-size that fit; every rank exits."""
    monkeypatch.setenv("MPILLM_MEMORY_LIMIT", str(200 * 2**20))  # the ranks inherit it

    def generate(parallel: int):
        return run_probed(2, ["-m", "mpillm.generate", "--quiet", "--parallel", str(parallel), "--ctx-size", "2048",
                              "--max-tokens", "1"], tmp_path)

    r, dt = generate(16)
    # SmolLM2 at np 2: each rank holds 2 of the 3 KV heads, 30 layers, head size 64, fp16
    need = 2 * 30 * 2 * 64 * 2 * 16 * 2048
    assert_failed(r, f"the KV cache for 16 slot(s) x 2048 tokens needs {need // 2**20} MiB but 90 MiB is available "
                     "to this rank (2 rank(s) on the node); at most --parallel 3 at --ctx-size 2048, or --ctx-size "
                     "384 at --parallel 16 (on every rank)", prog="mpillm.generate")
    assert dt < 120
    r, _ = generate(1)  # the positive control: the slots that fit run
    assert r.returncode == 0 and r.exits == {0: 0, 1: 0}, r.stderr[-2000:]
