"""Reader (and writer) for HPL's classic input file ``HPL.dat``.

Layout (one item per line, the values first, a comment after them):

    line 1-2   free text
    line 3     output file name            line 4   device out (6=stdout, 7=stderr, file)
    line 5     number of Ns                line 6   Ns
    line 7     number of NBs               line 8   NBs
    line 9     PMAP (0=row-, 1=column-major)
    line 10    number of grids             line 11  Ps     line 12  Qs
    line 13    threshold
    line 14-31 algorithm variants (PFACT, NBMIN, NDIV, RFACT, BCAST, DEPTH, SWAP, ...):
               read and kept, but this implementation always runs its own variant.

hpcc's ``hpccinf.txt`` is the same file with PTRANS lines appended; they are ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class HplDat:
    ns: list[int]
    nbs: list[int]
    ps: list[int]
    qs: list[int]
    pmap: int = 0                 # 0 = row-major, 1 = column-major process mapping
    threshold: float = 16.0
    output: str = "HPL.out"
    device: int = 6
    extra: dict[str, list[float]] = field(default_factory=dict)

    @property
    def grids(self) -> list[tuple[int, int]]:
        return list(zip(self.ps, self.qs))


def _ints(line: str, count: int, what: str, lineno: int) -> list[int]:
    toks = line.split()
    if len(toks) < count:
        raise ValueError(f"HPL.dat line {lineno}: expected {count} value(s) for {what}, got {line.strip()!r}")
    try:
        return [int(t) for t in toks[:count]]
    except ValueError:
        raise ValueError(f"HPL.dat line {lineno}: {what} must be integers, got {line.strip()!r}") from None


def _count(line: str, what: str, lineno: int, lo: int = 1, hi: int = 20) -> int:
    (c,) = _ints(line, 1, what, lineno)
    if not lo <= c <= hi:
        raise ValueError(f"HPL.dat line {lineno}: number of {what} must be in [{lo}, {hi}], got {c}")
    return c


def parse(text: str) -> HplDat:
    """Parse the text of an HPL.dat file; raises ValueError with the line number on bad input."""
    lines = text.splitlines()
    if len(lines) < 13:
        raise ValueError(f"HPL.dat is too short: {len(lines)} lines, need at least 13")
    output = lines[2].split()[0] if lines[2].split() else "HPL.out"
    (device,) = _ints(lines[3], 1, "device out", 4)
    nn = _count(lines[4], "problem sizes (N)", 5)
    ns = _ints(lines[5], nn, "Ns", 6)
    nnb = _count(lines[6], "block sizes (NB)", 7)
    nbs = _ints(lines[7], nnb, "NBs", 8)
    (pmap,) = _ints(lines[8], 1, "PMAP", 9)
    if pmap not in (0, 1):
        raise ValueError(f"HPL.dat line 9: PMAP must be 0 or 1, got {pmap}")
    ng = _count(lines[9], "process grids", 10)
    ps = _ints(lines[10], ng, "Ps", 11)
    qs = _ints(lines[11], ng, "Qs", 12)
    try:
        threshold = float(lines[12].split()[0])
    except (IndexError, ValueError):
        raise ValueError(f"HPL.dat line 13: threshold must be a number, got {lines[12].strip()!r}") from None
    for what, vals, lo in (("N", ns, 0), ("NB", nbs, 1), ("P", ps, 1), ("Q", qs, 1)):
        bad = [v for v in vals if v < lo]
        if bad:
            raise ValueError(f"HPL.dat: {what} must be >= {lo}, got {bad[0]}")
    # the algorithm variants: counted lists, then single values; kept for the record
    extra: dict[str, list[float]] = {}
    i = 13
    for name in ("PFACTs", "NBMINs", "NDIVs", "RFACTs", "BCASTs", "DEPTHs"):
        if i + 1 >= len(lines):
            break
        c = _count(lines[i], name, i + 1)
        extra[name] = [float(v) for v in _ints(lines[i + 1], c, name, i + 2)]
        i += 2
    for name in ("SWAP", "swapping threshold", "L1 form", "U form", "Equilibration", "alignment"):
        if i >= len(lines) or not lines[i].split():
            break
        try:
            extra[name] = [float(lines[i].split()[0])]
        except ValueError:
            break
        i += 1
    return HplDat(ns=ns, nbs=nbs, ps=ps, qs=qs, pmap=pmap, threshold=threshold, output=output,
                  device=device, extra=extra)


def read(path: str | Path) -> HplDat:
    return parse(Path(path).read_text())


def format_dat(ns: list[int], nbs: list[int], grids: list[tuple[int, int]], threshold: float = 16.0,
               pmap: int = 0, depth: int = 1, bcast: int = 1) -> str:
    """Write an HPL.dat (for netlib HPL / hpcc) that runs the given sizes and grids."""
    ps = " ".join(str(p) for p, _ in grids)
    qs = " ".join(str(q) for _, q in grids)
    rows = [
        ("HPLinpack benchmark input file", None),
        ("Innovative Computing Laboratory, University of Tennessee", None),
        ("HPL.out", "output file name (if any)"),
        ("6", "device out (6=stdout,7=stderr,file)"),
        (str(len(ns)), "# of problems sizes (N)"),
        (" ".join(map(str, ns)), "Ns"),
        (str(len(nbs)), "# of NBs"),
        (" ".join(map(str, nbs)), "NBs"),
        (str(pmap), "PMAP process mapping (0=Row-,1=Column-major)"),
        (str(len(grids)), "# of process grids (P x Q)"),
        (ps, "Ps"),
        (qs, "Qs"),
        (f"{threshold:.1f}", "threshold"),
        ("1", "# of panel fact"),
        ("2", "PFACTs (0=left, 1=Crout, 2=Right)"),
        ("1", "# of recursive stopping criterium"),
        ("4", "NBMINs (>= 1)"),
        ("1", "# of panels in recursion"),
        ("2", "NDIVs"),
        ("1", "# of recursive panel fact."),
        ("1", "RFACTs (0=left, 1=Crout, 2=Right)"),
        ("1", "# of broadcast"),
        (str(bcast), "BCASTs (0=1rg,1=1rM,2=2rg,3=2rM,4=Lng,5=LnM)"),
        ("1", "# of lookahead depth"),
        (str(depth), "DEPTHs (>=0)"),
        ("2", "SWAP (0=bin-exch,1=long,2=mix)"),
        ("64", "swapping threshold"),
        ("0", "L1 in (0=transposed,1=no-transposed) form"),
        ("0", "U  in (0=transposed,1=no-transposed) form"),
        ("1", "Equilibration (0=no,1=yes)"),
        ("8", "memory alignment in double (> 0)"),
    ]
    return "".join(v + "\n" if c is None else f"{v:<12} {c}\n" for v, c in rows)
