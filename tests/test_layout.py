"""The house rules that code review alone would let slip: no import cycle (imports inside functions
included), the scheduler importable without MPI or numba, and the engine apart from the commands
and the HTTP layer. The graph comes from scripts/import_graph.py (the AST of every module)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_project_has_no_import_cycle():
    g = _tool()
    edges = g.graph(ROOT)
    assert "mpillm.runtime.engine" in edges and "convert.synth" in edges   # it read the packages
    assert g.cycles(edges) == []


def test_a_cycle_through_an_import_inside_a_function_is_found(tmp_path):
    """Control: the check sees the kind of cycle that cost a bug (module-level one way, a
    function-level import back), relative and absolute imports alike."""
    pkg = tmp_path / "mpillm"
    (pkg / "runtime").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "runtime" / "__init__.py").write_text("")
    (pkg / "runtime" / "engine.py").write_text("from . import warm\n")
    (pkg / "runtime" / "warm.py").write_text(textwrap.dedent("""\
        def compile_for():
            from mpillm.runtime.engine import Engine
            return Engine
        """))
    (pkg / "free.py").write_text("from mpillm.runtime import warm\n")
    g = _tool()
    edges = g.graph(tmp_path, ("mpillm",))
    assert edges["mpillm.runtime.engine"] == {"mpillm.runtime.warm"}
    assert edges["mpillm.runtime.warm"] == {"mpillm.runtime.engine"}
    assert g.cycles(edges) == [["mpillm.runtime.engine", "mpillm.runtime.warm"]]
    (pkg / "runtime" / "warm.py").write_text("def compile_for(engine_cls):\n    return engine_cls\n")
    assert g.cycles(g.graph(tmp_path, ("mpillm",))) == []


def test_the_engine_imports_no_command_startup_or_serving_module():
    g = _tool()
    edges = g.graph(ROOT)
    commands = {"mpillm.generate", "mpillm.chat", "mpillm.serve", "mpillm.serve.__main__", "mpillm.bench",
                "mpillm.bench_spec", "mpillm.perplexity", "mpillm.check", "mpillm.verify", "mpillm.warmup",
                "mpillm.options", "mpillm.startup", "mpillm.cli"}
    for mod in ("mpillm.runtime.engine", "mpillm.runtime.model", "mpillm.runtime.collectives"):
        reach = g.reachable(edges, mod)
        assert not reach & commands, (mod, reach & commands)
        assert not {m for m in reach if m.startswith("mpillm.serving")}, mod
    # the request side reaches the engine only through the step contract, never the HTTP layer
    for mod in ("mpillm.serving.scheduler", "mpillm.serving.service", "mpillm.serving.sampling"):
        reach = g.reachable(edges, mod)
        assert "mpillm.runtime.engine" not in reach and not {m for m in reach if ".http" in m}, (mod, reach)


def _imported_by(module: str, tmp_path: Path) -> tuple[set[str], list[str]]:
    """Which of mpi4py / numba a fresh interpreter has after importing ``module``, and what it wrote
    into an empty numba cache directory."""
    cache = tmp_path / "numba"
    code = (f"import sys, {module}\n"
            "print(' '.join(m for m in ('mpi4py', 'numba') if m in sys.modules))")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    env.pop("OMPI_COMM_WORLD_SIZE", None)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    written = [str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    return set(r.stdout.split()), written


def test_the_scheduler_imports_without_mpi_or_numba(tmp_path):
    mods, written = _imported_by("mpillm.serving.scheduler", tmp_path / "a")
    assert mods == set()
    assert written == []
    # control: the engine does pull both in, and writes its generated kernel source, so the
    # check above can see them when they are there
    mods, written = _imported_by("mpillm.runtime.engine", tmp_path / "b")
    assert mods == {"mpi4py", "numba"}
    assert written
