"""Rank 0's request API: submit prompts, get tokens back as they come, cancel.

The server (mpillm.serve), generate, the terminal chat and the benchmarks all go through
``Service``. Every MPI call happens in the thread that calls ``step`` / ``run`` (rank 0's main
thread); ``submit``, ``cancel``, ``metrics`` and ``fail_all`` may be called from any thread and
only touch a queue and counters. One request's path:

  submit -> inbox -> Scheduler (slot, prefix reuse) -> StepPlan -> Engine.run (broadcast,
  forward with its Allreduce per layer, argmax / logits gather) -> Sampler -> text, stop strings
  -> Output to the request's sink
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from mpillm.runtime.steps import OUT_LOGITS
from mpillm.serving.sampling import Sampler, SamplingParams, StopMatcher, TokenLogprob, decide, logprobs_of
from mpillm.serving.scheduler import Scheduler, Sequence

log = logging.getLogger("mpillm.serve")


@dataclass
class Output:
    """One event of one request, delivered in order; the last one has finish_reason set."""
    request_id: str
    token_ids: list[int]           # tokens added since the previous event
    text: str                      # text added since the previous event (stop-string safe)
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None      # None until the last event: "stop" | "length" | "cancelled" | "error"
    error: str | None
    prompt_tokens: int
    completion_tokens: int         # total so far
    cached_tokens: int             # prompt tokens reused from a slot's KV cache


class QueueFull(Exception):
    """submit() while max_queue requests are already waiting for a slot."""


class Handle:
    def __init__(self, request_id: str, prompt_tokens: int):
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.outputs: queue.Queue = queue.Queue()
        self.finished = False


class _Request:
    """A request's state on rank 0 beside its scheduler Sequence: sampling, text, delivery."""

    def __init__(self, seq: Sequence, params: SamplingParams, sampler: Sampler | None, tokenizer,
                 sink: Callable[[Output], None], handle: Handle, constraint=None):
        self.seq, self.params, self.sampler = seq, params, sampler
        self.constraint = constraint
        self.tok, self.sink, self.handle = tokenizer, sink, handle
        self.decoder = tokenizer.stream_decoder()
        self.stops = StopMatcher(params.stop)
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(tokenizer.eos_ids))
        self.generated = 0
        self.closed = False
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None

    def output(self, ids, text, logprobs, finish=None, error=None) -> None:
        s = self.seq
        self.sink(Output(s.id, list(ids), text, logprobs, finish, error, s.n_prompt, self.generated, s.n_reused))


class Service:
    def __init__(self, engine, tokenizer, parallel: int | None = None, batch_tokens: int | None = None,
                 max_queue: int = 64, drafter=None):
        self.engine, self.tok = engine, tokenizer
        self.drafter = drafter  # mpillm.serving.speculative: proposes draft tokens per decoding sequence
        n_slots = engine.n_slots if parallel is None else parallel
        if n_slots > engine.n_slots:
            raise ValueError(f"--parallel {n_slots} exceeds the engine's {engine.n_slots} KV slots")
        batch = engine.max_batch if batch_tokens is None else min(batch_tokens, engine.max_batch)
        self.sched = Scheduler(n_slots, engine.max_seq_len, batch)
        self.max_queue = max_queue
        self.vocab_size = engine.cfg.vocab_size
        self._inbox: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._waiting = 0  # submitted, not yet given a slot (inbox + scheduler queue)
        self._requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self.counters = dict(requests_total=0, requests_finished=0, prompt_tokens_total=0,
                             completion_tokens_total=0, cached_tokens_total=0, steps_total=0, rows_total=0,
                             decode_steps_total=0, draft_tokens_total=0, draft_accepted_total=0,
                             draft_seconds_total=0.0, grammar_masks_total=0, grammar_mask_seconds_total=0.0)

    @property
    def context_size(self) -> int:
        return self.sched.ctx

    # ---- any thread --------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams,
               sink: Callable[[Output], None] | None = None, constraint=None) -> Handle:
        """``constraint`` (mpillm.serving.grammar.Constraint): a grammar the output must follow. Its
        rows gather their logits even when greedy (the engine's distributed argmax cannot see the
        mask, which lives on rank 0 only), the mask is applied before the pick, and the request
        ends with "stop" when the grammar is complete, "length" when max_tokens comes first."""
        params.validate()
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.context_size:
            raise ValueError(f"the prompt has {len(ids)} tokens but --ctx-size {self.context_size} must hold the "
                             f"prompt and at least one generated token; shorten the prompt or raise --ctx-size")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        with self._lock:
            if self._waiting >= self.max_queue:
                raise QueueFull(f"{self._waiting} requests are already waiting for a slot (--max-queue "
                                f"{self.max_queue})")
            self._waiting += 1
            self.counters["requests_total"] += 1
        rid = f"{uuid.uuid4().hex[:20]}{next(self._ids)}"
        handle = Handle(rid, len(ids))
        logits = params.needs_logits or constraint is not None
        seq = Sequence(rid, ids, len(ids), wants_logits=logits)
        sampler = Sampler(params, self.vocab_size, ids, constraint) if logits else None
        req = _Request(seq, params, sampler, self.tok, sink or handle.outputs.put, handle, constraint)
        seq.owner = req
        self._inbox.put(("submit", req))
        self._wake.set()
        return handle

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))
        self._wake.set()

    def metrics(self) -> dict:
        with self._lock:
            m = dict(self.counters)
            m["queue_len"] = self._waiting
        m["slots_busy"] = self.sched.busy
        m["slots_total"] = len(self.sched.slots)
        return m

    def fail_all(self, message: str) -> None:
        """End every open request with an error event (the job is going down)."""
        self._inbox.put(("fail", message))
        self._wake.set()

    # ---- the engine thread -------------------------------------------------------------------
    def _drain(self) -> None:
        while True:
            try:
                what, arg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if what == "submit":
                self._requests[arg.seq.id] = arg
                self.sched.add(arg.seq)
            elif what == "cancel":
                req = self._requests.get(arg)
                if req is not None:
                    self._finish(req, "cancelled")
            else:
                for req in list(self._requests.values()):
                    self._finish(req, "error", arg)

    def step(self) -> bool:
        """Admit waiting requests, run one engine step, deliver what it produced. False when idle."""
        self._drain()
        admitted = self.sched.admit()
        if admitted:
            with self._lock:
                self._waiting -= len(admitted)
                self.counters["cached_tokens_total"] += sum(s.n_reused for s in admitted)
        if self.drafter is not None:
            self._draft()
        plan = self.sched.plan()
        if plan is None:
            return False
        res = self.engine.run(plan.tokens, plan.positions, plan.slots, plan.out_rows, plan.kinds)
        prompt_rows = sum(max(0, min(s.n_cached + n, s.n_prompt) - s.n_cached) for s, _, n in plan.runs)
        self.sched.advance(plan)
        with self._lock:
            self.counters["steps_total"] += 1
            self.counters["rows_total"] += plan.n_rows
            self.counters["prompt_tokens_total"] += prompt_rows
        if res is None:
            return True
        ids, logits = res
        r = li = 0
        while r < len(plan.out_seqs):  # a sequence's output rows: its next token, then one per draft
            seq = plan.out_seqs[r]
            req: _Request = seq.owner
            draft, q, m = seq.draft, seq.draft_q, 1 + len(seq.draft)
            accepted = 0
            for i in range(m):  # accept drafts while the target agrees; the first other token ends it
                d = draft[i] if i < len(draft) else None
                if plan.kinds[r + i] == OUT_LOGITS:
                    row = logits[li + i]
                    tok, ok = decide(req.sampler, 0, row, d, q[i] if q and d is not None else None, self.vocab_size)
                    lp = self._logprobs(req, row, tok)
                else:
                    (tok, ok), lp = decide(None, int(ids[r + i]), None, d, None, self.vocab_size), None
                self._emit(req, tok, lp)
                if not ok or req.closed:
                    break
                accepted += 1
            li += m if plan.kinds[r] == OUT_LOGITS else 0
            r += m
            if draft:  # accepted drafts' keys and values are valid; the rest get overwritten later
                seq.n_cached += accepted
                seq.draft, seq.draft_q = [], None
                self.drafter.feedback(seq, len(draft), accepted)
            with self._lock:
                self.counters["decode_steps_total"] += 1
                self.counters["draft_tokens_total"] += len(draft)
                self.counters["draft_accepted_total"] += accepted
        return True

    def _draft(self) -> None:
        """Rank 0, before planning: drafts for the sequences that decode this step."""
        t0 = time.perf_counter()
        for seq in self.sched.running:
            seq.draft, seq.draft_q = [], None
            req: _Request = seq.owner
            if seq.pending != 1 or req.closed or req.constraint is not None:   # drafts would bypass the mask
                continue
            room = min(req.params.max_tokens - req.generated - 1, self.sched.ctx - len(seq.tokens))
            k = self.drafter.want(seq, room)
            if k > 0:
                self.drafter.propose(seq, k)
        with self._lock:
            self.counters["draft_seconds_total"] += time.perf_counter() - t0

    def _logprobs(self, req: _Request, row: np.ndarray, tok: int) -> list[TokenLogprob] | None:
        if not req.params.logprobs:
            return None
        lp, top = logprobs_of(row, tok, req.params.top_logprobs)
        text = self.tok.decode
        return [TokenLogprob(tok, text([tok]), lp, [(i, text([i]), v) for i, v in top])]

    def _emit(self, req: _Request, tok: int, lp) -> None:
        """A sequence produced token ``tok``: record it, then stop, hold back or give out text."""
        if req.closed:
            return
        seq = req.seq
        seq.tokens.append(tok)
        req.generated += 1
        if req.sampler is not None:
            req.sampler.observe(tok)
        grammar_end = None
        if req.constraint is not None and tok not in req.stop_ids:
            req.constraint.consume(tok)
            if req.constraint.error is not None:    # the engine gave up (e.g. a limit): cut, not complete
                log.warning("request %s: grammar engine stopped: %s", seq.id,
                            req.constraint.error.splitlines()[0][:200])
                grammar_end = "length"
            elif req.constraint.done:               # the constrained value is complete: nothing may follow
                grammar_end = "stop"
        if req.t_first is None:
            req.t_first = time.perf_counter()
        with self._lock:
            self.counters["completion_tokens_total"] += 1
        if tok in req.stop_ids:  # the stop token's own text is not given out; what was held back is
            # a constrained value that is not complete was cut short: the grammar had no way on but
            # EOS (a schema no finite value satisfies); never report it as a complete answer
            # (a grammar may itself end with a stop token, harmony's <|call|>: consumed, it completes it)
            c = req.constraint
            complete = c is None or c.accepting or (c.consume(tok) and c.error is None and (c.accepting or c.done))
            why = "stop" if complete else "length"
            self._end(req, [tok], req.stops.put(req.decoder.flush())[0] + req.stops.flush(), lp, why)
            return
        text, hit = req.stops.put(req.decoder.put(tok))
        if hit:
            self._end(req, [tok], text, lp, "stop")
        elif grammar_end is not None:
            text += req.stops.put(req.decoder.flush())[0] + req.stops.flush()
            self._end(req, [tok], text, lp, grammar_end)
        elif req.generated >= req.params.max_tokens or len(seq.tokens) > self.sched.ctx:
            text += req.stops.put(req.decoder.flush())[0] + req.stops.flush()
            self._end(req, [tok], text, lp, "length")
        else:
            req.output([tok], text, lp)

    def _finish(self, req: _Request, reason: str, error: str | None = None) -> None:
        """End a request from outside its token stream (cancel, failure)."""
        self._end(req, [], "", None, reason, error)

    def _end(self, req: _Request, ids, text, lp, reason: str, error: str | None = None) -> None:
        """A request's last output, given out after its slot is free and its counters are final: a
        client that reads /metrics as soon as its reply is complete sees the slot idle."""
        self._close(req)
        req.output(ids, text, lp, reason, error)

    def _close(self, req: _Request) -> None:
        req.closed = True
        req.handle.finished = True
        seq = req.seq
        if seq.slot is None and seq in self.sched.waiting:
            with self._lock:
                self._waiting -= 1
        self.sched.remove(seq)
        if self.drafter is not None:
            self.drafter.release(seq)
        self._requests.pop(seq.id, None)
        with self._lock:
            self.counters["requests_finished"] += 1
            if req.constraint is not None:
                self.counters["grammar_masks_total"] += req.constraint.masks
                self.counters["grammar_mask_seconds_total"] += req.constraint.mask_seconds

    def run(self, stop: threading.Event, idle_wait: float = 0.05) -> None:
        """Step while there is work; when idle, wait for a submission. Returns when ``stop`` is set,
        ending open requests with an error."""
        while not stop.is_set():
            if not self.step():
                self._wake.wait(idle_wait)
                self._wake.clear()
        self.fail_all("server shutting down")
        self._drain()

    def stream(self, prompt_ids: list[int], params: SamplingParams, constraint=None) -> Iterator[Output]:
        """Single-threaded use (generate, chat): submit, then step until this request is done."""
        h = self.submit(prompt_ids, params, constraint=constraint)
        while True:
            while True:
                try:
                    out = h.outputs.get_nowait()
                except queue.Empty:
                    break
                yield out
                if out.finish_reason is not None:
                    return
            self.step()
