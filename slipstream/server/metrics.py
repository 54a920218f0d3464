"""Prometheus metrics, named after vLLM's (`vllm:*` -> `slipstream:*`) so existing dashboards map over.

Gauges and counters come from the engine core's `CoreStats`, which rides on every step message; latency
histograms and finished requests are observed in the front end as outputs arrive (what clients see). Warm-up
traffic is not counted: the core resets its counters after warming up and sends no step of it here.

With several front ends (`--api-server-count`), whichever answers /metrics must report all of them: their
histograms and counters live in prometheus_client's multiprocess files (PROMETHEUS_MULTIPROC_DIR, which the
supervising process sets before it starts them: prometheus_client reads it once, at import) and are summed on
each scrape; the core's figures reach every front end alike.
"""
from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from slipstream.engine.core_stats import CoreStats
from slipstream.engine.outputs import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class EngineCollector:
    def __init__(self, model_name: str) -> None:
        self.labels = {"model_name": model_name}
        self.stats = CoreStats()

    def _g(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=list(self.labels))
        g.add_metric(list(self.labels.values()), value)
        return g

    def _c(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=list(self.labels))
        c.add_metric(list(self.labels.values()), value)
        return c

    def collect(self):  # noqa: ANN201 - prometheus_client protocol
        s = self.stats
        yield self._g("slipstream:num_requests_running", "Sequences in the running batch.", s.running)
        yield self._g("slipstream:num_requests_waiting", "Sequences waiting to be scheduled.", s.waiting)
        yield self._g("slipstream:kv_cache_usage_perc", "Fraction of KV blocks in use (cached pages nobody uses count as free).",
                      1.0 - s.free_blocks / s.total_blocks if s.total_blocks else 0.0)
        yield self._g("slipstream:kv_cache_free_blocks", "KV blocks free or evictable.", s.free_blocks)
        yield self._g("slipstream:kv_cache_total_blocks", "KV blocks in the pool.", s.total_blocks)
        yield self._c("slipstream:prompt_tokens", "Prompt tokens admitted.", s.prompt_tokens)
        yield self._c("slipstream:generation_tokens", "Tokens generated.", s.generation_tokens)
        yield self._c("slipstream:num_preemptions", "Sequences preempted (recomputed later).", s.num_preemptions)
        if s.cache_blocks >= 0:
            yield self._c("slipstream:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.cache_query_tokens)
            yield self._c("slipstream:prefix_cache_hits", "Prompt tokens served from the prefix cache.", s.cache_hit_tokens)
            yield self._c("slipstream:prefix_cache_evictions", "Cached blocks evicted.", s.cache_evicted_blocks)
            yield self._g("slipstream:prefix_cache_blocks", "Blocks held by the prefix cache.", s.cache_blocks)
        yield self._c("slipstream:spec_decode_num_draft_tokens", "Draft tokens verified (speculative decoding).", s.draft_tokens)
        yield self._c("slipstream:spec_decode_num_accepted_tokens", "Draft tokens accepted.", s.accepted_draft_tokens)
        yield self._c("slipstream:spec_decode_num_drafts", "A sequence's verifying steps (mean accepted length: 1 + "
                      "accepted tokens / drafts).", s.drafts)
        yield self._c("slipstream:spec_decode_draft_seconds", "Host time proposing drafts (a head's or draft model's "
                      "forwards, launched and read back, included).", s.draft_seconds)
        # by kind: a decode step replays one CUDA graph, a step that carries prompt tokens replays graph pieces with the
        # attention launched between them (or runs eagerly beyond runner/model_runner.MAX_PIECEWISE_TOKENS)
        steps = CounterMetricFamily("slipstream:engine_steps", "Engine steps read, by kind (decode or mixed: with prompt tokens).",
                                    labels=[*self.labels, "kind"])
        device = CounterMetricFamily("slipstream:engine_step_device_seconds",
                                     "Time of those steps on the device, launch gaps included (0 without CUDA).",
                                     labels=[*self.labels, "kind"])
        for kind, n, sec in (("decode", s.decode_steps, s.decode_device_seconds), ("mixed", s.mixed_steps, s.mixed_device_seconds)):
            steps.add_metric([*self.labels.values(), kind], n)
            device.add_metric([*self.labels.values(), kind], sec)
        yield steps
        yield device


class ServerMetrics:
    """`registry` is what /metrics exposes. `multiprocess_dir`: this is one of several front ends sharing it."""

    def __init__(self, model_name: str, multiprocess_dir: str | None = None) -> None:
        own = CollectorRegistry()  # this process's observations (in multiprocess files with several front ends)
        self.collector = EngineCollector(model_name)
        if multiprocess_dir is None:
            self.registry = own
        else:
            self.registry = CollectorRegistry()
            MultiProcessCollector(self.registry, multiprocess_dir)
        self.registry.register(self.collector)

        def histogram(name: str, doc: str) -> Any:  # bound to the one label value once, not on every observation
            return Histogram(name, doc, ["model_name"], registry=own, buckets=_LATENCY_BUCKETS).labels(model_name)

        self.ttft = histogram("slipstream:time_to_first_token_seconds", "Time to first token.")
        self.itl = histogram("slipstream:inter_token_latency_seconds", "Time between output tokens.")
        self.e2e = histogram("slipstream:e2e_request_latency_seconds", "Arrival to finish.")
        self.step_time = histogram("slipstream:engine_step_seconds", "Duration of one engine step.")
        self.finished = Counter("slipstream:request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=own)
        self.model_name = model_name
        self._last_token: dict[str, tuple[float, int]] = {}

    def on_step(self, outputs: list[RequestOutput], stats: CoreStats, step_time: float) -> None:
        now = time.monotonic()
        self.collector.stats = stats
        if step_time > 0:
            self.step_time.observe(step_time)
        for out in outputs:
            n = sum(o.num_tokens for o in out.outputs)
            prev = self._last_token.get(out.request_id)
            if prev is None and out.metrics.ttft is not None:
                self.ttft.observe(out.metrics.ttft)
            elif prev is not None and n > prev[1]:
                gap = (now - prev[0]) / (n - prev[1])
                for _ in range(n - prev[1]):
                    self.itl.observe(gap)
            self._last_token[out.request_id] = (now, n)
            if out.finished:
                del self._last_token[out.request_id]
                self.e2e.observe(now - out.metrics.arrival_time)
                for o in out.outputs:
                    self.finished.labels(self.model_name, o.finish_reason or "abort").inc()
