"""The distributed engine: open shards, print the plan, run forward steps in lock-step.

Rank 0 drives. Each step is a plan (mpillm.runtime.steps; mpillm.serving.scheduler makes it):
for every row of the batch a token id, its position and its sequence's KV slot, and which rows
need output (the greedy token, or the row's full logits for sampling). Rank 0 broadcasts the
plan as two int64 buffers (a header and the packed arrays), every rank runs the same forward on
its shard (model.py: two syncs per layer, mpillm.runtime.collectives), and rank 0 gets back what
sampling needs: the distributed argmax of greedy rows (16 bytes per rank and row) and the
gathered logits of sampling rows only. The other ranks sit in ``serve()`` until rank 0
broadcasts STOP.
"""
from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from mpillm import kernels
from mpillm.formats import format as fmt
from mpillm.formats.config import ModelConfig
from mpillm.formats.partition import plan, share_notes, valid_world_sizes
from mpillm.runtime import collectives, exchange, ops, steps, warm
from mpillm.runtime.errors import FatalError, agree
from mpillm.runtime.memory import rank_budget
from mpillm.runtime.mpisession import local_ranks
from mpillm.runtime.model import Transformer, repack_decision
from mpillm.runtime.steps import CMD_SCORE, CMD_STEP, CMD_STOP, OUT_GREEDY, OUT_LOGITS


def _summarize_notes(notes: list[str]) -> list[tuple[str, int]]:
    """A shard's converter notes with the layer index folded: [(note with layers/*/, count)]."""
    out: dict[str, int] = {}
    for n in notes:
        k = re.sub(r"layers/\d+/", "layers/*/", n)
        out[k] = out.get(k, 0) + 1
    return list(out.items())


def mla_plan(cfg: ModelConfig) -> str:
    """The plan line's words for deepseek2: the attention, what each rank caches, the routing."""
    q = f"q_lora {cfg.q_lora_rank}" if cfg.q_lora_rank else "plain q"
    w = cfg.kv_values_per_token(0)
    out = (f", MLA ({q}, kv_lora {cfg.kv_lora_rank}, rope {cfg.qk_rope_dim}, nope {cfg.qk_nope_dim}, v {cfg.v_head_dim}; "
           f"absorbed), latent KV cache replicated on every rank: {w} values per token and layer "
           f"({cfg.kv_lora_rank} latent + {cfg.qk_rope_dim} RoPE key, {cfg.n_layers * w} per token)")
    if cfg.n_dense_layers:
        out += f", {cfg.n_dense_layers} dense layer(s)"
    if cfg.is_moe:
        groups = (f" from {cfg.n_groups_used} of {cfg.n_expert_groups} groups" if cfg.n_expert_groups > 1 else "")
        out += (f", sigmoid router{' + correction bias' if cfg.router_bias else ''}{groups} x{cfg.router_scale:g}"
                f", {cfg.n_shared_experts} shared expert(s)")
    return out


class Engine:
    """One rank's share of the model and the step protocol. ``n_slots`` sequences of up to
    ``max_seq_len`` tokens each have their own KV cache slot; a step carries up to
    ``max_batch`` rows."""

    def __init__(self, model_dir: Path, max_seq_len: int = 2048, threads: int = 1, max_batch: int = 64,
                 buffer_type: str = "f32", kv_type: str = "f16",
                 comm: MPI.Comm = MPI.COMM_WORLD, verbose: bool = True, n_slots: int = 1,
                 compile_turn: bool = True, sync: str = "auto", wait: str = "auto", sync_table: dict | None = None,
                 repack: bool = True):
        """repack: True repacks what fits in this rank's free memory (model.repack_decision); False keeps
        the stored layout (the warm-up's tiny twin of a model that will not be repacked)."""
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.buffer_type, self.sync_algorithm, self.sync_table = buffer_type, sync, sync_table
        t0 = time.perf_counter()
        err, shard, cfg = None, None, None
        try:
            manifest = fmt.read_manifest(model_dir)
            cfg = ModelConfig.from_dict(manifest["config"])
            if self.size not in manifest["world_sizes"]:
                try:
                    plan(cfg, self.size)
                    hint = f"; convert it with --world-size {self.size}"
                except ValueError as e:
                    hint = f"; {e}"
                raise ValueError(f"{model_dir} was converted for world sizes {manifest['world_sizes']}, "
                                 f"this job has {self.size} ranks{hint} (possible: {valid_world_sizes(cfg)})")
            if max_seq_len < 2 or max_seq_len > cfg.context_length:
                raise ValueError(f"--ctx-size {max_seq_len} must be in [2, {cfg.context_length}] "
                                 f"(the model's context length)")
            self.waiter = collectives.Waiter(wait)
            exchange.choose_algorithm(sync, self.size, 0)   # a bad --sync is every rank's error
            if n_slots < 1 or max_batch < 1:
                raise ValueError(f"--parallel ({n_slots}) and --batch-tokens ({max_batch}) must be >= 1")
            shard = fmt.Shard(Path(model_dir) / fmt.shard_relpath(self.size, self.rank), self.size, self.rank)
            if shard.config.to_dict() != cfg.to_dict():
                raise ValueError(f"{shard.path} belongs to a different model than {model_dir}/manifest.json")
            self.split = fmt.split_of(manifest, self.size)   # uneven split (convert --split/--cluster) or None
            self.slices = plan(cfg, self.size, self.split and self.split["weights"])
            if dataclasses.asdict(self.slices[self.rank]) != {k: tuple(v) if isinstance(v, list) else v
                                                              for k, v in shard.slice.items()}:
                raise ValueError(f"{shard.path} holds a different split than {model_dir}/manifest.json records; "
                                 f"reconvert this world size")
        except ValueError as e:
            err = str(e)
        agree(comm, err)
        self.cfg, self.shard = cfg, shard
        self.max_seq_len, self.max_batch, self.n_slots = max_seq_len, max_batch, n_slots
        kv_heads = shard.slice["kv_heads"][1] - shard.slice["kv_heads"][0]
        kv_per_token = cfg.n_layers * cfg.kv_values_per_token(kv_heads) * (2 if kv_type == "f16" else 4)
        kv_bytes = kv_per_token * max_seq_len * n_slots
        sizes = comm.gather((shard.nbytes, kv_bytes, MPI.Get_processor_name(), shard.notes), root=0)
        self.hosts = len(set(comm.allgather(MPI.Get_processor_name())))   # the sync choice depends on it
        self.waiter.agree(comm)   # collective: the same form of every collective on every rank
        # the matmul weights' layout (and the plan's words)
        self.repack = repack_decision(shard, buffer_type) if repack else (False, "")
        if self.rank == 0 and verbose:
            self.print_plan(sizes, threads)
        agree(comm, kv_memory_error(kv_per_token, n_slots, max_seq_len))
        err = None
        try:
            if compile_turn:   # one rank per node compiles, the others wait (False: the caller holds the turn)
                warm.ensure_shard(shard, kv_type, buffer_type, compile_tiny, repack=self.repack[0])
            kernels.set_threads(threads)
            kernels.warmup()
            self.model = Transformer(shard, comm, max_seq_len, max_batch, buffer_type, kv_type, n_slots,
                                     sync, self.waiter, sync_table, self.hosts, self.repack)
        except (ValueError, MemoryError) as e:
            err = f"{type(e).__name__}: {e}"
        agree(comm, err)
        self.vocab_counts = np.array([p.vocab[1] - p.vocab[0] for p in self.slices], np.int64)
        B, V = max_batch, cfg.vocab_size
        # one step on the wire (mpillm.runtime.steps): the header [command, T rows, R output rows,
        # rows of kind LOGITS], then the plan: tokens (T), positions (T), slots (T), output rows (R),
        # and per output row its OUT_* kind (STEP) or target (SCORE)
        self.msg = np.zeros(steps.HEADER_LEN + steps.plan_len(B, B), np.int64)
        self.header, self.plan = self.msg[:steps.HEADER_LEN], self.msg[steps.HEADER_LEN:]
        self.first = steps.first_len(B)               # words of the first broadcast of a step
        self.best = np.zeros((B, 2), np.float64)      # (R, 2) this rank's (max logit, global id) per output row
        self.bests = np.zeros(self.size * B * 2, np.float64) if self.rank == 0 else None  # (ranks, R, 2)
        self.send = np.zeros(B * int(self.vocab_counts.max()), np.float32)  # (R_logits, vocab_pp) packed rows
        self.nll_parts = np.zeros((B, 3), np.float64)  # this rank's (max, lse - max, target logit)
        self.nll_all = np.zeros(self.size * B * 3, np.float64) if self.rank == 0 else None  # (ranks, R, 3)
        self.full_logits = np.zeros((B, V), np.float32) if self.rank == 0 else None   # (R_logits, vocab)
        self.gather_buf = np.zeros(B * V, np.float32) if self.rank == 0 else None
        # bytes the largest non-root vocabulary slice sends to rank 0 per sampled token
        self.logits_bytes_per_token = int(self.vocab_counts[1:].max()) * 4 if self.size > 1 else 0
        comm.Barrier()
        self.startup_s = time.perf_counter() - t0

    def print_plan(self, sizes, threads: int) -> None:
        cfg = self.cfg
        extra = f", {cfg.n_experts} experts top-{cfg.n_experts_used}" if cfg.is_moe else ""
        if cfg.sliding_layers:
            extra += f", window {cfg.sliding_window} on {len(cfg.sliding_layers)} layers"
        extra += ", attention sinks" if cfg.attn_sinks else ""
        extra += f", YaRN x{cfg.rope_factor:g}" if cfg.rope_scaling == "yarn" else ""
        if cfg.is_mla:
            extra += mla_plan(cfg)
        kv = "" if cfg.is_mla else f" / {cfg.n_kv_heads} KV heads"
        print(f"mpillm plan: {cfg.arch}, {cfg.n_layers} layers, dim {cfg.dim}, {cfg.n_heads} heads"
              f"{kv}{extra}, vocab {cfg.vocab_size}; world size {self.size}, "
              f"{threads} thread(s) per rank, {self.n_slots} slot(s) x {self.max_seq_len} tokens, "
              f"{self.max_batch} rows per step, kernels {kernels.describe()}{self.repack[1]}", flush=True)
        if self.size > 1:
            nbytes = exchange.message_bytes(self.buffer_type, 1, cfg.dim)
            algo = exchange.choose_algorithm(self.sync_algorithm, self.size, nbytes, self.sync_table, self.hosts)
            how = {"allreduce": "MPI_Allreduce" if self.buffer_type in ("f32", "f64") else "one MPI_Allgather",
                   "p2p": f"one round of {self.size - 1} sends + receives per rank"}[algo]
            measured = ", measured choices" if self.sync_table else ""
            print(f"  sync: {2 * cfg.n_layers + 1} per token, {self.buffer_type} {how}, {nbytes} B per rank "
                  f"(--sync {self.sync_algorithm}{measured}, {self.hosts} host(s)); waiting ranks {self.waiter.describe()} "
                  f"(--wait); a decode step of up to {steps.INLINE_WORDS // 5} rows is one broadcast", flush=True)
        shares = share_notes(cfg, self.slices, self.split, [s[0] for s in sizes])
        for rs, (wb, kb, host, notes), share in zip(self.slices, sizes, shares):
            ffn = rs.expert_ffn if cfg.is_moe else rs.ffn
            kvh = "latent KV replicated" if cfg.is_mla else f"KV heads [{rs.kv_heads[0]},{rs.kv_heads[1]})"
            if cfg.is_mla and cfg.n_dense_layers and cfg.is_moe:
                kvh += f" dense FFN [{rs.ffn[0]},{rs.ffn[1]})"
            print(f"  rank {rs.tp_rank} on {host}: heads [{rs.heads[0]},{rs.heads[1]}) "
                  f"{kvh} {'expert ' if cfg.is_moe else ''}FFN "
                  f"[{ffn[0]},{ffn[1]}) vocab [{rs.vocab[0]},{rs.vocab[1]}) | weights {wb / 2**20:.1f} MiB + "
                  f"KV cache {kb / 2**20:.1f} MiB = {(wb + kb) / 2**20:.1f} MiB | {share}", flush=True)
            for note, n in _summarize_notes(notes):  # lossless re-encodings the converter made
                print(f"    {note}{f' ({n} layers)' if n > 1 else ''}", flush=True)

    # ---- every rank: one step of the plan in self.plan ----------------------------------------
    def _execute(self, cmd: int, T: int, R: int, n_logits: int):
        tokens, positions, slots, out_rows, per_row = steps.unpack(self.plan, T, R)
        local = self.model.forward(tokens, positions, slots, out_rows)
        if R == 0:
            return None
        if cmd == CMD_SCORE:
            return self._nll(local, per_row, R)
        ids = self._argmax(local, R) if n_logits < R else None
        logits = self._gather_logits(local, per_row, R, n_logits) if n_logits else None
        return ids, logits

    def _timed(self, fn, ifn, *args) -> None:
        """A collective of the engine's, timed into the comm stats; ``ifn`` its nonblocking form,
        used when waiting ranks block (--wait)."""
        t0 = time.perf_counter()
        if self.waiter.nonblocking:
            self.waiter.wait(ifn(*args))
        else:
            fn(*args)
        self.model.stats.seconds += time.perf_counter() - t0

    def _argmax(self, local: np.ndarray, R: int) -> np.ndarray | None:
        """Greedy tokens without gathering logits: each rank sends (max, id) of its vocabulary
        slice per output row; rank 0 keeps the best (ties: the lowest id, as np.argmax)."""
        best = self.best[:R]
        ops.argmax_rows(local, self.model.slice.vocab[0], best)
        if self.size == 1:
            return best[:, 1].astype(np.int64)
        allb = self.bests[:self.size * R * 2] if self.rank == 0 else None
        self._timed(self.comm.Gather, self.comm.Igather, best, allb, 0)
        if self.rank != 0:
            return None
        allb = allb.reshape(self.size, R, 2)
        return allb[np.argmax(allb[:, :, 0], axis=0), np.arange(R), 1].astype(np.int64)

    def _gather_logits(self, local: np.ndarray, kinds: np.ndarray, R: int, n: int) -> np.ndarray | None:
        """The full logits of the rows that sample: (n, vocab) on rank 0."""
        if n == R:
            rows = local
        else:
            rows = self.send[:n * local.shape[1]].reshape(n, local.shape[1])
            ops.gather_rows(local, np.flatnonzero(kinds == OUT_LOGITS), rows)
        if self.size == 1:
            return rows
        if self.rank != 0:
            self._timed(self.comm.Gatherv, self.comm.Igatherv, rows, None, 0)
            return None
        recv = [self.gather_buf, self.vocab_counts * n, None, MPI.FLOAT]
        self._timed(self.comm.Gatherv, self.comm.Igatherv, rows, recv, 0)
        out, off, v0 = self.full_logits[:n], 0, 0
        for c in self.vocab_counts:
            out[:, v0:v0 + c] = self.gather_buf[off:off + n * c].reshape(n, c)
            off += n * c
            v0 += c
        return out

    def _nll(self, local: np.ndarray, targets: np.ndarray, R: int) -> np.ndarray | None:
        """-log p(target) per output row from the vocabulary slices: each rank sends (max,
        log-sum-exp relative to it, target logit or -inf) per row, 24 bytes instead of its logits."""
        parts = self.nll_parts[:R]
        ops.nll_parts(local, targets, self.model.slice.vocab[0], parts)
        if self.size == 1:
            allp = parts[None]
        else:
            buf = self.nll_all[:self.size * R * 3] if self.rank == 0 else None
            self._timed(self.comm.Gather, self.comm.Igather, parts, buf, 0)
            if self.rank != 0:
                return None
            allp = buf.reshape(self.size, R, 3)
        m = allp[:, :, 0].max(axis=0)                                      # (R,) global max
        lse = m + np.log(np.sum(np.exp(allp[:, :, 1] + allp[:, :, 0] - m), axis=0))
        return lse - allp[:, :, 2].max(axis=0)                             # the owner's target logit

    # ---- rank 0: drive the others -------------------------------------------------------------
    def run(self, tokens, positions, slots, out_rows=(), per_row=(), cmd: int = CMD_STEP):
        """Rank 0: broadcast one step's plan and run it on every rank. Rows t: token tokens[t]
        of slot slots[t] at positions[t]; out_rows (ascending) need output, per_row[r] saying
        OUT_GREEDY or OUT_LOGITS (or the target token, with CMD_SCORE). Returns (ids, logits):
        ids (R,) the greedy token of each output row (valid for OUT_GREEDY rows; None when every
        row asked for logits), logits (n, vocab) of the OUT_LOGITS rows in order (None if none);
        with CMD_SCORE, (R,) -log p(target). None when no row needs output."""
        T, R = len(tokens), len(out_rows)
        if not 0 < T <= self.max_batch:
            raise ValueError(f"a step carries 1..{self.max_batch} rows, got {T}")
        steps.pack(self.plan, tokens, positions, slots, out_rows, per_row)
        _, pos, sl, _, kinds = steps.unpack(self.plan, T, R)
        if pos.min() < 0 or pos.max() >= self.max_seq_len or sl.min() < 0 or sl.max() >= self.n_slots:
            raise ValueError(f"a step's positions must be in [0, {self.max_seq_len}) and its slots in "
                             f"[0, {self.n_slots})")
        n_logits = int(np.count_nonzero(kinds == OUT_LOGITS)) if cmd == CMD_STEP else 0
        self.header[:] = (cmd, T, R, n_logits)
        if self.size > 1:
            self._bcast_step(steps.plan_len(T, R))
        return self._execute(cmd, T, R, n_logits)

    def step(self, tokens, pos: int, all_logits: bool = False, greedy: bool = False, slot: int = 0):
        """Rank 0, one sequence: run tokens at positions pos.. of KV slot ``slot`` (in batches of
        up to max_batch rows). Returns the logits (T, vocab) with ``all_logits``, else (1, vocab)
        of the last token, or with ``greedy`` the greedy next token."""
        T = len(tokens)
        if pos + T > self.max_seq_len:
            raise ValueError(f"sequence of {pos + T} tokens exceeds --ctx-size {self.max_seq_len}")
        toks = np.asarray(tokens, np.int64)
        outs = []
        for s in range(0, T, self.max_batch):
            n = min(self.max_batch, T - s)
            last = s + n == T
            rows = np.arange(n) if all_logits else (np.array([n - 1]) if last else np.zeros(0, np.int64))
            kind = OUT_GREEDY if greedy else OUT_LOGITS
            res = self.run(toks[s:s + n], np.arange(pos + s, pos + s + n), np.full(n, slot), rows,
                           np.full(len(rows), kind))
            if res is not None:
                outs.append(res[0] if greedy else res[1].copy())
        if greedy:
            return int(outs[-1][-1])
        return np.concatenate(outs) if all_logits else outs[-1]

    def step_greedy(self, tokens, pos: int, slot: int = 0) -> int:
        """Rank 0: run tokens at pos and return the greedy next token (16 bytes per rank)."""
        return self.step(tokens, pos, greedy=True, slot=slot)

    def score(self, tokens, first: int, slot: int = 0) -> np.ndarray:
        """Rank 0: run a sequence from position 0 and return -log p(tokens[j + 1] | tokens[:j + 1])
        for j in [first, len - 1), in float64 (perplexity). Batches before ``first`` only fill
        the KV cache; the others reduce their logits to one NLL per token on the ranks."""
        T = len(tokens)
        if T > self.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds --ctx-size {self.max_seq_len}")
        toks = np.asarray(tokens, np.int64)
        out = []
        for s in range(0, T, self.max_batch):
            n = min(self.max_batch, T - s)
            j = np.arange(s, s + n)
            rows = np.flatnonzero((j >= first) & (j < T - 1))
            r = self.run(toks[s:s + n], j, np.full(n, slot), rows, toks[s + rows + 1], cmd=CMD_SCORE)
            if r is not None:
                out.append(r)
        return np.concatenate(out) if out else np.zeros(0)

    def serve(self) -> int:
        """Ranks > 0: follow rank 0's steps until STOP; returns the exit code rank 0 sent."""
        while True:
            self._bcast(self.msg[:self.first])                    # collective: the step (or STOP)
            cmd, T, R, n_logits = (int(v) for v in self.header)
            if cmd == CMD_STOP:
                return T
            n = steps.plan_len(T, R)
            if steps.HEADER_LEN + n > self.first:                 # collective: the rest of a long plan
                self._bcast(self.msg[self.first:steps.HEADER_LEN + n])
            self._execute(cmd, T, R, n_logits)

    def stop(self, exit_code: int = 0) -> None:
        """Rank 0: release the other ranks from serve(), telling them the job's exit code."""
        if self.rank == 0 and self.size > 1:
            self.header[:] = (CMD_STOP, exit_code, 0, 0)
            self._bcast(self.msg[:self.first])

    def _bcast(self, buf: np.ndarray) -> None:
        """Broadcast from rank 0, waiting as --wait says (block: the idle ranks between requests
        sleep instead of spinning)."""
        if self.waiter.nonblocking:
            self.waiter.wait(self.comm.Ibcast(buf, root=0))
        else:
            self.comm.Bcast(buf, root=0)

    def _bcast_step(self, n: int) -> None:
        """Rank 0: send the step in self.msg (header and ``n`` plan words): one broadcast when it
        fits the fixed first part, two otherwise (the others' serve() mirrors this)."""
        self._bcast(self.msg[:self.first])                        # collective: the step
        if steps.HEADER_LEN + n > self.first:
            self._bcast(self.msg[self.first:steps.HEADER_LEN + n])   # collective: the rest of a long plan

    def drive(self, fn) -> int:
        """Run ``fn()`` on rank 0 while the other ranks serve; always release them, with rank 0's
        exit code, so an error on rank 0 (a prompt too long, a bad request) ends every rank."""
        if self.rank != 0:
            return self.serve()
        try:
            rc = fn() or 0
        except ValueError as e:
            self.stop(1)
            raise FatalError(str(e)) from None
        except BaseException:
            self.stop(1)
            raise
        self.stop(rc)
        return rc


def compile_tiny(model_dir: Path, kv_type: str, buffer_type: str, repack: bool, step) -> None:
    """The warm-up's compile run (mpillm.runtime.warm calls it under the node's compile lock with
    a tiny model of the real one's weight types): an Engine on COMM_SELF through a prompt step, a
    scoring step, token steps and a mixed batch, so every kernel the real model calls compiles
    (the engine's own kernels.warmup() the matmul kernels, the first forward the fused blocks).
    ``repack``: whether the real model's weights will be repacked (its kernels are the ones to compile).
    ``step(name)`` is called before each stage."""
    step("matmul kernels")
    # compile_turn=False: this process already holds the node's compile lock
    e = Engine(model_dir, max_seq_len=16, max_batch=8, buffer_type=buffer_type, kv_type=kv_type,
               comm=MPI.COMM_SELF, verbose=False, n_slots=2, compile_turn=False, repack=repack)
    step("attention and FFN blocks (prompt)")
    e.step([1, 2, 3], 0)
    e.score([1, 2, 3, 4], 1, slot=1)
    step("token steps (one sequence, a batch of two)")
    e.step_greedy([4], 3)
    e.step([5], 4)
    e.run([6, 7], [5, 4], [0, 1], [0, 1], [OUT_GREEDY, OUT_LOGITS])
    e.stop(0)


def kv_memory_error(kv_per_token: int, n_slots: int, ctx: int, avail: int | None = None) -> str | None:
    """The KV cache is allocated memory (the weights are memory-mapped and may page): refuse a
    slots x context that does not fit in what this node has available, with what would fit.
    MPILLM_MEMORY_LIMIT (bytes) overrides the measured figure (tests); the measured figure is
    MemAvailable capped by the cgroup's limit (runtime.memory), None (no check) when unknown."""
    budget = rank_budget(0.9, avail)  # ranks on one node share its memory; keep 10% for the rest
    if budget is None:
        return None
    local = local_ranks()
    need = kv_per_token * n_slots * ctx
    if need <= budget:
        return None
    fit_slots = budget // (kv_per_token * ctx)
    fit_ctx = budget // (kv_per_token * n_slots)
    return (f"the KV cache for {n_slots} slot(s) x {ctx} tokens needs {need / 2**20:.0f} MiB but "
            f"{budget / 2**20:.0f} MiB is available to this rank ({local} rank(s) on the node); at most "
            f"--parallel {fit_slots} at --ctx-size {ctx}, or --ctx-size {fit_ctx} at --parallel {n_slots}")


__all__ = ["Engine", "FatalError", "compile_tiny", "kv_memory_error"]
