"""Prometheus metrics, named after vLLM's (`vllm:*` -> `slipstream:*`) so existing dashboards map over.

Gauges and counters are read from the engine at scrape time (a custom collector); latency histograms are
observed on the engine thread as tokens come out.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from slipstream.engine.llm_engine import LLMEngine
from slipstream.engine.outputs import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class EngineCollector:
    def __init__(self, engine: LLMEngine, model_name: str) -> None:
        self.engine, self.labels = engine, {"model_name": model_name}
        self.finished: dict[str, int] = {}

    def _g(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=list(self.labels))
        g.add_metric(list(self.labels.values()), value)
        return g

    def _c(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=list(self.labels))
        c.add_metric(list(self.labels.values()), value)
        return c

    def collect(self):  # noqa: ANN201 - prometheus_client protocol
        e = self.engine
        bm, sched, stats = e.block_manager, e.scheduler, e.stats
        yield self._g("slipstream:num_requests_running", "Sequences in the running batch.", len(sched.running))
        yield self._g("slipstream:num_requests_waiting", "Sequences waiting to be scheduled.", len(sched.waiting))
        yield self._g("slipstream:kv_cache_usage_perc", "Fraction of KV blocks in use (cached pages nobody uses count as free).",
                      1.0 - bm.num_free_blocks / bm.num_blocks)
        yield self._g("slipstream:kv_cache_free_blocks", "KV blocks free or evictable.", bm.num_free_blocks)
        yield self._g("slipstream:kv_cache_total_blocks", "KV blocks in the pool.", bm.num_blocks)
        yield self._c("slipstream:prompt_tokens", "Prompt tokens admitted.", stats.prompt_tokens)
        yield self._c("slipstream:generation_tokens", "Tokens generated.", stats.generation_tokens)
        yield self._c("slipstream:num_preemptions", "Sequences preempted (recomputed later).", stats.num_preemptions)
        cache = bm.prefix_cache
        if cache is not None:
            yield self._c("slipstream:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", cache.stats.query_tokens)
            yield self._c("slipstream:prefix_cache_hits", "Prompt tokens served from the prefix cache.", cache.stats.hit_tokens)
            yield self._c("slipstream:prefix_cache_evictions", "Cached blocks evicted.", cache.stats.evicted_blocks)
            yield self._g("slipstream:prefix_cache_blocks", "Blocks held by the prefix cache.", len(cache.nodes))
        fin = CounterMetricFamily("slipstream:request_success", "Finished requests by finish reason.", labels=[*self.labels, "finished_reason"])
        for reason, n in self.finished.items():
            fin.add_metric([*self.labels.values(), reason], n)
        yield fin


class ServerMetrics:
    def __init__(self, engine: LLMEngine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.collector = EngineCollector(engine, model_name)
        self.registry.register(self.collector)
        lbl = ["model_name"]
        self.ttft = Histogram("slipstream:time_to_first_token_seconds", "Time to first token.", lbl, registry=self.registry, buckets=_LATENCY_BUCKETS)
        self.itl = Histogram("slipstream:inter_token_latency_seconds", "Time between output tokens.", lbl, registry=self.registry, buckets=_LATENCY_BUCKETS)
        self.e2e = Histogram("slipstream:e2e_request_latency_seconds", "Arrival to finish.", lbl, registry=self.registry, buckets=_LATENCY_BUCKETS)
        self.step_time = Histogram("slipstream:engine_step_seconds", "Duration of one engine step.", lbl, registry=self.registry, buckets=_LATENCY_BUCKETS)
        self.model = model_name
        self._last_token: dict[str, tuple[float, int]] = {}

    def on_step(self, engine: LLMEngine, outputs: list[RequestOutput], elapsed: float | None) -> None:
        now = time.monotonic()
        if elapsed is not None:
            self.step_time.labels(self.model).observe(elapsed)
        for out in outputs:
            n = sum(len(o.token_ids) for o in out.outputs)
            prev = self._last_token.get(out.request_id)
            if prev is None and out.metrics.ttft is not None:
                self.ttft.labels(self.model).observe(out.metrics.ttft)
            elif prev is not None and n > prev[1]:
                gap = (now - prev[0]) / (n - prev[1])
                for _ in range(n - prev[1]):
                    self.itl.labels(self.model).observe(gap)
            self._last_token[out.request_id] = (now, n)
            if out.finished:
                del self._last_token[out.request_id]
                self.e2e.labels(self.model).observe(now - out.metrics.arrival_time)
                for o in out.outputs:
                    reason = o.finish_reason or "abort"
                    self.collector.finished[reason] = self.collector.finished.get(reason, 0) + 1
