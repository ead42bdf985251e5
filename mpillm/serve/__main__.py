"""Serve a model over HTTP with the OpenAI API, from every rank of an MPI job.

  mpirun -np 4 --hostfile hostfile python -m mpillm.serve --model DIR --port 8080

Every rank loads its shard and runs the engine. Rank 0 also runs the HTTP server
(Starlette on uvicorn, in a thread) and the engine loop (``Service.run``, in the main
thread: every MPI call happens there). The other ranks follow rank 0's steps.
The server binds 127.0.0.1 unless --host says otherwise; /health answers 503 until the
model is loaded.

When the job is being torn down (mpirun sends SIGTERM after a rank died, or the job
was stopped), rank 0 ends every open request with an error that says what was lost,
and exits non-zero.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from mpi4py import MPI

from mpillm.runtime.errors import FatalError, agree, run
from mpillm.options import add_model_args, open_engine, parse_args_bcast


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mpillm.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    g = p.add_argument_group("HTTP")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s; 0.0.0.0 listens on every interface)")
    g.add_argument("--port", type=int, default=8080, help="port (default: %(default)s; 0 picks a free one)")
    g.add_argument("--served-model-name", default=None,
                   help="the model id clients use (default: the model file or directory name)")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (visible in the process list: prefer --api-key-file "
                        "or the MPILLM_API_KEY environment variable)")
    g.add_argument("--api-key-file", default=None, help="read the API key from this file")
    g.add_argument("--cors-origin", action="append", default=[],
                   help="allow browser requests from this origin (repeat, or comma-separated; default: none)")
    g.add_argument("--max-body-bytes", type=int, default=4 << 20,
                   help="largest request body accepted, larger ones get 413 (default: %(default)s)")
    g.add_argument("--log-prompts", action="store_true",
                   help="log prompts and completions (off by default: only ids, token counts and timings)")
    g.add_argument("--access-log", action="store_true", help="log every HTTP request line (method, path, status)")
    g.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(parallel=4)   # slots: requests batched together in each engine step
    g = p.add_argument_group("load")
    g.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a slot before new ones get 503 + Retry-After (default: %(default)s)")
    g.add_argument("--queue-timeout", type=float, default=60.0,
                   help="seconds a request may wait for its first token (queue + prefill) before it gets 503; "
                        "0 = no limit (default: %(default)s)")
    g.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may run in all before it is cancelled (504, or an error event in a "
                        "stream); 0 = no limit (default: %(default)s)")
    return p


def read_api_key(args) -> str | None:
    given = [s for s in (args.api_key, args.api_key_file) if s]
    env = os.environ.get("MPILLM_API_KEY") or None
    if len(given) > 1:
        raise ValueError("give one of --api-key or --api-key-file, not both")
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--api-key-file {args.api_key_file}: {e}") from None
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file} is empty")
        return key
    return args.api_key or env


def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket before loading (so a busy port fails at once, every rank exiting)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: {e}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(512)
    sock.set_inheritable(True)
    return sock


def model_name(args, model_dir: Path | None) -> str:
    if args.served_model_name:
        return args.served_model_name
    if args.model is None:
        from mpillm.startup import bundled_gguf

        return bundled_gguf().stem
    p = Path(args.model)
    return p.stem if p.is_file() else p.resolve().name


class HTTPThread:
    """uvicorn in a daemon thread on an already bound socket."""

    def __init__(self, app, sock: socket.socket, args):
        import uvicorn

        self.sock = sock
        cfg = uvicorn.Config(app, log_level=args.log_level, access_log=args.access_log, lifespan="on",
                             timeout_keep_alive=5, server_header=False, proxy_headers=False,
                             log_config=None, use_colors=False)   # our logging.basicConfig formats it
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self._run, name="http", daemon=True)
        self.stopped = threading.Event()

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.stopped.set()

    def start(self) -> None:
        self.thread.start()


class Teardown:
    """Rank 0's reaction to SIGTERM / SIGINT (mpirun tears the job down when a rank dies).

    The main thread may be blocked inside an MPI collective waiting for a dead rank, where no
    Python signal handler runs; so the C-level handler only writes the signal number to a pipe
    (``signal.set_wakeup_fd``) and this thread does the work: find which ranks are gone, end
    every open request with an error event, give the HTTP thread a moment to send them, exit."""

    def __init__(self, state, peers: list[tuple[str, int]], log: logging.Logger):
        self.state, self.peers, self.log = state, peers, log
        self.service = None
        r, w = os.pipe()
        os.set_blocking(w, False)
        self.r = r
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, lambda *_: None)   # the work happens in the thread below
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        threading.Thread(target=self._wait, name="teardown", daemon=True).start()

    def lost(self) -> list[str]:
        host = MPI.Get_processor_name()
        gone = []
        for rank, (h, pid) in enumerate(self.peers):
            if rank == 0 or h != host:
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    alive = f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
            except OSError:
                alive = False
            if not alive:
                gone.append(f"rank {rank} (pid {pid} on {h})")
        return gone

    def _wait(self) -> None:
        while True:
            data = os.read(self.r, 1)
            if data and data[0] in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                break
        signum = data[0]
        gone = self.lost()
        name = signal.Signals(signum).name
        if gone:
            msg = f"the MPI job is ending: lost {', '.join(gone)}"
        elif len(self.peers) > 1:
            msg = (f"the MPI job is ending ({name} from mpirun: a rank on another host was lost, "
                   "or the job was stopped)")
        else:
            msg = f"the server is shutting down ({name})"
        print(f"mpillm.serve: {msg}", file=sys.stderr, flush=True)
        self.state.fail(msg, wait=1.0)
        os._exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args_bcast(parser(), argv)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    log = logging.getLogger("mpillm.serve")
    state = http = None
    err = None
    if rank == 0:
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            stream=sys.stderr)
        try:
            from mpillm.serving.http.app import ServerConfig, State, create_app

            for v, name in ((args.parallel, "--parallel"), (args.batch_tokens, "--batch-tokens"),
                            (args.max_queue, "--max-queue"), (args.max_body_bytes, "--max-body-bytes")):
                if v < 1:
                    raise ValueError(f"{name} must be >= 1, got {v}")
            if args.queue_timeout < 0 or args.request_timeout < 0:
                raise ValueError("--queue-timeout and --request-timeout must be >= 0")
            origins = [o.strip() for s in args.cors_origin for o in s.split(",") if o.strip()]
            config = ServerConfig(model_name=model_name(args, None), api_key=read_api_key(args), cors_origins=origins,
                                  max_body_bytes=args.max_body_bytes, queue_timeout=args.queue_timeout or None,
                                  request_timeout=args.request_timeout or None, log_prompts=args.log_prompts)
            sock = bind(args.host, args.port)
            state = State()
            http = HTTPThread(create_app(config, state), sock, args)
            http.start()
            host, port = sock.getsockname()[:2]
            url_host = f"[{host}]" if ":" in host else host
            print(f"mpillm.serve: listening on http://{url_host}:{port} (loading {config.model_name} on {size} "
                  f"rank(s); /health answers 503 until ready)", flush=True)
        except ValueError as e:
            err = str(e)
    agree(comm, err)

    from mpillm.startup import make_drafter, prepare_model
    from mpillm.formats.tokenizer import load_tokenizer

    model_dir = prepare_model(args, comm)   # --verify, kernel warm-up
    engine = open_engine(args, model_dir, verbose=True)
    peers = comm.gather((MPI.Get_processor_name(), os.getpid()), root=0)
    if rank != 0:
        return engine.serve()

    from mpillm.serving.service import Service

    teardown = Teardown(state, peers, log)
    tok = load_tokenizer(Path(model_dir))
    service = Service(engine, tok, max_queue=args.max_queue, drafter=make_drafter(args, engine, tok))
    state.ready(service, tok, size)
    teardown.service = service
    print(f"mpillm.serve: ready: {size} rank(s), {args.parallel} slot(s) of {service.context_size} tokens, "
          f"start-up {engine.startup_s:.1f} s", flush=True)
    stop = threading.Event()
    threading.Thread(target=lambda: (http.stopped.wait(), stop.set()), name="http-watch", daemon=True).start()

    def loop() -> int:
        try:
            service.run(stop)
        except BaseException as e:
            msg = f"the engine failed on rank 0: {type(e).__name__}: {e}"
            state.fail(msg, wait=1.0)
            raise
        if http.stopped.is_set():
            raise FatalError("the HTTP server stopped")
        return 0

    return engine.drive(loop)


if __name__ == "__main__":
    run(main, "mpillm.serve")
