"""The import graph of the project's packages, read from the source (AST), and its cycles.

    python scripts/import_graph.py                 # every module and what it imports; cycles last
    python scripts/import_graph.py --cycles        # only the cycles (exit 1 if there is one)
    python scripts/import_graph.py --root /other/checkout --packages mpillm

Every import counts, including those inside functions: a cycle closed by a function-level import
is still a cycle (a module run as ``__main__`` then meets a second copy of itself). Edges are
module to module: ``from pkg import name`` points at ``pkg.name`` when that is a module, else at
``pkg``. tests/test_layout.py runs this on the checkout.
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGES = ("mpillm", "convert", "hpl")


def modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """module name -> file, for every .py file of the packages under ``root``."""
    out = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _target(name: str, node: ast.ImportFrom, is_pkg: bool) -> str:
    """The absolute module an ``ImportFrom`` reads from."""
    if not node.level:
        return node.module or ""
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its source)."""
    mods = modules(root, packages)
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for a in node.names:
                    parts = a.name.split(".")
                    hit = next((".".join(parts[:i]) for i in range(len(parts), 0, -1)
                                if ".".join(parts[:i]) in mods), None)
                    if hit:
                        out.add(hit)
            elif isinstance(node, ast.ImportFrom):
                tgt = _target(name, node, path.name == "__init__.py")
                for a in node.names:
                    if f"{tgt}.{a.name}" in mods:
                        out.add(f"{tgt}.{a.name}")
                    elif tgt in mods:
                        out.add(tgt)
        out.discard(name)
        edges[name] = out
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a self-loop), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(edges):          # iterative Tarjan: no recursion limit on deep graphs
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in edges:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1 or v in edges[v]:
                    found.append(sorted(comp))
    return sorted(found)


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for w in edges.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                   help="the checkout to read (default: this one)")
    p.add_argument("--packages", nargs="+", default=list(PACKAGES), help="top-level packages (default: %(default)s)")
    p.add_argument("--cycles", action="store_true", help="print only the cycles")
    a = p.parse_args(argv)
    edges = graph(a.root, a.packages)
    if not a.cycles:
        for m in sorted(edges):
            print(f"{m} -> {' '.join(sorted(edges[m]))}")
    found = cycles(edges)
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports, {len(found)} cycle(s)")
    for c in found:
        print(f"  cycle of {len(c)}: {' '.join(c)}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
