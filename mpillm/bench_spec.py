"""Benchmark speculative decoding on the current MPI job and print JSON.

  mpirun -np 2 python -m mpillm.bench_spec [--model M] [--draft-model D] [--repeats 3] [--json out.json]

Two workloads through the Service (what generate, chat and serve use), greedy:
  * grounded: the chat template with a text of about 1,000 tokens and "Repeat the text above
    exactly, word for word.", so the answer copies spans of its input (as rewriting, editing and
    summarising do; the bundled 135M model copies the first sentences, then paraphrases);
  * free: an open story prompt, where little repeats.
Each repetition runs plain decoding, --draft lookup and (with --draft-model) the draft model on
the same engine one after the other, so the ratios against plain are measured under the same
machine load; the JSON gives every repetition and the median ratios. Reported per mode: generate
tok/s (first token to last, prefill excluded), the acceptance rate (accepted / drafted), mean
tokens per target step, time spent drafting, and whether the tokens equal plain decoding's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from mpi4py import MPI

from mpillm.runtime.errors import run
from mpillm.options import add_model_args, parse_args_bcast, sync_table

# Several distinct paragraphs on one subject (written for this benchmark), about 1,000 tokens with
# the bundled model's tokenizer: nothing in it repeats, so lookup drafts only from the copy.
TEXT = """\
The history of the lighthouse begins long before electric lamps or even glass lenses. In the ancient \
world, sailors steered by fires lit on hilltops near dangerous coasts, and the most famous of these \
beacons, the Pharos of Alexandria, stood for more than a thousand years. It was built on a small island \
at the entrance to the harbour, rose in three stages of stone, and carried a fire at its summit whose \
light, according to travellers, could be seen far out at sea. Earthquakes damaged it again and again, \
and by the fourteenth century only ruins remained, but its name survives in several languages as the \
word for a lighthouse.

For centuries afterwards, coastal lights were little more than open fires or candles behind windows. \
Coal fires burned brightly but needed constant tending, and in stormy weather the smoke and the rain \
could hide them entirely. Keepers carried sacks of coal up narrow stairs every night, and a single \
tower might consume hundreds of tons in a year. Candles were cleaner but far weaker, and a light that \
could not be seen from a safe distance was of little use to a ship already among the rocks.

The great change came with oil lamps and reflectors. In the late eighteenth century, engineers placed \
lamps with hollow wicks in front of polished metal mirrors shaped like bowls, which gathered the light \
and sent it out in a beam. Several such lamps could be mounted on a frame and turned by clockwork, so \
that the beam swept around the horizon and each lighthouse could be recognised by the rhythm of its \
flashes. Sailors began to carry lists that described every light along a coast: its colour, its \
height, and the number of seconds between its flashes.

In 1822 the French physicist Augustin Fresnel presented a new kind of lens. Instead of one thick piece \
of glass, which would have been enormously heavy, he arranged many thin rings of glass around a \
central lens, each ring shaped to bend the light from the lamp into the same direction. Above and \
below, further rings of prisms caught light that would otherwise have escaped upwards or downwards \
and reflected it into the beam as well. The result was a lens that captured most of the lamp's light \
and could be seen more than twenty miles away. Within a few decades Fresnel lenses had been installed \
in lighthouses across Europe and America, and some of them are still in use today.

Life at a lighthouse was hard and often lonely. Keepers worked in shifts through the night, trimming \
the wicks, winding the clockwork that turned the lens, and cleaning soot from the glass so that the \
light would stay bright. During the day they polished brass, painted the tower, kept records of the \
weather, and repaired whatever the wind and the sea had broken. On rock stations far from shore, \
supplies arrived by boat when the weather allowed, and in winter a keeper might go weeks without \
seeing anyone except the other members of his small crew. Many keepers brought their families to \
stations on land, and children grew up learning the routines of the light.

In the twentieth century, electricity replaced oil, and automatic equipment gradually replaced the \
keepers. Lamps that changed their own bulbs, sensors that switched the light on at dusk, and radio \
beacons that ships could follow in fog made the old routines unnecessary. One by one, the towers \
were automated and their keepers left. Today satellite navigation tells a ship its position within \
a few metres, yet lighthouses still shine along most coasts, both as a backup when electronics fail \
and as landmarks that generations of sailors have trusted. Many of the old towers have become \
museums, where visitors climb the spiral stairs, look through the great lenses, and imagine the long \
nights when a keeper's care was all that stood between a ship and the rocks."""

FREE_PROMPT = "Write a long story about a dragon who learns to cook, with many characters and places."


def chat_ids(tok, text: str) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True),
                      add_bos=False)


def timed(service, ids: list[int], params) -> dict:
    """One request alone: its tokens, generate time (first token to last) and the draft counters."""
    c0 = service.metrics()
    toks, t1 = [], None
    for o in service.stream(ids, params):
        if t1 is None:
            t1 = time.perf_counter()
        toks += o.token_ids
    gen_s = time.perf_counter() - t1
    c1 = service.metrics()
    d = {k: c1[k] - c0[k] for k in ("draft_tokens_total", "draft_accepted_total", "decode_steps_total",
                                    "draft_seconds_total")}
    n = len(toks) - 1   # the first token comes from the prefill
    return {"tokens": toks, "gen_tokens": n, "gen_s": gen_s, "tok_s": n / gen_s if gen_s > 0 else 0.0,
            "drafted": d["draft_tokens_total"], "accepted": d["draft_accepted_total"],
            "acceptance_rate": d["draft_accepted_total"] / d["draft_tokens_total"] if d["draft_tokens_total"] else 0.0,
            "tokens_per_step": len(toks) / d["decode_steps_total"] if d["decode_steps_total"] else 0.0,
            "draft_s": d["draft_seconds_total"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpillm.bench_spec", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--gen-tokens", type=int, default=160, help="tokens generated per request (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="repetitions; ratios are medians (default: %(default)s)")
    p.add_argument("--workloads", default="grounded,free", help="comma-separated (default: %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--lookup-variant", action="append", default=[], metavar="NMAX:NMIN:K",
                   help="also run prompt lookup with these n-gram sizes and longest draft (repeatable), "
                        "e.g. 3:1:8 for the earlier defaults")
    p.add_argument("--llama-server", default=None, metavar="PATH",
                   help="also run llama.cpp's own decoding (plain, ngram-simple lookup, and -md with a GGUF "
                        "--draft-model) through this llama-server binary on the same prompts in every repetition "
                        "(benchmarks/spec_llamacpp.py)")
    p.add_argument("--gguf", default=None,
                   help="the GGUF llama-server loads (default: --model when it is a GGUF, else the bundled one)")
    p.add_argument("--llama-threads", type=int, default=None,
                   help="llama-server threads (default: ranks x --threads, the cores mpillm uses)")
    args = parse_args_bcast(p, argv)
    from mpillm.runtime.engine import Engine
    from mpillm.startup import resolve_model
    from mpillm.serving.sampling import SamplingParams
    from mpillm.serving.service import Service
    from mpillm.serving.speculative import LookupDrafter
    from mpillm.startup import open_model_drafter
    from mpillm.formats.tokenizer import load_tokenizer

    comm = MPI.COMM_WORLD
    model_dir = resolve_model(args.model, comm)
    engine = Engine(model_dir, max_seq_len=args.max_seq_len, threads=args.threads, verbose=False,
                    buffer_type=args.buffer_type, kv_type=args.kv_type, max_batch=args.batch_tokens,
                    sync=args.sync, wait=args.wait,
                    sync_table=sync_table(args))

    def rank0() -> int:
        tok = load_tokenizer(Path(model_dir))
        prompts = {"grounded": chat_ids(tok, TEXT + "\n\nRepeat the text above exactly, word for word."),
                   "free": chat_ids(tok, FREE_PROMPT)}
        prompts = {k: v for k, v in prompts.items() if k in args.workloads.split(",")}
        params = SamplingParams(max_tokens=args.gen_tokens, ignore_eos=True)
        drafters = {"plain": lambda: None,
                    "lookup": lambda: LookupDrafter(args.draft_ngram, args.draft_ngram_min, args.draft_max)}
        if args.draft_model:
            dm = open_model_drafter(args.draft_model, engine, tok, k_max=args.draft_max, threads=args.threads,
                                   kv_type=args.kv_type)

            def model_drafter():
                dm.state.clear()   # a fresh Service reuses slot indices: start the draft cache afresh
                return dm
            drafters["draft_model"] = model_drafter
        for v in args.lookup_variant:
            try:
                nmax, nmin, k = (int(x) for x in v.split(":"))
            except ValueError:
                raise ValueError(f"--lookup-variant {v!r}: expected NMAX:NMIN:K, e.g. 3:1:8") from None
            LookupDrafter(nmax, nmin, k)   # checks the values now
            drafters[f"lookup_n{nmax}_{nmin}_k{k}"] = lambda a=(nmax, nmin, k): LookupDrafter(*a)
        llama = None
        if args.llama_server:
            from benchmarks.spec_llamacpp import LlamaServers

            from mpillm.startup import bundled_gguf
            gguf = args.gguf or (args.model if args.model and str(args.model).endswith(".gguf") else str(bundled_gguf()))
            llama = LlamaServers(args.llama_server, gguf, args.llama_threads or engine.size * args.threads,
                                 args.max_seq_len, draft_gguf=args.draft_model)
        try:
            return measure(tok, prompts, params, drafters, llama)
        finally:
            if llama is not None:
                llama.close()

    def measure(tok, prompts, params, drafters, llama) -> int:
        list(Service(engine, tok).stream(tok.encode("Hello"), SamplingParams(max_tokens=4)))
        if llama is not None:   # warm each server up too
            for name in llama.urls:
                llama.complete(name, tok.encode("Hello"), 4)
        runs = []
        for rep in range(args.repeats):
            for wl, ids in prompts.items():
                load0 = os.getloadavg()[0]
                res = {}
                for mode, make in drafters.items():
                    res[mode] = timed(Service(engine, tok, drafter=make()), ids, params)
                base = res["plain"]
                for mode, r in res.items():
                    r["speedup"] = r["tok_s"] / base["tok_s"] if base["tok_s"] else 0.0
                    r["identical_to_plain"] = r["tokens"] == base["tokens"]
                if llama is not None:
                    for name in llama.urls:
                        res[name] = llama.complete(name, ids, args.gen_tokens)
                    lbase = res["llama_plain"]
                    for name in llama.urls:
                        r = res[name]
                        r["speedup"] = r["tok_s"] / lbase["tok_s"] if lbase["tok_s"] else 0.0
                        r["vs_mpillm_plain"] = r["tok_s"] / base["tok_s"] if base["tok_s"] else 0.0
                        r["identical_to_plain"] = r["tokens"] == lbase["tokens"]   # llama.cpp's own plain
                runs.append({"repeat": rep, "workload": wl, "prompt_tokens": len(ids),
                             "load_avg_1min": [load0, os.getloadavg()[0]],
                             "modes": {m: {k: v for k, v in r.items() if k != "tokens"} for m, r in res.items()}})
                print(json.dumps({"repeat": rep, "workload": wl, "load": round(load0, 1),
                                  **{m: [round(r["speedup"], 3), round(r["tok_s"], 2), r["accepted"], r["drafted"]]
                                     for m, r in res.items()}}), flush=True)
        summary = {}
        for wl in prompts:
            for mode in runs[0]["modes"]:
                rs = [r["modes"][mode] for r in runs if r["workload"] == wl]
                summary[f"{wl}/{mode}"] = {
                    "median_speedup_vs_plain": statistics.median(r["speedup"] for r in rs),
                    "median_tok_s": statistics.median(r["tok_s"] for r in rs),
                    "acceptance_rate": statistics.median(r["acceptance_rate"] for r in rs),
                    "tokens_per_step": None if mode.startswith("llama_") else
                    statistics.median(r["tokens_per_step"] for r in rs),
                    "identical_to_plain": all(r["identical_to_plain"] for r in rs)}
                if mode.startswith("llama_"):
                    summary[f"{wl}/{mode}"]["median_vs_mpillm_plain"] = statistics.median(
                        r["vs_mpillm_plain"] for r in rs)
        loads = [x for r in runs for x in r["load_avg_1min"]]
        out = {"model": str(model_dir), "ranks": engine.size, "threads_per_rank": args.threads,
               "buffer_type": args.buffer_type, "gen_tokens": args.gen_tokens, "repeats": args.repeats,
               "draft_max": args.draft_max, "draft_ngram": [args.draft_ngram_min, args.draft_ngram],
               "draft_model": args.draft_model, "load_avg_1min": {"min": min(loads), "max": max(loads),
                                                                  "median": statistics.median(loads)},
               "llama_cpp": None if llama is None else {
                   "binary": args.llama_server, "commands": llama.cmds,
                   "note": "tok/s from llama-server's timings.predicted_per_second; 'speedup' and "
                           "'identical_to_plain' of llama modes are against llama_plain"},
               "summary": summary, "runs": runs}
        print(json.dumps(out, indent=1), flush=True)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1) + "\n")
        return 0

    return engine.drive(rank0)


if __name__ == "__main__":
    run(main, "mpillm.bench_spec")
