"""Prometheus metrics of the server (prometheus-client, one registry per app).

The engine's counters (requests, tokens, queue, slots, steps) are read from
``Service.metrics()`` at scrape time; the latencies that only the HTTP side sees (time to
first token, inter-token latency, request duration, responses by status) are histograms
filled by the request handlers. Generation tokens per second is the rate over the last
``window`` seconds, sampled once a second.
"""
from __future__ import annotations

import collections
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

disable_created_metrics()   # no *_created series: they double the output and nobody graphs them

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)

# Service.metrics() key -> (metric name, type, help)
SERVICE_METRICS = {
    "requests_total": ("mpillm_requests", "counter", "requests admitted to the service"),
    "requests_finished": ("mpillm_requests_finished", "counter", "requests that have finished"),
    "prompt_tokens_total": ("mpillm_prompt_tokens", "counter", "prompt tokens computed (rows run through the model; tokens reused from the KV cache are counted apart)"),
    "completion_tokens_total": ("mpillm_generation_tokens", "counter", "tokens generated"),
    "cached_tokens_total": ("mpillm_cached_prompt_tokens", "counter",
                            "prompt tokens reused from a slot's KV cache"),
    "steps_total": ("mpillm_engine_steps", "counter", "engine steps (one batched forward on every rank)"),
    "decode_steps_total": ("mpillm_decode_steps", "counter",
                           "decoding steps of sequences (each verifies one sequence's draft, if any)"),
    "draft_tokens_total": ("mpillm_draft_tokens", "counter", "speculative draft tokens proposed on rank 0"),
    "draft_accepted_total": ("mpillm_draft_accepted_tokens", "counter",
                             "speculative draft tokens the target accepted"),
    "draft_seconds_total": ("mpillm_draft_seconds", "counter", "seconds rank 0 spent drafting"),
    "grammar_masks_total": ("mpillm_grammar_masks", "counter", "token masks computed for constrained rows on rank 0"),
    "grammar_mask_seconds_total": ("mpillm_grammar_mask_seconds", "counter",
                                   "seconds rank 0 spent computing and applying grammar masks"),
    "queue_len": ("mpillm_queue_length", "gauge", "requests waiting for a slot"),
    "slots_busy": ("mpillm_slots_busy", "gauge", "slots running a request"),
    "slots_total": ("mpillm_slots", "gauge", "slots (requests the engine batches together)"),
}


class _ServiceCollector:
    def __init__(self, metrics: "Metrics"):
        self.m = metrics

    def collect(self):
        snap = self.m.snapshot()
        ready = GaugeMetricFamily("mpillm_ready", "1 when the model is loaded and the server takes requests")
        ready.add_metric([], 1.0 if snap is not None else 0.0)
        yield ready
        if snap is None:
            return
        for key, (name, kind, doc) in SERVICE_METRICS.items():
            if key not in snap:
                continue
            fam = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, doc)
            fam.add_metric([], float(snap[key]))
            yield fam
        tps = GaugeMetricFamily("mpillm_generation_tokens_per_second",
                                f"tokens generated per second over the last {self.m.window:g} s")
        tps.add_metric([], self.m.tokens_per_second())
        yield tps


class Metrics:
    def __init__(self, window: float = 10.0):
        self.registry = CollectorRegistry()
        self.window = window
        self.service = None
        self._hist: collections.deque = collections.deque()
        self.ttft = Histogram("mpillm_time_to_first_token_seconds", "from the request to its first token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("mpillm_inter_token_latency_seconds", "between consecutive tokens of a stream",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.duration = Histogram("mpillm_request_duration_seconds", "from the request to its last token",
                                  buckets=LATENCY_BUCKETS, registry=self.registry)
        self.responses = Counter("mpillm_http_responses", "HTTP responses by route and status",
                                 ["route", "status"], registry=self.registry)
        self.registry.register(_ServiceCollector(self))

    def snapshot(self) -> dict | None:
        return self.service.metrics() if self.service is not None else None

    def sample(self) -> None:
        """Record (time, tokens generated so far); called once a second by the app."""
        snap = self.snapshot()
        if snap is None:
            return
        now = time.monotonic()
        self._hist.append((now, snap.get("completion_tokens_total", 0)))
        while len(self._hist) > 2 and now - self._hist[1][0] >= self.window:
            self._hist.popleft()

    def tokens_per_second(self) -> float:
        if len(self._hist) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._hist[0], self._hist[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)
