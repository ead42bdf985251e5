"""The distributed engine: open shards, print the plan, run forward steps in lock-step.

Rank 0 drives: it broadcasts a command header and the tokens, every rank runs the
same forward on its slice, and the vocabulary-parallel logits are gathered to
rank 0. The other ranks sit in ``serve()`` until rank 0 broadcasts STOP.
"""
from __future__ import annotations

import dataclasses

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mpi4py import MPI

from . import format as fmt
from . import kernels, ops
from .comm import FatalError, agree
from .config import ModelConfig
from .model import Transformer
from .partition import plan, share_notes, valid_world_sizes

CMD_STOP, CMD_FORWARD = 0, 1
# what a forward returns: last-token logits, all logits, greedy token, nothing (KV cache only),
# or the NLL of given target tokens (vocabulary-parallel: no logits are gathered)
OUT_LAST, OUT_ALL, OUT_ARGMAX, OUT_NONE, OUT_NLL = 0, 1, 2, 3, 4


@dataclass
class Stats:
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    gen_tokens: int = 0
    gen_s: float = 0.0
    gen_comm_s: float = 0.0
    gen_allreduce_bytes: int = 0
    gather_bytes: int = 0

    def line(self, tp_size: int) -> str:
        pt = self.prompt_tokens / self.prompt_s if self.prompt_s else 0.0
        gt = self.gen_tokens / self.gen_s if self.gen_s else 0.0
        n = max(self.gen_tokens, 1)
        ms = 1e3 * self.gen_s / n
        comm_ms = 1e3 * self.gen_comm_s / n
        return (f"[prompt {self.prompt_tokens} tok, {pt:.1f} tok/s | generate {self.gen_tokens} tok, {gt:.1f} tok/s | "
                f"{ms:.2f} ms/tok = {ms - comm_ms:.2f} compute + {comm_ms:.2f} comm | "
                f"sent/rank/tok: {self.gen_allreduce_bytes / n / 1024:.1f} KiB allreduce payload"
                f"{f' + {self.gather_bytes / 1024:.1f} KiB logits (each rank > 0)' if tp_size > 1 else ''} | ranks {tp_size}]")


class Engine:
    def __init__(self, model_dir: Path, max_seq_len: int = 2048, threads: int = 1, max_batch: int = 64,
                 buffer_type: str = "f32", kv_type: str = "f16",
                 comm: MPI.Comm = MPI.COMM_WORLD, verbose: bool = True):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
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
                raise ValueError(f"--max-seq-len {max_seq_len} must be in [2, {cfg.context_length}] "
                                 f"(the model's context length)")
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
        self.max_seq_len, self.max_batch = max_seq_len, max_batch
        kv_bytes = 2 * cfg.n_layers * (shard.slice["kv_heads"][1] - shard.slice["kv_heads"][0]) * max_seq_len * \
            cfg.head_dim * (2 if kv_type == "f16" else 4)
        sizes = comm.gather((shard.nbytes, kv_bytes, MPI.Get_processor_name()), root=0)
        if self.rank == 0 and verbose:
            self.print_plan(sizes, threads)
        err = None
        try:
            kernels.set_threads(threads)
            kernels.warmup()
            self.model = Transformer(shard, comm, max_seq_len, max_batch, buffer_type, kv_type)
        except (ValueError, MemoryError) as e:
            err = f"{type(e).__name__}: {e}"
        agree(comm, err)
        self.vocab_counts = np.array([p.vocab[1] - p.vocab[0] for p in self.slices], np.int64)
        self.header = np.zeros(4, np.int64)       # [command, n_tokens, position, OUT_*]
        self.best = np.zeros(2, np.float64)       # this rank's (max logit, global token id)
        self.bests = np.zeros((self.size, 2), np.float64) if self.rank == 0 else None
        self.tokens = np.zeros(max_batch, np.int64)
        self.targets = np.full(max_batch, -1, np.int64)    # OUT_NLL: next token per row, -1 = not scored
        self.nll_parts = np.zeros((max_batch, 3), np.float64)  # this rank's (max, lse - max, target logit)
        self.nll_all = np.zeros(self.size * max_batch * 3, np.float64) if self.rank == 0 else None  # (ranks, T, 3)
        self.full_logits = np.zeros((max_batch, cfg.vocab_size), np.float32) if self.rank == 0 else None
        self.gather_buf = np.zeros(max_batch * cfg.vocab_size, np.float32) if self.rank == 0 else None
        # bytes the largest non-root vocabulary slice sends to rank 0 per generated token
        self.logits_bytes_per_token = int(self.vocab_counts[1:].max()) * 4 if self.size > 1 else 0
        comm.Barrier()
        self.startup_s = time.perf_counter() - t0

    def print_plan(self, sizes, threads: int) -> None:
        cfg = self.cfg
        print(f"mpillm plan: {cfg.arch}, {cfg.n_layers} layers, dim {cfg.dim}, {cfg.n_heads} heads / "
              f"{cfg.n_kv_heads} KV heads, vocab {cfg.vocab_size}; world size {self.size}, "
              f"{threads} thread(s) per rank, max-seq-len {self.max_seq_len}, kernels {kernels.active_path()}",
              flush=True)
        shares = share_notes(cfg, self.slices, self.split, [wb for wb, _, _ in sizes])
        for rs, (wb, kb, host), share in zip(self.slices, sizes, shares):
            ffn = rs.expert_ffn if cfg.is_moe else rs.ffn
            print(f"  rank {rs.tp_rank} on {host}: heads [{rs.heads[0]},{rs.heads[1]}) "
                  f"KV heads [{rs.kv_heads[0]},{rs.kv_heads[1]}) {'expert ' if cfg.is_moe else ''}FFN "
                  f"[{ffn[0]},{ffn[1]}) vocab [{rs.vocab[0]},{rs.vocab[1]}) | weights {wb / 2**20:.1f} MiB + "
                  f"KV cache {kb / 2**20:.1f} MiB = {(wb + kb) / 2**20:.1f} MiB | {share}", flush=True)

    # ------------------------------------------------------------------------------------------
    def _forward_and_gather(self, T: int, pos: int, out: int) -> np.ndarray | int | None:
        local = self.model.forward(self.tokens[:T], pos, out in (OUT_ALL, OUT_NLL), out != OUT_NONE)
        if out == OUT_NONE:
            return None
        if out == OUT_ARGMAX:
            return self._argmax(local[0])
        if out == OUT_NLL:
            return self._nll(local, T)
        rows = local.shape[0]
        if self.size == 1:
            return local
        t0 = time.perf_counter()
        if self.rank == 0:
            counts = self.vocab_counts * rows
            self.comm.Gatherv(local, [self.gather_buf, counts, None, MPI.FLOAT], root=0)
        else:
            self.comm.Gatherv(local, None, root=0)
        self.model.stats.seconds += time.perf_counter() - t0
        if self.rank != 0:
            return None
        if rows == 1:
            return self.gather_buf[: self.cfg.vocab_size].reshape(1, -1)
        out, off = self.full_logits[:rows], 0
        v0 = 0
        for c in self.vocab_counts:
            out[:, v0:v0 + c] = self.gather_buf[off:off + rows * c].reshape(rows, c)
            off += rows * c
            v0 += c
        return out

    def _argmax(self, local: np.ndarray) -> int | None:
        """Greedy token without gathering logits: each rank sends (max, id) of its vocabulary slice."""
        i = int(np.argmax(local))
        if self.size == 1:
            return i
        self.best[:] = (local[i], self.model.slice.vocab[0] + i)
        t0 = time.perf_counter()
        self.comm.Gather(self.best, self.bests, root=0)
        self.model.stats.seconds += time.perf_counter() - t0
        if self.rank != 0:
            return None
        return int(self.bests[int(np.argmax(self.bests[:, 0])), 1])  # ties: the lowest id, as np.argmax

    def _nll(self, local: np.ndarray, T: int) -> np.ndarray | None:
        """-log p(target) per row from the vocabulary slices: each rank sends (max, log-sum-exp
        relative to it, target logit or -inf) per row, 24 bytes a row instead of its logits."""
        parts = self.nll_parts[:T]
        ops.nll_parts(local, self.targets[:T], self.model.slice.vocab[0], parts)
        if self.size == 1:
            allp = parts[None]
        else:
            t0 = time.perf_counter()
            buf = self.nll_all[:self.size * T * 3] if self.rank == 0 else None
            self.comm.Gather(parts, buf, root=0)
            self.model.stats.seconds += time.perf_counter() - t0
            if self.rank != 0:
                return None
            allp = buf.reshape(self.size, T, 3)
        m = allp[:, :, 0].max(axis=0)                                      # (T,) global max
        lse = m + np.log(np.sum(np.exp(allp[:, :, 1] + allp[:, :, 0] - m), axis=0))
        tgt = allp[:, :, 2].max(axis=0)                                    # the owner's target logit
        return np.where(self.targets[:T] >= 0, lse - tgt, np.nan)

    def score(self, tokens, first: int) -> np.ndarray:
        """Rank 0: run a sequence from position 0 and return -log p(tokens[j + 1] | tokens[:j + 1])
        for j in [first, len - 1), in float64 (perplexity). Batches before ``first`` only fill
        the KV cache; the others compute their logits, and the ranks reduce them to one NLL per
        token without gathering the vocabulary."""
        T = len(tokens)
        if T > self.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds --max-seq-len {self.max_seq_len}")
        toks = np.asarray(tokens, np.int64)
        out = []
        for s in range(0, T, self.max_batch):
            n = min(self.max_batch, T - s)
            j = np.arange(s, s + n)
            tg = np.where((j >= first) & (j < T - 1), toks[np.minimum(j + 1, T - 1)], -1)
            mode = OUT_NLL if (tg >= 0).any() else OUT_NONE
            self.header[:] = (CMD_FORWARD, n, s, mode)
            self.comm.Bcast(self.header, root=0)
            self.tokens[:n] = toks[s:s + n]
            self.targets[:n] = tg
            self.comm.Bcast(self.tokens[:n], root=0)
            if mode == OUT_NLL:
                self.comm.Bcast(self.targets[:n], root=0)
            r = self._forward_and_gather(n, s, mode)
            if mode == OUT_NLL:
                out.append(r[tg >= 0])
        return np.concatenate(out) if out else np.zeros(0)

    def step_greedy(self, tokens, pos: int) -> int:
        """Rank 0: run tokens at pos on every rank and return the greedy next token (16 bytes per rank)."""
        return self.step(tokens, pos, out=OUT_ARGMAX)

    def step(self, tokens, pos: int, all_logits: bool = False, out: int | None = None):
        """Rank 0: run tokens at pos on every rank; full logits (T or 1, vocab), or the greedy token."""
        mode = out if out is not None else (OUT_ALL if all_logits else OUT_LAST)
        T = len(tokens)
        if pos + T > self.max_seq_len:
            raise ValueError(f"sequence of {pos + T} tokens exceeds --max-seq-len {self.max_seq_len}")
        out = None
        for s in range(0, T, self.max_batch):
            n = min(self.max_batch, T - s)
            self.header[:] = (CMD_FORWARD, n, pos + s, mode)
            self.comm.Bcast(self.header, root=0)
            self.tokens[:n] = tokens[s:s + n]
            self.comm.Bcast(self.tokens[:n], root=0)
            logits = self._forward_and_gather(n, pos + s, mode)
            if mode == OUT_ALL:
                out = logits.copy() if out is None else np.concatenate([out, logits])
            else:
                out = logits
        return out

    def serve(self) -> int:
        """Ranks > 0: follow rank 0's commands until STOP; returns the exit code rank 0 sent."""
        while True:
            self.comm.Bcast(self.header, root=0)
            cmd, n, pos, mode = (int(v) for v in self.header)
            if cmd == CMD_STOP:
                return n
            self.comm.Bcast(self.tokens[:n], root=0)
            if mode == OUT_NLL:
                self.comm.Bcast(self.targets[:n], root=0)
            self._forward_and_gather(n, pos, mode)

    def stop(self, exit_code: int = 0) -> None:
        """Rank 0: release the other ranks from serve(), telling them the job's exit code."""
        if self.rank == 0 and self.size > 1:
            self.header[:] = (CMD_STOP, exit_code, 0, 0)
            self.comm.Bcast(self.header, root=0)

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


__all__ = ["Engine", "FatalError"]
