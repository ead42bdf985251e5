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
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
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
                      constrained: bool = False) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "story", "schema": LONG_SCHEMA}}
    if model:
        body["model"] = model
    t0 = time.perf_counter()
    times, usage, error = [], None, None
    async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
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
                if (ch.get("delta") or {}).get("content"):
                    times.append(time.perf_counter())
    t1 = time.perf_counter()
    n = usage["completion_tokens"] if usage else len(times)
    return {"t0": t0, "t1": t1, "ttft": (times[0] - t0) if times else None, "itl": list(np.diff(times)),
            "tokens": n, "chunks": len(times), "error": error, "constrained": constrained}


async def level(url: str, model: str | None, clients: int, requests: int, max_tokens: int, headers: dict,
                constrained: str = "none") -> dict:
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def user(i: int) -> list[dict]:
            out = []
            for j in range(requests):
                topic = TOPICS[(i * requests + j) % len(TOPICS)]
                c = constrained == "all" or (constrained == "half" and i % 2 == 0)
                out.append(await one_request(client, url, model, f"Request {i}.{j}: write a long story about {topic}.",
                                             max_tokens, headers, c))
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


def spawn(args) -> tuple[subprocess.Popen, str, str]:
    """Start the server under test on 127.0.0.1; returns (process, url, description)."""
    port = args.port
    log = open(args.server_log, "w") if args.server_log else subprocess.DEVNULL
    if args.llama_server:
        cmd = [args.llama_server, "-m", args.model, "--host", "127.0.0.1", "--port", str(port),
               "--parallel", str(args.parallel), "--threads", str(args.threads), "--threads-batch", str(args.threads),
               "-c", str(args.ctx * args.parallel), "--cont-batching", "--no-webui"]
        what = f"llama-server --parallel {args.parallel} --threads {args.threads}"
    else:
        mpirun = Path(sys.executable).with_name("mpirun")
        cmd = [str(mpirun if mpirun.exists() else "mpirun"), "-np", str(args.spawn_np), "--bind-to", "none",
               sys.executable, "-m", "mpillm.serve", "--port", str(port), "--parallel", str(args.parallel),
               "--max-seq-len", str(args.ctx), "--threads", "1", "--max-queue", "256"]
        if args.model:
            cmd += ["--model", args.model]
        what = f"mpillm.serve -np {args.spawn_np} --parallel {args.parallel}"
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_health(url, proc, args.start_timeout)
    except BaseException:
        stop(proc)
        raise
    return proc, url, what


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running server (default: start one, see --spawn-np)")
    p.add_argument("--spawn-np", type=int, default=2, help="ranks of the mpillm server to start (default: %(default)s)")
    p.add_argument("--llama-server", default=None, help="start this llama-server binary instead (the baseline)")
    p.add_argument("--model", default=None, help="GGUF (or model directory for mpillm) the spawned server loads")
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
    p.add_argument("--constrained", choices=("none", "all", "half"), default="none",
                   help="requests with a JSON schema: none, all, or every other client (default: %(default)s)")
    args = p.parse_args(argv)
    if args.llama_server and not args.model:
        p.error("--llama-server needs --model GGUF")
    proc = None
    try:
        if args.url:
            url, what = args.url.rstrip("/"), args.url
        else:
            proc, url, what = spawn(args)
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        import httpx

        model = None
        r = httpx.get(url + "/v1/models", headers=headers, timeout=10)
        if r.status_code == 200 and r.json().get("data"):
            model = r.json()["data"][0]["id"]
        asyncio.run(level(url, model, 1, 1, 8, headers))     # warm-up
        levels = []
        for n in args.clients:
            m0 = grammar_counters(url, headers)
            res = asyncio.run(level(url, model, n, args.requests, args.max_tokens, headers, args.constrained))
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
    report = {"server": what, "model": model, "max_tokens": args.max_tokens, "requests_per_client": args.requests,
              "constrained": args.constrained, "levels": levels}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 1 if any(lv["errors"] for lv in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
