"""The cluster report: how much of the machine does LLM inference use?

    mpirun -np N --hostfile hostfile python -m hpl.compare [--n 15000 | --mem-fraction 0.3] [--model M]

On the same ranks and hosts it measures
  (a) FP64 HPL Gflops (this package's HPL),
  (b) every node's memory bandwidth (STREAM triad, all ranks of a node at once),
  (c) the LLM engine's prompt and generate throughput (``python -m mpillm.bench``),
then prints a Markdown table (ready for a blog post) and writes JSON, Markdown
and a PNG chart next to ``--out``.

The LLM part lives in one function, ``llm_figures``: it launches the bench as a
separate ``mpirun`` job with the same rank count (and hostfile) while the report's
own ranks sleep, and reads the JSON the bench prints.  When the bench is missing
or fails, the LLM rows are left out with the reason.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from mpi4py import MPI

from . import blas
from .driver import (InputError, check_memory, n_from_mem_fraction, node_info, report_error, run_hpl,
                     validate)
from .grid import closest_square
from .stream import measure_job

LLM_KEYS = ("prompt_tok_s", "generate_tok_s", "weight_bytes_per_token", "comm_bytes_per_token", "flops_per_token")


# ---------------------------------------------------------------- (c) the LLM bench, isolated

def _clean_mpi_env() -> dict:
    """The environment minus the variables of the MPI job we are running in (so a new mpirun starts fresh)."""
    keep = ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "PRTE_MCA_rmaps_default_mapping_policy")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_", "PMIX_", "PRTE_", "OPAL_", "PMI_", "HYDRA_")) or k in keep}
    return env


def _last_json_object(text: str) -> dict | None:
    """The last JSON object in a program's output (the bench may log lines before it)."""
    dec = json.JSONDecoder()
    found = None
    i = text.find("{")
    while i != -1:
        try:
            obj, end = dec.raw_decode(text, i)
            if isinstance(obj, dict):
                found = obj
            i = text.find("{", end)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
    return found


def llm_figures(model: str | None = None, np: int = 1, hostfile: str | None = None,
                extra_args: list[str] | tuple[str, ...] = (), timeout: float = 1800.0,
                module: str = "mpillm.bench") -> dict:
    """Run ``python -m mpillm.bench`` on ``np`` ranks and return its figures.

    Returns a dict with the keys of LLM_KEYS (floats; None for one the bench does not report) plus
    "model" and "command";
    or {"skipped": "<reason>"} when the bench is not available or fails.
    The bench is expected to print a JSON object with (at least) those keys; byte
    and FLOP counts are per generated token for the whole job (all ranks).
    """
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        spec = None
    if spec is None:
        return {"skipped": f"{module} is not available yet (python -m {module} not found)"}
    launcher = Path(sys.executable).parent / "mpirun"
    cmd = [str(launcher) if launcher.exists() else "mpirun", "-np", str(np), "--bind-to", "none"]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    cmd += [sys.executable, "-m", module]
    if model:
        cmd += ["--model", model]
    cmd += list(extra_args)
    shown = " ".join(shlex.quote(c) for c in cmd)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_clean_mpi_env(),
                              start_new_session=True)
    except subprocess.TimeoutExpired:
        return {"skipped": f"{module} did not finish in {timeout:.0f} s", "command": shown}
    except OSError as e:
        return {"skipped": f"cannot start {module}: {e}", "command": shown}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"skipped": f"{module} exited with {proc.returncode}: {' | '.join(tail)}", "command": shown}
    data = _last_json_object(proc.stdout)
    if data is None:
        return {"skipped": f"{module} printed no JSON object", "command": shown}
    missing = [k for k in ("prompt_tok_s", "generate_tok_s") if k not in data]
    if missing:
        return {"skipped": f"{module} JSON lacks {', '.join(missing)}", "command": shown}
    # the other figures are optional: a missing one shows as n/a
    out: dict = {k: (float(data[k]) if data.get(k) is not None else None) for k in LLM_KEYS}
    if out["comm_bytes_per_token"] is None and "allreduce_payload_bytes_per_token" in data:
        out["comm_bytes_per_token"] = float(data["allreduce_payload_bytes_per_token"]) + float(
            data.get("logits_gather_bytes_per_token") or 0.0)
    out["model"] = os.path.basename(str(data.get("model", model or "default")).rstrip("/")) or "default"
    out["command"] = shown
    out["raw"] = data
    return out


def _sleeping_barrier(comm: MPI.Comm, poll: float = 0.05) -> None:
    """A barrier that sleeps instead of spinning (so waiting ranks leave the cores to the bench)."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(poll)


# ---------------------------------------------------------------- the numbers

def derive(hpl: dict, stream: dict, llm: dict, nodes: int) -> dict:
    """The ratios a reader wants: weight bandwidth vs STREAM, inference FLOP/s vs HPL, network per token."""
    d: dict = {}
    if "skipped" in llm:
        return d
    gen, pre = llm["generate_tok_s"], llm["prompt_tok_s"]
    nan = float("nan")
    wb, fl, cb = llm.get("weight_bytes_per_token"), llm.get("flops_per_token"), llm.get("comm_bytes_per_token")
    if wb is not None:
        d["weight_gbs"] = wb * gen / 1e9
        d["weight_frac_stream"] = d["weight_gbs"] / stream["total_gbs"] if stream["total_gbs"] else nan
    if fl is not None:
        d["gen_gflops"] = fl * gen / 1e9
        d["prompt_gflops"] = fl * pre / 1e9
        d["gen_frac_hpl"] = d["gen_gflops"] / hpl["gflops"] if hpl["gflops"] else nan
        d["prompt_frac_hpl"] = d["prompt_gflops"] / hpl["gflops"] if hpl["gflops"] else nan
    if cb is not None:
        d["net_mbs_generate"] = cb * gen / 1e6
    return d


def _fmt_bytes(b: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= div:
            return f"{b / div:.1f} {unit}"
    return f"{b:.0f} B"


def table(rep: dict) -> str:
    """The report as an aligned Markdown table."""
    h, s, llm, d = rep["hpl"], rep["stream"], rep["llm"], rep["derived"]
    nodes = rep["cluster"]["nodes"]
    rows: list[tuple[str, str, str]] = [
        ("FP64 compute (HPL)", f"{h['gflops']:.1f} Gflops",
         f"N={h['n']} NB={h['nb']} {h['p']}x{h['q']}, {h['time']:.1f} s, "
         f"{h['gflops'] / nodes:.1f}/node, residual {h['resid']:.2e} {'PASSED' if h['passed'] else 'FAILED'}"),
        ("Memory bandwidth (STREAM triad)", f"{s['total_gbs']:.1f} GB/s",
         ", ".join(f"{host} {g:.1f}" for host, g in s["per_node"].items()) +
         f" GB/s; {s['threads_per_rank']} thread(s)/rank"),
    ]
    if "skipped" in llm:
        rows.append(("LLM inference", "not measured", llm["skipped"]))
    else:
        na = "n/a (not in the bench's JSON)"
        rows += [
            ("LLM prompt throughput", f"{llm['prompt_tok_s']:.1f} tok/s", f"model {llm['model']}"),
            ("LLM generate throughput", f"{llm['generate_tok_s']:.1f} tok/s", ""),
        ]
        if "weight_gbs" in d:
            rows.append(("Weight streaming (generate)", f"{d['weight_gbs']:.1f} GB/s",
                         f"{100 * d['weight_frac_stream']:.0f} % of STREAM; "
                         f"{_fmt_bytes(llm['weight_bytes_per_token'])} of weights per token"))
        else:
            rows.append(("Weight streaming (generate)", "n/a", na))
        if "gen_gflops" in d:
            rows += [("Inference compute (prompt)", f"{d['prompt_gflops']:.1f} GFLOP/s",
                      f"{100 * d['prompt_frac_hpl']:.1f} % of HPL FP64"),
                     ("Inference compute (generate)", f"{d['gen_gflops']:.1f} GFLOP/s",
                      f"{100 * d['gen_frac_hpl']:.1f} % of HPL FP64")]
        else:
            rows.append(("Inference compute", "n/a", na))
        if "net_mbs_generate" in d:
            rows.append(("Network per token", _fmt_bytes(llm["comm_bytes_per_token"]),
                         f"{d['net_mbs_generate']:.1f} MB/s while generating"))
        else:
            rows.append(("Network per token", "n/a", na))
    heads = ("What", "Measured", "Details")
    w = [max(len(heads[i]), *(len(r[i]) for r in rows)) for i in range(3)]
    line = lambda c: "| " + " | ".join(c[i].ljust(w[i]) if i != 1 else c[i].rjust(w[i]) for i in range(3)) + " |"
    sep = "|" + "|".join("-" * (w[i] + 2) if i != 1 else "-" * (w[i] + 1) + ":" for i in range(3)) + "|"
    c = rep["cluster"]
    title = (f"**Cluster report** — {c['nodes']} node(s), {c['ranks']} MPI rank(s), "
             f"{c['cpus_per_node']} core(s) and {c['mem_per_node_gib']:.0f} GiB per node, {c['date']}")
    notes = ["", "HPL and STREAM measured on the same ranks and hosts as the LLM bench. Inference FLOP/s are the "
             "model's multiply-adds per token times tok/s (low-precision kernels), set against FP64 HPL; "
             "weight streaming is weight bytes per token times generate tok/s, set against the summed STREAM triad."]
    return "\n".join([title, "", line(heads), sep] + [line(r) for r in rows] + notes)


def chart(rep: dict, path: Path) -> str | None:
    """A PNG with three panels: FP64 vs inference FLOP/s, STREAM vs weight bandwidth, tok/s."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no chart"
    h, s, llm, d = rep["hpl"], rep["stream"], rep["llm"], rep["derived"]
    have_llm = "skipped" not in llm
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.8))
    blue, orange, green, grey = "#3b75af", "#ef8636", "#519e3e", "#9a9a9a"

    def bars(ax, labels, values, colors, unit, title, notes=None):
        xs = range(len(values))
        ax.bar(xs, values, color=colors, width=0.6)
        ax.set_xticks(list(xs), labels, fontsize=9)
        ax.set_title(title, fontsize=11)
        ax.set_ylabel(unit)
        top = max(values) if values else 1.0
        for i, v in enumerate(values):
            txt = f"{v:.1f}" + (f"\n{notes[i]}" if notes and notes[i] else "")
            ax.text(i, v + top * 0.02, txt, ha="center", va="bottom", fontsize=9)
        ax.set_ylim(0, top * 1.3 if top > 0 else 1)
        ax.spines[["top", "right"]].set_visible(False)

    if have_llm and "gen_gflops" in d:
        bars(axes[0], ["HPL FP64", "LLM prompt", "LLM generate"],
             [h["gflops"], d["prompt_gflops"], d["gen_gflops"]], [blue, orange, orange], "GFLOP/s",
             "Compute", ["", f"{100 * d['prompt_frac_hpl']:.1f} % of HPL", f"{100 * d['gen_frac_hpl']:.1f} % of HPL"])
    else:
        bars(axes[0], ["HPL FP64"], [h["gflops"]], [blue], "GFLOP/s", "Compute")
    labels = [f"STREAM\n{host}" for host in s["per_node"]]
    vals = list(s["per_node"].values())
    cols = [grey] * len(vals)
    notes: list[str] = [""] * len(vals)
    if len(vals) > 1:
        labels.append("STREAM\ntotal")
        vals.append(s["total_gbs"])
        cols.append(green)
        notes.append("")
    if have_llm and "weight_gbs" in d:
        labels.append("LLM weights\n(generate)")
        vals.append(d["weight_gbs"])
        cols.append(orange)
        notes.append(f"{100 * d['weight_frac_stream']:.0f} % of STREAM")
    bars(axes[1], labels, vals, cols, "GB/s", "Memory bandwidth", notes)
    if have_llm:
        bars(axes[2], ["prompt", "generate"], [llm["prompt_tok_s"], llm["generate_tok_s"]], [orange, orange],
             "tokens/s", f"LLM throughput ({llm['model']})",
             ["", f"net {_fmt_bytes(llm['comm_bytes_per_token'])}/token" if "net_mbs_generate" in d else ""])
    else:
        axes[2].axis("off")
        axes[2].text(0.5, 0.5, "LLM not measured:\n" + llm["skipped"], ha="center", va="center",
                     fontsize=10, wrap=True, transform=axes[2].transAxes)
    c = rep["cluster"]
    fig.suptitle(f"{c['nodes']} node(s), {c['ranks']} MPI ranks — HPL N={h['n']} NB={h['nb']} "
                 f"{h['p']}x{h['q']}: {h['gflops']:.1f} Gflops; STREAM {s['total_gbs']:.1f} GB/s", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ---------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m hpl.compare", description=(
        "Cluster report: HPL FP64 Gflops, STREAM GB/s per node, and the LLM engine's throughput beside them."))
    ap.add_argument("--n", type=int, default=None, help="HPL problem size (default 10000)")
    ap.add_argument("--nb", type=int, default=192, help="HPL block size (default 192)")
    ap.add_argument("--p", type=int, default=None, help="HPL process rows (default: closest to square)")
    ap.add_argument("--q", type=int, default=None, help="HPL process columns")
    ap.add_argument("--mem-fraction", type=float, default=None, help="size N from this fraction of total memory")
    ap.add_argument("--stream-mib", type=int, default=384, help="MiB of STREAM arrays per rank (default 384)")
    ap.add_argument("--model", default=None, help="model for mpillm.bench (default: the bench's own default)")
    ap.add_argument("--bench-arg", action="append", default=[], help="extra argument for mpillm.bench (repeat)")
    ap.add_argument("--hostfile", default=None, help="hostfile to pass to the bench's mpirun")
    ap.add_argument("--llm-timeout", type=float, default=1800.0, help="seconds allowed for the LLM bench")
    ap.add_argument("--no-llm", action="store_true", help="skip the LLM bench")
    ap.add_argument("--bench-module", default="mpillm.bench", help=argparse.SUPPRESS)   # tests: a stand-in
    ap.add_argument("--out", default="cluster_report", help="output prefix: writes PREFIX.json, .md and .png")
    ap.add_argument("--quiet", action="store_true", help="no HPL progress lines")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    comm = MPI.COMM_WORLD
    size, rank = comm.Get_size(), comm.Get_rank()
    try:
        info = node_info(comm)
        threads = max(1, info.cpus // info.ranks_on_node)
        blas.set_threads(threads)
        if args.p is not None and args.q is not None:
            p, q = args.p, args.q
        elif args.p is not None:
            p, q = args.p, size // max(args.p, 1)
        elif args.q is not None:
            p, q = size // max(args.q, 1), args.q
        else:
            p, q = closest_square(size)
        if args.mem_fraction is not None:
            if not 0.0 < args.mem_fraction <= 0.95:
                raise InputError(f"--mem-fraction must be in (0, 0.95], got {args.mem_fraction}")
            n = n_from_mem_fraction(args.mem_fraction, info.total_mem, max(args.nb, 1))
        else:
            n = args.n if args.n is not None else 10000
        validate(n, args.nb, p, q, size)
        check_memory(comm, info, n, args.nb, p, q, divmod(rank, q))
    except InputError as e:
        report_error(comm, str(e))
        return 2

    def say(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    say(f"[1/3] HPL  N={n} NB={args.nb} P={p} Q={q} on {size} rank(s), {threads} BLAS thread(s) per rank")
    hpl = run_hpl(comm, n, args.nb, p, q, verbose=True, progress=not args.quiet)
    say(f"[2/3] STREAM triad, {args.stream_mib} MiB per rank, all ranks of a node at once")
    stream = measure_job(comm, args.stream_mib << 20)
    llm: dict = {"skipped": "--no-llm given"} if args.no_llm else {}
    if not args.no_llm:
        say(f"[3/3] LLM bench: python -m mpillm.bench on {size} rank(s)")
        if rank == 0:
            llm = llm_figures(args.model, np=size, hostfile=args.hostfile, extra_args=args.bench_arg,
                              timeout=args.llm_timeout, module=args.bench_module)
        _sleeping_barrier(comm)
        llm = comm.bcast(llm, root=0)
    if rank != 0:
        return 0 if hpl["passed"] else 1
    if "skipped" in llm:
        print(f"      LLM column skipped: {llm['skipped']}", flush=True)
    rep = {
        "cluster": {"nodes": info.nodes, "ranks": size, "cpus_per_node": info.cpus,
                    "mem_per_node_gib": info.mem_total / 2**30, "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
                    "blas": blas.core_name(), "blas_threads_per_rank": threads},
        "hpl": {k: hpl[k] for k in ("n", "nb", "p", "q", "time", "gflops", "resid", "passed")},
        "stream": stream,
        "llm": {k: v for k, v in llm.items() if k != "raw"},
        "llm_raw": llm.get("raw"),
        "derived": derive(hpl, stream, llm, info.nodes),
    }
    text = table(rep)
    print()
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rep, indent=2, default=float) + "\n")
    out.with_suffix(".md").write_text(text + "\n")
    err = chart(rep, out.with_suffix(".png"))
    print()
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}"
          + (f", {out.with_suffix('.png')}" if err is None else f" ({err})"), flush=True)
    return 0 if hpl["passed"] else 1


if __name__ == "__main__":
    from mpillm.runtime.errors import run

    run(main, "hpl.compare")  # an unexpected failure on one rank takes the whole job down
