"""Runs inside the benchmark venv (scripts/setup_llamacpp.sh), never in mpillm's own.

Imports only the standard library, numpy and llama_cpp (llama-cpp-python's ctypes
bindings). benchmarks.baseline starts it as a subprocess:

    python _llamacpp_worker.py bench GGUF --threads N [--n-prompt 64 --n-gen 64 --repeats 3]
    python _llamacpp_worker.py quantize IN.gguf OUT.gguf --ftype q4_0 [--pure] [--threads N]
    python _llamacpp_worker.py perplexity GGUF TOKENS.json [--threads N]

and reads one JSON object from the last line of stdout. llama.cpp's own log goes
to stderr.

Timing follows llama-bench: the model is loaded and one warm-up prompt and one
warm-up token are decoded before anything is timed. A prompt sample is a single
llama_decode of n_prompt tokens in one batch on an empty KV cache (pp64);
a generation sample is n_gen single-token llama_decode calls on an empty KV cache,
each followed by a greedy argmax over the logits whose result is the next token
(tg64). Model load, context creation and the warm-up are outside every sample.
"""

import argparse
import ctypes
import json
import os
import random
import statistics
import sys
import time

import numpy as np
import llama_cpp as L


def _fn(*names):
    """The first binding that exists: llama.cpp renamed several of its functions."""
    for name in names:
        f = getattr(L, name, None)
        if f is not None:
            return f
    raise AttributeError("llama_cpp has none of " + ", ".join(names))


_QUIET_LOG = None


def _silence():
    """Keep llama.cpp's load-time chatter off the terminal unless asked for."""
    global _QUIET_LOG
    if os.environ.get("MPILLM_LLAMACPP_VERBOSE"):
        return

    @L.llama_log_callback
    def _drop(level, text, user_data):  # noqa: ARG001
        pass

    _QUIET_LOG = _drop  # keep a reference: llama.cpp holds the pointer
    L.llama_log_set(_QUIET_LOG, ctypes.c_void_p(0))


class Engine:
    def __init__(self, path, threads, n_ctx, n_batch):
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        self.model = _fn("llama_model_load_from_file", "llama_load_model_from_file")(
            path.encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cparams = L.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        self.ctx = _fn("llama_init_from_model", "llama_new_context_with_model")(
            self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = _fn("llama_vocab_n_tokens", "llama_n_vocab")(vocab)
        self.batch = L.llama_batch_init(n_batch, 0, 1)

    def clear(self):
        if hasattr(L, "llama_memory_clear"):
            L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        else:
            _fn("llama_kv_self_clear", "llama_kv_cache_clear")(self.ctx)

    def decode(self, tokens, pos0, want_last_logits=True):
        b = self.batch
        n = len(tokens)
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 0
        b.logits[n - 1] = 1 if want_last_logits else 0
        b.n_tokens = n
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def argmax_last(self):
        ptr = L.llama_get_logits_ith(self.ctx, -1)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def close(self):
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        _fn("llama_model_free", "llama_free_model")(self.model)


def bench(args):
    _silence()
    eng = Engine(args.gguf, args.threads, n_ctx=max(256, args.n_prompt + args.n_gen + 8),
                 n_batch=max(args.n_prompt, 1))
    rng = random.Random(1234)
    prompt = [rng.randrange(eng.n_vocab) for _ in range(args.n_prompt)]
    first = rng.randrange(eng.n_vocab)

    def run_prompt():
        eng.clear()
        t0 = time.perf_counter()
        eng.decode(prompt, 0)
        L.llama_synchronize(eng.ctx)
        return time.perf_counter() - t0

    def run_gen(n):
        # generation after the prompt, as mpillm.bench measures it (positions n_prompt..):
        # at long prompts attention over the cache is part of the cost of a token
        eng.clear()
        eng.decode(prompt, 0)
        L.llama_synchronize(eng.ctx)
        tok = first
        out = []
        t0 = time.perf_counter()
        for p in range(args.n_prompt, args.n_prompt + n):
            eng.decode([tok], p)
            tok = eng.argmax_last()  # synchronizes: it reads the logits
            out.append(tok)
        return time.perf_counter() - t0, out

    run_prompt()  # warm-up, like llama-bench (graph build, page cache, thread pool)
    run_gen(2)
    pp, tg = [], []
    generated = []
    for _ in range(args.repeats):
        pp.append(args.n_prompt / run_prompt())
        dt, generated = run_gen(args.n_gen)
        tg.append(args.n_gen / dt)
    eng.close()
    return {
        "prompt_tok_s": max(pp),
        "generate_tok_s": max(tg),
        "prompt_tok_s_median": statistics.median(pp),
        "generate_tok_s_median": statistics.median(tg),
        "prompt_samples": pp,
        "generate_samples": tg,
        "stat": "best",
        "threads": args.threads,
        "n_prompt": args.n_prompt,
        "n_gen": args.n_gen,
        "repeats": args.repeats,
        "n_vocab": eng.n_vocab,
        "generated_head": generated[:8],
        "llama_cpp_python": L.__version__,
        "system_info": L.llama_print_system_info().decode(errors="replace").strip(),
    }


FTYPES = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
}


def quantize(args):
    _silence()
    L.llama_backend_init()
    params = L.llama_model_quantize_default_params()
    params.ftype = getattr(L, FTYPES[args.ftype])
    params.allow_requantize = True  # the input is already quantized (Q4_1)
    params.pure = bool(args.pure)
    params.nthread = args.threads
    t0 = time.perf_counter()
    rc = L.llama_model_quantize(args.src.encode(), args.dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    return {"dst": args.dst, "ftype": args.ftype, "pure": bool(args.pure),
            "seconds": time.perf_counter() - t0, "llama_cpp_python": L.__version__}


def perplexity(args):
    """llama-perplexity's method on given token chunks: score the second half of each chunk."""
    chunks = json.load(open(args.tokens))
    ctx = len(chunks[0])
    eng = Engine(args.gguf, args.threads, ctx, ctx)
    first = ctx // 2
    nll = []
    for c in chunks:
        eng.clear()
        b = eng.batch
        for i, t in enumerate(c):
            b.token[i] = t
            b.pos[i] = i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if i >= first else 0
        b.n_tokens = ctx
        if L.llama_decode(eng.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        for j in range(first, ctx - 1):
            lg = np.ctypeslib.as_array(L.llama_get_logits_ith(eng.ctx, j), shape=(eng.n_vocab,)).astype(np.float64)
            mx = lg.max()
            nll.append(mx + np.log(np.exp(lg - mx).sum()) - lg[c[j + 1]])
    eng.close()
    return {"perplexity": float(np.exp(np.mean(nll))), "scored_tokens": len(nll), "chunks": len(chunks),
            "ctx": ctx, "llama_cpp_python": L.__version__}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench")
    b.add_argument("gguf")
    b.add_argument("--threads", type=int, required=True)
    b.add_argument("--n-prompt", type=int, default=64)
    b.add_argument("--n-gen", type=int, default=64)
    b.add_argument("--repeats", type=int, default=3)
    q = sub.add_parser("quantize")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("--ftype", choices=sorted(FTYPES), default="q4_0")
    q.add_argument("--pure", action="store_true")
    q.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    pp = sub.add_parser("perplexity")
    pp.add_argument("gguf")
    pp.add_argument("tokens", help="JSON list of equal-length token chunks")
    pp.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    result = {"bench": bench, "quantize": quantize, "perplexity": perplexity}[args.cmd](args)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
