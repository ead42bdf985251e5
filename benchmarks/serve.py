"""Serving benchmark: N concurrent streaming clients against an OpenAI-compatible server.

  python -m benchmarks.serve --url http://127.0.0.1:8080                   # a running server
  python -m benchmarks.serve --spawn-np 2 --model GGUF --parallel 8       # start mpillm.serve itself
  python -m benchmarks.serve --llama-server PATH --model GGUF --parallel 8 --threads 2   # the baseline

For each client count (default 1, 4, 8, 16) every client sends --requests streaming chat
completions one after the other (distinct prompts, greedy, ``ignore_eos`` so every reply has
--max-tokens tokens), and the report gives aggregate generated tokens/s (all tokens over the
wall time of the level), time to first token and inter-token latency (p50, p99), as JSON.
Client side only: it measures what a user of the HTTP API sees.

``--constrained all`` sends every request with a JSON schema (``response_format``: an object
with one long string, so every reply still has --max-tokens tokens); ``--constrained half``
constrains every other client, and the report gives the tok/s of each kind apart: what a
constrained row costs the unconstrained rows batched with it. The server's grammar-mask time per
constrained token comes from its /metrics (mpillm_grammar_mask_seconds / mpillm_grammar_masks).

``--against LLAMA_SERVER --rounds N`` runs the comparison: each round starts mpillm's server, runs
every level, stops it, then does the same with llama-server on the same GGUF, slots and port
(--threads for llama-server, --spawn-np ranks of one thread for mpillm); the report gives each
round's figures, the ratios of a level within its round (aggregate tok/s mpillm / llama-server,
TTFT p50 mpillm / llama-server) and their medians over the rounds.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["the sea", "a mountain", "bread", "a robot", "winter", "a violin", "the moon", "a garden", "a river",
          "a city at night", "an old library", "a thunderstorm", "a train journey", "a lighthouse", "a desert",
          "a forest", "a market", "a snowflake", "a volcano", "a clock"]


# a schema every reply can fill for any --max-tokens: one string that may not end early
LONG_SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 100000}},
               "required": ["story"], "additionalProperties": False}


async def one_request(client, url: str, model: str | None, prompt: str, max_tokens: int, headers: dict,
                      constrained: bool = False, completions: bool = False) -> dict:
    """One streaming request: a chat completion, or with ``completions`` a plain text completion
    (for models without a chat template)."""
    body = {"max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}
    body.update({"prompt": prompt} if completions else {"messages": [{"role": "user", "content": prompt}]})
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "story", "schema": LONG_SCHEMA}}
    if model:
        body["model"] = model
    t0 = time.perf_counter()
    times, usage, error = [], None, None
    endpoint = "/v1/completions" if completions else "/v1/chat/completions"
    async with client.stream("POST", url + endpoint, json=body, headers=headers) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                error = obj["error"].get("message")
                break
            if obj.get("usage"):
                usage = obj["usage"]
            for ch in obj.get("choices") or []:
                if ch.get("text") if completions else (ch.get("delta") or {}).get("content"):
                    times.append(time.perf_counter())
    t1 = time.perf_counter()
    n = usage["completion_tokens"] if usage else len(times)
    return {"t0": t0, "t1": t1, "ttft": (times[0] - t0) if times else None, "itl": list(np.diff(times)),
            "tokens": n, "chunks": len(times), "error": error, "constrained": constrained}


async def level(url: str, model: str | None, clients: int, requests: int, max_tokens: int, headers: dict,
                constrained: str = "none", completions: bool = False) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def user(i: int) -> list[dict]:
            out = []
            for j in range(requests):
                topic = TOPICS[(i * requests + j) % len(TOPICS)]
                c = constrained == "all" or (constrained == "half" and i % 2 == 0)
                out.append(await one_request(client, url, model, f"Request {i}.{j}: write a long story about {topic}.",
                                             max_tokens, headers, c, completions))
            return out
        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(user(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    errors = [r["error"] for r in results if r.get("error")]
    ok = [r for r in results if not r.get("error")]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    itl = [x for r in ok for x in r["itl"]]
    tokens = sum(r["tokens"] for r in ok)

    def pct(v, q):
        return round(float(np.percentile(v, q)) * 1e3, 2) if v else None

    def per_client(rs):
        return round(float(np.mean([r["tokens"] / (r["t1"] - r["t0"]) for r in rs])), 2) if rs else None
    kinds = {}
    if constrained == "half":
        kinds = {"constrained_per_client_tok_s": per_client([r for r in ok if r["constrained"]]),
                 "unconstrained_per_client_tok_s": per_client([r for r in ok if not r["constrained"]])}
    return {"constrained": constrained, **kinds,"clients": clients, "requests": len(results), "errors": len(errors), "first_error": errors[0] if errors else None,
            "tokens": tokens, "wall_s": round(wall, 3), "aggregate_tok_s": round(tokens / wall, 2),
            "per_client_tok_s": round(float(np.mean([r["tokens"] / (r["t1"] - r["t0"]) for r in ok])), 2) if ok else None,
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99), "itl_ms_p50": pct(itl, 50),
            "itl_ms_p99": pct(itl, 99)}


def grammar_counters(url: str, headers: dict) -> tuple[float, float] | None:
    """(masks, seconds) from an mpillm server's /metrics; None from other servers."""
    import httpx

    try:
        text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    except httpx.HTTPError:
        return None
    vals = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("mpillm_grammar_mask"))
    try:
        return float(vals["mpillm_grammar_masks_total"]), float(vals["mpillm_grammar_mask_seconds_total"])
    except (KeyError, ValueError):
        return None


def wait_health(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready within {timeout} s")


def spawn(args, llama_server: str | None = None) -> tuple[subprocess.Popen, str, str]:
    """Start the server under test on 127.0.0.1 (llama-server when given, else mpillm's); returns
    (process, url, description)."""
    port = args.port
    log = open(args.server_log, "a") if args.server_log else subprocess.DEVNULL
    if llama_server:
        cmd = [llama_server, "-m", args.model, "--host", "127.0.0.1", "--port", str(port),
               "--parallel", str(args.parallel), "--threads", str(args.threads), "--threads-batch", str(args.threads),
               "-c", str(args.ctx * args.parallel), "--cont-batching", "--no-webui"]
        what = f"llama-server --parallel {args.parallel} --threads {args.threads}"
    else:
        mpirun = Path(sys.executable).with_name("mpirun")
        cmd = [str(mpirun if mpirun.exists() else "mpirun"), "-np", str(args.spawn_np), "--bind-to", "none",
               sys.executable, "-m", "mpillm.serve", "--port", str(port), "--parallel", str(args.parallel),
               "--max-seq-len", str(args.ctx), "--threads", "1", "--max-queue", "256"]
        if args.mpillm_model or args.model:
            cmd += ["--model", args.mpillm_model or args.model]
        what = f"mpillm.serve -np {args.spawn_np} --parallel {args.parallel}"
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    port_free(port)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_health(url, proc, args.start_timeout)
    except BaseException:
        stop(proc)
        raise
    return proc, url, what


def port_free(port: int, timeout: float = 20.0) -> None:
    """Wait until nothing listens on 127.0.0.1:port (the previous server of an --against round may
    still be closing its socket: llama-server then exited with 1, unable to bind)."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return
        time.sleep(0.25)
    raise RuntimeError(f"port {port} is still in use after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def run_levels(args, llama_server: str | None) -> dict:
    """Start (unless --url) the server under test, run every level, stop it; the level reports."""
    proc = None
    levels = []
    try:
        if args.url:
            url, what = args.url.rstrip("/"), args.url
        else:
            proc, url, what = spawn(args, llama_server)
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        import httpx

        model = None
        r = httpx.get(url + "/v1/models", headers=headers, timeout=10)
        if r.status_code == 200 and r.json().get("data"):
            model = r.json()["data"][0]["id"]
        asyncio.run(level(url, model, 1, 1, 8, headers, completions=args.completions))     # warm-up
        for n in args.clients:
            m0 = grammar_counters(url, headers)
            res = asyncio.run(level(url, model, n, args.requests, args.max_tokens, headers, args.constrained,
                                    args.completions))
            m1 = grammar_counters(url, headers)
            if m1 and m0 and m1[0] > m0[0]:
                res["mask_us_per_token"] = round((m1[1] - m0[1]) / (m1[0] - m0[0]) * 1e6, 1)
            levels.append(res)
            print(f"{what}: {n:3d} clients  {res['aggregate_tok_s']:8.1f} tok/s  TTFT p50 {res['ttft_ms_p50']} ms "
                  f"p99 {res['ttft_ms_p99']} ms  ITL p50 {res['itl_ms_p50']} ms p99 {res['itl_ms_p99']} ms"
                  f"{'  errors ' + str(res['errors']) if res['errors'] else ''}", file=sys.stderr, flush=True)
    finally:
        if proc is not None:
            stop(proc)
    return {"server": what, "model": model, "max_tokens": args.max_tokens, "requests_per_client": args.requests,
            "constrained": args.constrained, "levels": levels}


def compare_rounds(rounds: list[dict]) -> dict:
    """Per level: each round's mpillm / llama-server ratios of aggregate tok/s and TTFT p50, and the
    medians over rounds (ratios are taken within a round only: the machine's load drifts)."""
    out = {}
    for i, lv in enumerate(rounds[0]["mpillm"]["levels"]):
        tok, ttft = [], []
        for r in rounds:
            a, b = r["mpillm"]["levels"][i], r["llama_server"]["levels"][i]
            tok.append(a["aggregate_tok_s"] / b["aggregate_tok_s"])
            if a["ttft_ms_p50"] and b["ttft_ms_p50"]:
                ttft.append(a["ttft_ms_p50"] / b["ttft_ms_p50"])
        out[str(lv["clients"])] = {"tok_s_ratio_rounds": [round(x, 3) for x in tok],
                                   "tok_s_ratio_median": round(float(np.median(tok)), 3),
                                   "ttft_p50_ratio_rounds": [round(x, 3) for x in ttft],
                                   "ttft_p50_ratio_median": round(float(np.median(ttft)), 3) if ttft else None}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running server (default: start one, see --spawn-np)")
    p.add_argument("--spawn-np", type=int, default=2, help="ranks of the mpillm server to start (default: %(default)s)")
    p.add_argument("--llama-server", default=None, help="start this llama-server binary instead (the baseline)")
    p.add_argument("--against", default=None, metavar="LLAMA_SERVER",
                   help="compare: alternate mpillm's server and this llama-server binary, --rounds times")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the --against comparison (default: %(default)s)")
    p.add_argument("--model", default=None, help="GGUF (or model directory for mpillm) the spawned server loads")
    p.add_argument("--mpillm-model", default=None,
                   help="with --against: the model mpillm loads, when not --model (e.g. that GGUF converted)")
    p.add_argument("--parallel", type=int, default=8, help="slots of the spawned server (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="llama-server threads (default: %(default)s)")
    p.add_argument("--ctx", type=int, default=1024, help="context per slot (default: %(default)s)")
    p.add_argument("--port", type=int, default=18600, help="port of the spawned server (default: %(default)s)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--requests", type=int, default=2, help="requests per client per level (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per reply (default: %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("MPILLM_API_KEY"))
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--server-log", default=None, help="write the spawned server's output here")
    p.add_argument("--json", default=None, help="also write the report here")
    p.add_argument("--completions", action="store_true",
                   help="plain text completions (/v1/completions) instead of chat: models without a chat template")
    p.add_argument("--constrained", choices=("none", "all", "half"), default="none",
                   help="requests with a JSON schema: none, all, or every other client (default: %(default)s)")
    args = p.parse_args(argv)
    if (args.llama_server or args.against) and not args.model:
        p.error("--llama-server / --against need --model GGUF")
    if args.completions and args.constrained != "none":
        p.error("--constrained sends a response_format, which chat completions take: not with --completions")
    if args.against and (args.url or args.llama_server):
        p.error("--against starts both servers itself: no --url or --llama-server with it")
    if args.against:
        rounds = []
        for i in range(args.rounds):
            rd = {"round": i, "load_avg": os.getloadavg()}
            rd["mpillm"] = run_levels(args, None)
            rd["llama_server"] = run_levels(args, args.against)
            rd["load_avg_end"] = os.getloadavg()
            rounds.append(rd)
        report = {"model": args.model, "mpillm_model": args.mpillm_model or args.model, "parallel": args.parallel, "mpillm_ranks": args.spawn_np,
                  "llama_server_threads": args.threads, "max_tokens": args.max_tokens,
                  "requests_per_client": args.requests, "constrained": args.constrained,
                  "ratios": compare_rounds(rounds), "rounds": rounds}
        levels = [lv for r in rounds for k in ("mpillm", "llama_server") for lv in r[k]["levels"]]
    else:
        report = run_levels(args, args.llama_server)
        levels = report["levels"]
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 1 if any(lv["errors"] for lv in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
