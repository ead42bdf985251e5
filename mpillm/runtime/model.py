"""The transformer forward pass of one tensor-parallel rank.

Per layer (llama / qwen2 / qwen3 / qwen3moe share these blocks):

  rmsnorm -> wq, wk, wv (column-parallel: this rank's heads) [+ q/k/v bias slices]
  [-> q/k head norm] -> RoPE
  -> attention over this rank's KV cache -> wo (row-parallel) -> Allreduce #1 -> residual
  rmsnorm -> w_gate, w_up (column-parallel) -> SiLU * up -> w_down (row-parallel)
          |  or MoE: router (replicated) -> top-k experts, each a slice of its hidden size
  -> Allreduce #2 -> residual

deepseek2 (DeepSeek-V3/R1, Kimi-K2) replaces the attention by multi-head latent attention
(``_mla``; mpillm.runtime.mla): the small down-projections wq_a and wkv_a and the latent KV cache
are replicated (the latent is shared by every head: splitting it would need another sync), the
per-head wq_b / wk_b / wv_b slices and wo's columns are this rank's heads', wo row-parallel into
Allreduce #1. Its first n_dense_layers layers have a dense FFN; the others a sigmoid, group-limited
router with a selection-only correction bias, routed experts and shared experts, both split along
their hidden size into Allreduce #2.

gpt-oss adds: biases on q/k/v (column-parallel slices) and o (added once, after Allreduce #1);
a sink logit per query head in the softmax and a sliding window on some layers (attention);
YaRN-scaled RoPE tables; router and expert biases, the clamped SwiGLU, and the routed
experts' down biases added once after Allreduce #2 (in the fused blocks too).

The embedding and output projection are vocabulary-parallel (rows of the vocabulary);
the embedding is joined by a sync, the logits are gathered by the engine. Each sync (the
Allreduce, or a compressed exchange) is ``self.sync(...)``: mpillm.runtime.collectives.
All buffers are allocated once in ``__init__``; ``forward`` allocates no arrays.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from mpi4py import MPI

from mpillm import kernels
from mpillm.formats import quant
from mpillm.formats.format import Shard, Tensor
from mpillm.formats.partition import RankSlice
from mpillm.formats.quant import QK
from mpillm.kernels import exact, interleaved
from mpillm.runtime import fused, memory, mla, ops
from mpillm.runtime.collectives import Sync, Waiter


KV_TYPES = ("f16", "f32")
_quantize_q8_0 = kernels.get_path(kernels.active_path()).jit.quantize_q8_0


class Acts:
    """An activation buffer and its q8_0 quantization, for one input width K."""

    def __init__(self, x: np.ndarray):
        T, K = x.shape
        self.x = x                                            # (T, K) f32
        self.xq = np.zeros((T, K), np.int8)                   # (T, K)
        self.xd = np.zeros((T, max(K // QK, 1)), np.float32)  # (T, K / 32)
        self.xsum = np.zeros((T, max(K // QK, 1)), np.int32)  # (T, K / 32)
        self.quantizable = K % QK == 0

    def quantize(self, T: int) -> None:
        if self.quantizable:
            _quantize_q8_0(self.x[:T], self.xq[:T], self.xd[:T], self.xsum[:T])


_KEYS = {t: tuple(k for k, _ in a) for t, a in {**quant.ARRAYS, **interleaved.ARRAYS}.items()}  # kernel argument order


def _as_stored(t: Tensor) -> Tensor:
    return t


def _interleaved(t: Tensor) -> Tensor:
    """A weight of a type ``interleaved.RTYPE`` names (q4_0 / q4_1 / q8_0 / q4_K / q6_K / q2_K / q3_K, or
    _32) repacked with 16 rows per register (mpillm.kernels.interleaved: its kernels make a step of
    several rows cheap); other types as stored. The repacked arrays live
    in this process's memory; the memory-mapped pages they were read from can be dropped."""
    if t.wtype not in interleaved.RTYPE:
        return t
    rtype, arrays = interleaved.repack(t.wtype, t.arrays)
    return dataclasses.replace(t, wtype=rtype, arrays=arrays, stored=None)


# The repacked copy is the rank's own memory: it is made only while the weights it copies take at most
# this share of what the node can still give, so a model larger than the memory keeps paging through
# its memory maps (docs/performance.md, "Less RAM than model").
REPACK_SHARE = 0.5


def repack_decision(shard: Shard, buffer_type: str) -> tuple[bool, str]:
    """(repack?, the plan line's words for it) for this rank's shard."""
    if not interleaved.wanted(kernels.active_path()) or buffer_type == "f64":
        return False, ""
    size = sum(v.nbytes for t in shard.tensors.values() if t.wtype in interleaved.RTYPE for v in t.arrays.values())
    budget = memory.rank_budget(REPACK_SHARE)
    if budget is not None and size > budget:
        return False, (f", weights not repacked ({size / 2**30:.1f} GiB would exceed "
                       f"{budget / 2**30:.1f} GiB, {REPACK_SHARE:.0%} of this rank's share of free memory)")
    return True, f", {size / 2**30:.2f} GiB of weights repacked per rank" if size else ""


def _plain(arrays: dict, wtype: str) -> tuple:
    """A weight's arrays as the kernels take them: plain ndarrays (np.memmap's view and slice
    hooks cost per call), fp16 as uint16."""
    plain = (np.asarray(arrays[k]) for k in _KEYS[wtype])
    return tuple(v.view(np.uint16) if v.dtype == np.float16 else v for v in plain)


class Linear:
    """y = x W^T for one stored weight (an expert's slice when ``index`` is given).

    Holds the raw jitted kernel of the active path and plain-ndarray views of the weights
    (fp16 as uint16, as the kernels take them), so a call costs one numba dispatch."""

    def __init__(self, t: Tensor, index: int | None = None):
        a = t.arrays if index is None else {k: v[index] for k, v in t.arrays.items()}
        self.wtype, self.rows, self.cols = t.wtype, t.shape[-2], t.shape[-1]
        self.quantized = self.wtype not in ("f16", "f32")
        jit = kernels.get_path(kernels.active_path()).jit
        self.fn = getattr(jit, fused.KERNEL_NAME[self.wtype])
        self.fn64 = exact.KERNELS.get(self.wtype)  # float64 output, for --buffer-type f64 (never repacked)
        self.w = _plain(a, self.wtype)
        self.nbytes = sum(x.nbytes for x in self.w)

    def __call__(self, a: Acts, T: int, out: np.ndarray) -> None:
        """out[:T] = x W^T; a float64 ``out`` selects the exact-summation kernels."""
        if self.rows == 0:
            return
        fn = self.fn64 if out.dtype == np.float64 else self.fn
        if self.quantized:
            fn(*self.w, a.xq[:T], a.xd[:T], a.xsum[:T], out[:T])
        else:
            fn(*self.w, a.x[:T], out[:T])


def _vec(t: Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.arrays["w"], dtype=np.float32)


# The q/k/v biases (config.qkv_bias), in the order the fused attention block takes them.
ATTN_BIASES = ("bq", "bk", "bv")


class Layer:
    def __init__(self, shard: Shard, i: int, moe: bool, qk_norm: bool, prep=_as_stored):
        """prep: Tensor -> Tensor in the layout the matmul kernels read (_as_stored or _interleaved)."""
        g = lambda n: shard.get(f"layers/{i}/{n}")  # noqa: E731
        w = lambda n: prep(g(n))  # noqa: E731  a matmul's weight
        self.moe = moe
        self.attn_norm = _vec(g("attn_norm"))  # (dim,)
        self.ffn_norm = _vec(g("ffn_norm"))    # (dim,)
        if shard.config.is_mla:
            self._init_mla(shard, g, w)
        else:
            self.wq = Linear(w("wq"))          # (n_heads_per_partition * hd, dim)
            self.wk = Linear(w("wk"))          # (n_kv_heads_per_partition * hd, dim)
            self.wv = Linear(w("wv"))          # (n_kv_heads_per_partition * hd, dim)
        self.wo = Linear(w("wo"))              # (dim, n_heads_per_partition * o_head_dim)
        self.q_norm = _vec(g("q_norm")) if qk_norm else None  # (hd,)
        self.k_norm = _vec(g("k_norm")) if qk_norm else None  # (hd,)
        # q/k/v biases, this rank's heads' slices (None when the model has none):
        # bq (n_heads_per_partition * hd,), bk / bv (n_kv_heads_per_partition * hd,)
        opt = {n: _vec(g(n)) if shard.config.qkv_bias else None for n in ATTN_BIASES}
        self.bq, self.bk, self.bv = (opt[n] for n in ATTN_BIASES)
        self.biases = tuple(n for n in ATTN_BIASES if opt[n] is not None)  # which ones, for mpillm.runtime.fused
        # gpt-oss's vectors (None when the model has none)
        o = lambda n: _vec(g(n)) if shard.has(f"layers/{i}/{n}") else None  # noqa: E731
        self.bo = o("bo")                      # (dim,) replicated: added once, after Allreduce #1
        self.sinks = o("sinks")                # (n_heads_per_partition,)
        self.router_b = o("router_b")          # (n_experts,)
        self.exp_gate_b = o("exp_gate_b")      # (n_experts, expert_ffn_per_partition)
        self.exp_up_b = o("exp_up_b")          # (n_experts, expert_ffn_per_partition)
        self.exp_down_b = o("exp_down_b")      # (n_experts, dim) replicated: added once, after Allreduce #2
        if moe:
            self.router = Linear(w("router"))  # (n_experts, dim) replicated
            ex = {n: w(n) for n in ("exp_gate", "exp_up", "exp_down")}
            E = ex["exp_gate"].shape[0]
            self.exp_gate = [Linear(ex["exp_gate"], e) for e in range(E)]  # (expert_ffn_per_partition, dim)
            self.exp_up = [Linear(ex["exp_up"], e) for e in range(E)]      # (expert_ffn_per_partition, dim)
            self.exp_down = [Linear(ex["exp_down"], e) for e in range(E)]  # (dim, expert_ffn_per_partition)
            # the stacked (E, rows, cols) arrays, for the jitted MoE block (mpillm.runtime.fused)
            self.exp_types = {n: t.wtype for n, t in ex.items()}
            self.exp_w = {n: _plain(t.arrays, t.wtype) for n, t in ex.items()}
            # deepseek2: the selection-only correction bias (None: none) and the shared experts
            self.router_corr = o("router_corr")  # (n_experts,) replicated
            sh = {n: w(n) for n in ("shexp_gate", "shexp_up", "shexp_down")} if shard.has(f"layers/{i}/shexp_gate") else {}
            S = sh["shexp_gate"].shape[0] if sh else 0
            self.shexp_gate = [Linear(sh["shexp_gate"], s) for s in range(S)]  # (expert_ffn_per_partition, dim)
            self.shexp_up = [Linear(sh["shexp_up"], s) for s in range(S)]      # (expert_ffn_per_partition, dim)
            self.shexp_down = [Linear(sh["shexp_down"], s) for s in range(S)]  # (dim, expert_ffn_per_partition)
        else:
            self.w_gate = Linear(w("w_gate"))  # (ffn_per_partition, dim)
            self.w_up = Linear(w("w_up"))      # (ffn_per_partition, dim)
            self.w_down = Linear(w("w_down"))  # (dim, ffn_per_partition)


    def _init_mla(self, shard: Shard, g, w) -> None:
        """deepseek2's attention weights: q via wq_a -> q_a_norm -> wq_b (or plain wq), the latent via
        wkv_a -> kv_a_norm; kv_b as this rank's heads' wk_b (kv_lora, nope) and wv_b (v, kv_lora)."""
        q_lora = shard.config.q_lora_rank > 0
        self.wq_a = Linear(w("wq_a")) if q_lora else None    # (q_lora_rank, dim) replicated
        self.q_a_norm = _vec(g("q_a_norm")) if q_lora else None  # (q_lora_rank,)
        self.wq = Linear(w("wq_b") if q_lora else w("wq"))   # (n_heads_pp * head_dim, q_lora_rank or dim)
        self.wkv_a = Linear(w("wkv_a"))                      # (kv_lora_rank + qk_rope_dim, dim) replicated
        self.kv_a_norm = _vec(g("kv_a_norm"))                # (kv_lora_rank,)
        wk_b, wv_b = w("wk_b"), w("wv_b")
        H = wk_b.shape[0]
        self.wk_b = [Linear(wk_b, h) for h in range(H)]  # (kv_lora_rank, qk_nope_dim) per local head
        self.wv_b = [Linear(wv_b, h) for h in range(H)]  # (v_head_dim, kv_lora_rank) per local head
        # the same, stacked (H, rows, ...), for the jitted head loops (mpillm.runtime.fused.mla_heads)
        self.kv_b_types = (wk_b.wtype, wv_b.wtype)
        self.wk_b_all, self.wv_b_all = _plain(wk_b.arrays, wk_b.wtype), _plain(wv_b.arrays, wv_b.wtype)


class Transformer:
    def __init__(self, shard: Shard, comm: MPI.Comm, max_seq_len: int, max_batch: int = 64,
                 buffer_type: str = "f32", kv_type: str = "f16", n_slots: int = 1, sync: str = "auto",
                 wait: str | Waiter = "auto", sync_table: dict | None = None, hosts: int | None = None,
                 repack: tuple[bool, str] | None = None):
        """repack: ``repack_decision``'s answer when the caller has it already (None: decide here)."""
        cfg = self.cfg = shard.config
        rs = self.slice = RankSlice(**{k: tuple(v) if isinstance(v, list) else v for k, v in shard.slice.items()})
        self.comm, self.tp_size = comm, comm.Get_size()
        self.max_seq_len, self.max_batch, self.n_slots = max_seq_len, max_batch, n_slots
        hd = cfg.head_dim
        nh, nkv = rs.n_heads_per_partition, rs.n_kv_heads_per_partition
        ffn = rs.expert_ffn_per_partition if cfg.is_moe else rs.ffn_per_partition

        # weights (memory-mapped)
        self.tok_embd = shard.get("tok_embd")  # (vocab_per_partition, dim)
        self.embd_arrays = {k: (v.view(np.uint16) if v.dtype == np.float16 else v)
                            for k, v in self.tok_embd.arrays.items()}
        # the matmuls' weights: q4_0 / q4_1 / q8_0 / q4_K / q6_K / q2_K / q3_K interleaved on VNNI (not with the float64
        # partial sums, whose exact kernels read the stored layout; not when the copy would not fit)
        self.repacked, self.repack_note = repack or repack_decision(shard, buffer_type)
        prep = _interleaved if self.repacked else _as_stored
        self.output = Linear(prep(self.tok_embd if cfg.tied_embeddings else shard.get("output")))  # (vocab_pp, dim)
        self.output_norm = _vec(shard.get("output_norm"))  # (dim,)
        self.layers = [Layer(shard, i, cfg.layer_is_moe(i), cfg.qk_norm, prep) for i in range(cfg.n_layers)]
        self.weight_bytes = shard.nbytes

        # which local KV head each local query head reads
        self.kv_of_head = np.array([(rs.heads[0] + h) // cfg.group_size - rs.kv_heads[0] for h in range(nh)], np.int64)
        freqs = _vec(shard.get("rope_freqs")) if shard.has("rope_freqs") else None  # (hd/2,) Llama 3.x scaling
        yarn = ((cfg.rope_factor, cfg.rope_orig_context, cfg.yarn_beta_fast, cfg.yarn_beta_slow, cfg.yarn_truncate)
                if cfg.rope_scaling == "yarn" else None)
        if cfg.is_mla:  # the RoPE parts only: (S, qk_rope_dim / 2)
            self.cos, self.sin = mla.rope_tables(cfg, max_seq_len)
        else:
            self.cos, self.sin = ops.rope_tables(max_seq_len, hd, cfg.rope_theta, freqs, yarn)  # (S, hd/2)
        self.windows = [cfg.window(i) for i in range(cfg.n_layers)]  # keys each layer sees (0: all)
        self.no_sinks = np.zeros(0, np.float32)

        # run state, allocated once (T = max_batch)
        B, D = max_batch, cfg.dim
        self.x = np.zeros((B, D), np.float32)             # (T, dim) residual stream
        self.xb = Acts(np.zeros((B, D), np.float32))      # (T, dim) normed input of a block
        self.q = np.zeros((B, nh * hd), np.float32)       # (T, n_heads_pp * hd)
        kvw = 0 if cfg.is_mla else nkv * hd
        self.k = np.zeros((B, kvw), np.float32)           # (T, n_kv_pp * hd)
        self.v = np.zeros((B, kvw), np.float32)           # (T, n_kv_pp * hd)
        self.att = Acts(np.zeros((B, nh * cfg.o_head_dim), np.float32))  # (T, n_heads_pp * o_head_dim) attention output
        # attention scratch: softmax states, the weights of a kernel call, a widened latent block
        self.scores = ops.attention_scratch(nh, cfg.kv_values_per_token(nkv) if cfg.is_mla else hd, B)
        self.gate = np.zeros((B, ffn), np.float32)        # (T, ffn_pp)
        self.up = np.zeros((B, ffn), np.float32)          # (T, ffn_pp)
        self.hb = Acts(np.zeros((B, ffn), np.float32))    # (T, ffn_pp) SiLU(gate) * up
        # deepseek2's leading dense layers in a MoE model: their own (T, ffn_pp) gate, up, SiLU(gate) * up
        # (a matmul writes exactly its rows' width)
        dn = rs.ffn_per_partition
        self.dense_bufs = ((np.zeros((B, dn), np.float32), np.zeros((B, dn), np.float32),
                            Acts(np.zeros((B, dn), np.float32))) if cfg.is_moe and cfg.n_dense_layers else None)
        self.partial = np.zeros((B, D), np.float32)       # (T, dim) row-parallel partial sums -> Allreduce
        self.partial64 = np.zeros((B, D), np.float64) if buffer_type == "f64" else None  # (T, dim) exact mode
        self.logits = np.zeros((B, rs.vocab_per_partition), np.float32)  # (T, vocab_pp)
        # KV cache: one slot per sequence, (layer, n_slots, n_kv_pp, S, hd), float32 or fp16 bits
        # (uint16: numba has no float16). Which tokens a slot holds is rank 0's bookkeeping
        # (mpillm.serving.scheduler): positions are explicit, so a reset costs nothing here.
        if kv_type not in KV_TYPES:
            raise ValueError(f"--kv-type must be one of {', '.join(KV_TYPES)}, got {kv_type!r}")
        kv_dtype = np.uint16 if kv_type == "f16" else np.float32
        if cfg.is_mla:  # the latent cache (layer, n_slots, 1, S, kv_lora + rope), keys and values alike
            self.k_cache = np.zeros((cfg.n_layers, n_slots, 1, max_seq_len, cfg.kv_values_per_token(nkv)), kv_dtype)
            self.v_cache = np.zeros((cfg.n_layers, n_slots, 1, 0, 0), kv_dtype)
            self._init_mla_buffers(B, nh)
        else:
            # keys in tiles of 16 positions (ops.key_cache_shape), values in rows
            self.k_cache = np.zeros((cfg.n_layers, *ops.key_cache_shape(n_slots, nkv, max_seq_len, hd)), kv_dtype)
            self.v_cache = np.zeros((cfg.n_layers, n_slots, nkv, ops.kv_positions(max_seq_len), hd), kv_dtype)
        if cfg.is_moe:
            E, K = cfg.n_experts, cfg.n_experts_used
            self.router_logits = np.zeros((B, E), np.float32)  # (T, n_experts)
            self.topk_idx = np.zeros((B, K), np.int64)         # (T, top_k)
            self.topk_w = np.zeros((B, K), np.float32)         # (T, top_k)
            self.xe = Acts(np.zeros((B, D), np.float32))       # (T_e, dim) tokens routed to one expert
            self.ye = np.zeros((B, D), np.float32)             # (T_e, dim) that expert's partial output
            self.exp_slots = np.zeros(E + 1, np.int64)         # (E + 1,) counting-sort scratch
            self.exp_starts = np.zeros(E + 1, np.int64)        # (E + 1,) active expert a owns [starts[a], starts[a+1])
            self.exp_active = np.zeros(E, np.int64)            # (E,) experts used by the batch, ascending
            self.exp_rows = np.zeros(B * K, np.int64)          # (T * top_k,) token rows grouped by expert
            self.exp_wts = np.zeros(B * K, np.float32)         # (T * top_k,) their routing weights
            self.route_sc = np.zeros((2, E), np.float64)       # (2, n_experts) sigmoid router scratch
            self.route_grp = np.zeros((2, max(cfg.n_expert_groups, 1)), np.float64)  # (2, n_groups)
            self.no_corr = np.zeros(E, np.float32)             # (n_experts,) stands in for no correction bias
        self.route_log: list | None = None  # tests: set to [] to record (topk_idx, topk_w) per MoE block
        # the sync after each row-parallel projection (mpillm.runtime.collectives): f32 / f64 use
        # MPI_Allreduce; f16 / q8_0 send compressed partials and every rank sums them in rank order
        self.sync = Sync(comm, buffer_type, B, D, sync, wait, sync_table, hosts)
        self.stats = self.sync.stats
        if buffer_type == "f64" and cfg.is_moe:  # the experts' outputs are summed in float32
            raise ValueError("--buffer-type f64 (exact sums) is implemented for dense models only, "
                             f"not for {cfg.arch}; use f32, f16 or q8_0")
        self.buffer_type = buffer_type

        self._setup_fused()

    def _init_mla_buffers(self, B: int, nh: int) -> None:
        """deepseek2's attention buffers (T = max_batch rows)."""
        cfg = self.cfg
        r, W = cfg.kv_lora_rank, cfg.kv_lora_rank + cfg.qk_rope_dim
        self.mla_qa = Acts(np.zeros((B, max(cfg.q_lora_rank, 1)), np.float32))  # (T, q_lora_rank) q_a, normed
        self.mla_kv = np.zeros((B, W), np.float32)            # (T, kv_lora + rope) this batch's latents
        self.mla_qn = Acts(np.zeros((B, cfg.qk_nope_dim), np.float32))  # (T, nope) one head's q_nope
        self.mla_qlat = np.zeros((B, r), np.float32)          # (T, kv_lora) one head's absorbed query
        self.mla_q = np.zeros((B, nh * W), np.float32)        # (T, n_heads_pp * (kv_lora + rope)) absorbed queries
        self.mla_o = np.zeros((B, nh * W), np.float32)        # (T, n_heads_pp * (kv_lora + rope)) attention over the latent
        self.mla_ol = Acts(np.zeros((B, r), np.float32))      # (T, kv_lora) one head's latent output
        self.mla_vh = np.zeros((B, cfg.v_head_dim), np.float32)  # (T, v_head_dim) one head's value output
        self.mla_kv_head = np.zeros(nh, np.int64)             # every head reads the one latent "KV head"
        # the kernel scales scores by 1/sqrt(W): pre-scale the query to get MLA's softmax scale
        self.mla_q_scale = mla.softmax_scale(cfg) * float(np.sqrt(W))

    def _setup_fused(self) -> None:
        """Per-layer argument tuples for the whole-block jitted functions (mpillm.runtime.fused).
        Off with MPILLM_FUSED=0."""
        import os

        self.fused = None
        self.mla_heads = None
        exact64 = self.partial64 is not None
        if os.environ.get("MPILLM_FUSED", "1") == "0":
            return
        if self.cfg.is_mla:  # deepseek2: the per-kernel path, its per-head loops jitted
            self.mla_heads = [fused.mla_heads(*L.kv_b_types) for L in self.layers]
            return
        part = self.partial64 if exact64 else self.partial  # where wo / w_down write
        cfg, hd = self.cfg, self.cfg.head_dim
        one = np.ones(1, np.float32)
        oai = cfg.arch == "gpt-oss"  # sinks + window in attention, biases + clamped SwiGLU in the MoE
        self.fused = []
        for li, L in enumerate(self.layers):
            types = {"wq": L.wq.wtype, "wk": L.wk.wtype, "wv": L.wv.wtype, "wo": L.wo.wtype}
            if not cfg.is_moe:
                types.update(w_gate=L.w_gate.wtype, w_up=L.w_up.wtype, w_down=L.w_down.wtype)
            else:  # ffn_block is generated for some FFN types but not used; moe_block is
                types.update(w_gate="f32", w_up="f32", w_down="f32", router=L.router.wtype, **L.exp_types)
            mod = fused.blocks(types, cfg.qk_norm, exact64, L.biases, oai=oai)
            xb, at, hb = self.xb, self.att, self.hb
            attn = (cfg.norm_eps, hd, self.x, L.attn_norm, xb.x, xb.xq, xb.xd, xb.xsum,
                    *L.wq.w, *L.wk.w, *L.wv.w,
                    L.q_norm if L.q_norm is not None else one, L.k_norm if L.k_norm is not None else one,
                    *(getattr(L, n) for n in L.biases), self.q, self.k, self.v, self.cos, self.sin, self.k_cache[li], self.v_cache[li],
                    self.kv_of_head, self.scores, at.x, at.xq, at.xd, at.xsum, *L.wo.w,
                    *((L.sinks if L.sinks is not None else self.no_sinks, self.windows[li]) if oai else ()), part)
            if cfg.is_moe:
                xe, ew = self.xe, L.exp_w
                ffn = (cfg.norm_eps, cfg.norm_topk_prob, self.x, L.ffn_norm, xb.x, xb.xq, xb.xd, xb.xsum,
                       *L.router.w, self.router_logits, self.topk_idx, self.topk_w, self.exp_slots,
                       self.exp_starts, self.exp_rows, self.exp_wts, self.exp_active, xe.x, xe.xq, xe.xd,
                       xe.xsum, *ew["exp_gate"], *ew["exp_up"], *ew["exp_down"], self.gate, self.up,
                       hb.x, hb.xq, hb.xd, hb.xsum, self.ye,
                       *((L.router_b, L.exp_gate_b, L.exp_up_b, cfg.swiglu_alpha, cfg.swiglu_limit) if oai else ()),
                       self.partial)
            else:
                ffn = (cfg.norm_eps, self.x, L.ffn_norm, xb.x, xb.xq, xb.xd, xb.xsum, *L.w_gate.w, *L.w_up.w,
                       self.gate, self.up, hb.x, hb.xq, hb.xd, hb.xsum, *L.w_down.w, part)
            self.fused.append((mod, attn, ffn))

    def forward(self, tokens: np.ndarray, positions: np.ndarray, slots: np.ndarray,
                out_rows: np.ndarray) -> np.ndarray | None:
        """Run one step of T = len(tokens) rows: row t is token tokens[t] of the sequence in KV
        slot slots[t], at position positions[t] (a step may mix decode rows of many sequences
        with prompt chunks; the matmuls read each weight once for all rows). Returns this
        rank's logits slice for the rows ``out_rows`` (ascending), (R, vocab_pp), or None
        when no row needs logits (the step only fills KV caches)."""
        T, cfg = len(tokens), self.cfg
        if T > self.max_batch:
            raise ValueError(f"batch of {T} tokens exceeds max_batch {self.max_batch}")
        x = self.x[:T]
        ops.embed(self.tok_embd.wtype, self.embd_arrays, tokens, self.slice.vocab[0], x)
        self.sync(x)  # vocabulary-parallel embedding: each row comes from one rank
        for li, L in enumerate(self.layers):
            if cfg.is_mla:
                self._mla(L, li, T, positions, slots)
            else:
                self._attention(L, li, T, positions, slots)
            if L.moe:
                self._moe(L, T, li)
            else:
                self._ffn(L, T, li)
        R = len(out_rows)
        if R == 0:
            return None
        r0 = int(out_rows[0])
        if int(out_rows[-1]) - r0 == R - 1:  # a run of rows (the whole batch, the last row): no copy
            rows = self.x[r0:r0 + R]
        else:
            rows = self.partial[:R]  # free until the next layer
            ops.gather_rows(self.x, out_rows, rows)
        ops.rmsnorm(rows, self.output_norm, cfg.norm_eps, self.xb.x[:R])
        self.xb.quantize(R)
        self.output(self.xb, R, self.logits)
        return self.logits[:R]

    def _attention(self, L: Layer, li: int, T: int, positions: np.ndarray, slots: np.ndarray) -> None:
        cfg, hd = self.cfg, self.cfg.head_dim
        if self.fused is not None:
            mod, args, _ = self.fused[li]
            mod.attn_block(T, positions, slots, *args)  # norm .. wo in one jitted call
            part = self.partial if self.partial64 is None else self.partial64
            self.sync(part[:T])  # Allreduce #1: attention output projection
            if L.bo is not None:
                ops.add_bias(part[:T], L.bo)  # once, on the summed output
            ops.add_inplace(self.x[:T], part[:T])
            return
        ops.rmsnorm(self.x[:T], L.attn_norm, cfg.norm_eps, self.xb.x[:T])
        self.xb.quantize(T)
        L.wq(self.xb, T, self.q)
        L.wk(self.xb, T, self.k)
        L.wv(self.xb, T, self.v)
        q, k = self.q[:T], self.k[:T]
        for b, y in ((L.bq, q), (L.bk, k), (L.bv, self.v[:T])):
            if b is not None:
                ops.add_bias(y, b)
        if L.q_norm is not None:
            ops.rmsnorm_heads(q, L.q_norm, cfg.norm_eps, hd)
            ops.rmsnorm_heads(k, L.k_norm, cfg.norm_eps, hd)
        ops.rope_neox(q, positions, hd, self.cos, self.sin)
        ops.rope_neox(k, positions, hd, self.cos, self.sin)
        ops.store_kv(k, self.v[:T], self.k_cache[li], self.v_cache[li], slots, positions, hd)
        ops.attention_ext(q, self.k_cache[li], self.v_cache[li], slots, positions, hd, self.kv_of_head, self.scores,
                          self.att.x[:T], L.sinks if L.sinks is not None else self.no_sinks, self.windows[li])
        self.att.quantize(T)
        part = self.partial if self.partial64 is None else self.partial64
        L.wo(self.att, T, part)
        self.sync(part[:T])  # Allreduce #1: attention output projection
        if L.bo is not None:
            ops.add_bias(part[:T], L.bo)  # once, on the summed output
        ops.add_inplace(self.x[:T], part[:T])

    def _mla(self, L: Layer, li: int, T: int, positions: np.ndarray, slots: np.ndarray) -> None:
        """Multi-head latent attention over this rank's heads, absorbed form (mpillm.runtime.mla)."""
        cfg = self.cfg
        r, nope, hd, dv = cfg.kv_lora_rank, cfg.qk_nope_dim, cfg.head_dim, cfg.v_head_dim
        W = r + cfg.qk_rope_dim
        ops.rmsnorm(self.x[:T], L.attn_norm, cfg.norm_eps, self.xb.x[:T])
        self.xb.quantize(T)
        if L.wq_a is not None:  # q: wq_a (replicated) -> RMSNorm -> wq_b (this rank's heads)
            qa = self.mla_qa
            L.wq_a(self.xb, T, qa.x)
            mla.rmsnorm_cols(qa.x[:T], cfg.q_lora_rank, L.q_a_norm, cfg.lora_norm_eps)
            qa.quantize(T)
            L.wq(qa, T, self.q)
        else:
            L.wq(self.xb, T, self.q)
        kv = self.mla_kv[:T]
        L.wkv_a(self.xb, T, self.mla_kv)  # replicated: the latent and the shared RoPE key
        mla.rmsnorm_cols(kv, r, L.kv_a_norm, cfg.lora_norm_eps)
        mla.rope_parts(self.q[:T], positions, hd, nope, cfg.qk_rope_dim, self.cos, self.sin)
        mla.rope_parts(kv, positions, W, r, cfg.qk_rope_dim, self.cos, self.sin)
        cache = self.k_cache[li]
        mla.store_latent(kv, cache, slots, positions)
        q, qabs, sc = self.q[:T], self.mla_q[:T], self.mla_q_scale
        H, heads = len(L.wk_b), (self.mla_heads[li] if self.mla_heads is not None else None)
        qn, ol = self.mla_qn, self.mla_ol
        if heads is not None:  # the same loop, jitted (mpillm.runtime.fused.mla_heads)
            heads.absorb_q(T, H, hd, nope, W, r, sc, self.q, qn.x, qn.xq, qn.xd, qn.xsum, *L.wk_b_all,
                           self.mla_qlat, self.mla_q)
        else:
            for h in range(H):  # fold each head's key half of kv_b into its query
                mla.take_cols(q, h * hd, qn.x[:T])
                qn.quantize(T)
                L.wk_b[h](qn, T, self.mla_qlat)
                mla.put_cols(self.mla_qlat[:T], qabs, h * W, sc)
                mla.put_cols(q[:, h * hd + nope:(h + 1) * hd], qabs, h * W + r, sc)
        ops.attention_latent(qabs, cache, slots, positions, W, self.mla_kv_head, self.scores, self.mla_o[:T])
        if heads is not None:
            heads.expand_v(T, H, W, dv, self.mla_o, ol.x, ol.xq, ol.xd, ol.xsum, *L.wv_b_all, self.mla_vh, self.att.x)
        else:
            for h in range(H):  # each head's value half of kv_b after attention
                mla.take_cols(self.mla_o[:T], h * W, ol.x[:T])
                ol.quantize(T)
                L.wv_b[h](ol, T, self.mla_vh)
                mla.put_cols(self.mla_vh[:T], self.att.x[:T], h * dv, 1.0)
        self.att.quantize(T)
        part = self.partial if self.partial64 is None else self.partial64
        L.wo(self.att, T, part)
        self.sync(part[:T])  # Allreduce #1: attention output projection (row-parallel over heads)
        ops.add_inplace(self.x[:T], part[:T])

    def _ffn(self, L: Layer, T: int, li: int) -> None:
        if self.fused is not None:
            mod, _, args = self.fused[li]
            mod.ffn_block(T, *args)  # norm .. w_down in one jitted call
            part = self.partial if self.partial64 is None else self.partial64
            self.sync(part[:T])  # Allreduce #2: FFN down projection
            ops.add_inplace(self.x[:T], part[:T])
            return
        ops.rmsnorm(self.x[:T], L.ffn_norm, self.cfg.norm_eps, self.xb.x[:T])
        self.xb.quantize(T)
        gate, up, hb = self.dense_bufs or (self.gate, self.up, self.hb)
        L.w_gate(self.xb, T, gate)
        L.w_up(self.xb, T, up)
        ops.silu_mul(gate[:T], up[:T], hb.x[:T])
        hb.quantize(T)
        part = self.partial if self.partial64 is None else self.partial64
        L.w_down(hb, T, part)
        self.sync(part[:T])  # Allreduce #2: FFN down projection
        ops.add_inplace(self.x[:T], part[:T])

    def _moe(self, L: Layer, T: int, li: int) -> None:
        cfg = self.cfg
        if self.fused is not None and self.route_log is None:
            mod, _, args = self.fused[li]
            mod.moe_block(T, *args)  # norm, router, top-k, every active expert: one jitted call
            self.sync(self.partial[:T])  # Allreduce #2: the MoE block's summed expert outputs
            if L.exp_down_b is not None:  # once, on the summed output: sum_j w_j b_down[e_j]
                ops.add_expert_rows(self.partial[:T], self.topk_idx[:T], self.topk_w[:T], L.exp_down_b)
            ops.add_inplace(self.x[:T], self.partial[:T])
            return
        ops.rmsnorm(self.x[:T], L.ffn_norm, cfg.norm_eps, self.xb.x[:T])
        self.xb.quantize(T)
        L.router(self.xb, T, self.router_logits)  # replicated: every rank routes identically
        if L.router_b is not None:
            ops.add_bias(self.router_logits[:T], L.router_b)
        if cfg.router_func == "sigmoid":  # deepseek2: the correction bias picks, the plain scores weigh
            corr = L.router_corr if L.router_corr is not None else self.no_corr
            ops.route_sigmoid_groups(self.router_logits[:T], corr, L.router_corr is not None, cfg.n_expert_groups,
                                     cfg.n_groups_used, cfg.norm_topk_prob, cfg.router_scale, self.topk_idx[:T],
                                     self.topk_w[:T], self.route_sc, self.route_grp)
        else:
            ops.route_topk(self.router_logits[:T], cfg.norm_topk_prob, self.topk_idx[:T], self.topk_w[:T])
        if self.route_log is not None:
            self.route_log.append((self.topk_idx[:T].copy(), self.topk_w[:T].copy()))
        out = self.partial[:T]
        out[:] = 0.0
        # group the batch's tokens by expert so each expert's weights are read once per batch
        n_active = ops.group_by_expert(self.topk_idx[:T], self.topk_w[:T], self.exp_slots, self.exp_starts,
                                       self.exp_rows, self.exp_wts, self.exp_active)
        for a in range(n_active):
            e, r0, r1 = self.exp_active[a], self.exp_starts[a], self.exp_starts[a + 1]
            n, rows = r1 - r0, self.exp_rows[r0:r1]
            if n == T:  # every token (always so when decoding): rows are 0..T-1, use xb as it is
                xe = self.xb
            else:
                xe = self.xe
                ops.gather_rows(self.xb.x, rows, xe.x)
                xe.quantize(n)
            L.exp_gate[e](xe, n, self.gate)
            L.exp_up[e](xe, n, self.up)
            if L.exp_gate_b is not None:
                ops.add_bias(self.gate[:n], L.exp_gate_b[e])
                ops.add_bias(self.up[:n], L.exp_up_b[e])
            if cfg.ffn_act == "swiglu_oai":
                ops.swiglu_oai(self.gate[:n], self.up[:n], cfg.swiglu_alpha, cfg.swiglu_limit, self.hb.x[:n])
            else:
                ops.silu_mul(self.gate[:n], self.up[:n], self.hb.x[:n])
            self.hb.quantize(n)
            L.exp_down[e](self.hb, n, self.ye)
            ops.scatter_add_rows(self.ye[:n], rows, self.exp_wts[r0:r1], out)
        for s in range(len(L.shexp_gate)):  # deepseek2's shared experts: every token, weight 1
            L.shexp_gate[s](self.xb, T, self.gate)
            L.shexp_up[s](self.xb, T, self.up)
            ops.silu_mul(self.gate[:T], self.up[:T], self.hb.x[:T])
            self.hb.quantize(T)
            L.shexp_down[s](self.hb, T, self.ye)
            ops.add_inplace(out, self.ye[:T])
        self.sync(out)  # Allreduce #2: the MoE block's summed expert outputs
        if L.exp_down_b is not None:  # once, on the summed output: sum_j w_j b_down[e_j]
            ops.add_expert_rows(out, self.topk_idx[:T], self.topk_w[:T], L.exp_down_b)
        ops.add_inplace(self.x[:T], out)
