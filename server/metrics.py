"""Prometheus metrics for one engine, every series labelled ``model_name``, plus a periodic log line.

Gauges and the counters that mirror the engine's cumulative counters are read from
``engine.stats()`` at scrape time (one snapshot per scrape, no double counting); request
latencies and per-step sizes are observed from the engine's step and finish listeners.
"""
from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from kvserve import EngineStats, RequestOutput, StepStats

if TYPE_CHECKING:  # the engine module imports torch
    from kvserve import AsyncEngine

logger = logging.getLogger(__name__)

SUCCESS_REASONS = ("eos", "stop_token", "stop", "length", "grammar")
FAILURE_REASONS = ("validation", "overloaded", "aborted", "engine_error", "timeout")
BLOCK_STATES = ("used", "cached", "free")

# Long requests (minutes) must still land in a finite bucket.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0,
                   2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0,
                   1200.0, 1800.0, 3600.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
               0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
STEP_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
STEP_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0, 30.0)
REQUEST_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536,
                         131072)

_RECENT_FAILURES = 4096   # request ids remembered so an abort seen twice is counted once


class EngineStatsCollector(Collector):
    """Gauges and cumulative counters from one ``engine.stats()`` snapshot per scrape."""

    def __init__(self, engine: AsyncEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def describe(self):
        return self._families(None)

    def collect(self):
        try:
            stats = self.engine.stats()
        except Exception:  # noqa: BLE001 - /metrics must still answer, with engine_up 0
            logger.exception("engine.stats() failed during a scrape")
            up = GaugeMetricFamily("kvserve_engine_up", "1 while the engine process is alive, 0 after it died.",
                                   labels=["model_name"])
            up.add_metric([self.model_name], 0.0)
            return [up]
        return self._families(stats)

    def _families(self, stats: EngineStats | None):
        """Every family; without a snapshot (``describe``), families without samples."""
        labels = [self.model_name]

        def gauge(name, doc, value):
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            if value is not None:
                family.add_metric(labels, value)
            return family

        def counter(name, doc, value):
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            if value is not None:
                family.add_metric(labels, value)
            return family

        def stat(attr):
            return None if stats is None else getattr(stats, attr)

        blocks = GaugeMetricFamily("kvserve_kv_cache_blocks", "KV cache blocks by state: used (referenced "
                                   "by a request), cached (free, holding a reusable prefix), free (empty).",
                                   labels=["model_name", "state"])
        if stats is not None:
            for state in BLOCK_STATES:
                blocks.add_metric(labels + [state], getattr(stats, f"blocks_{state}"))
        host_blocks = GaugeMetricFamily("kvserve_kv_offload_blocks", "Host-memory KV tier blocks by state: "
                                        "cached (holding an evicted prefix block), free (empty).",
                                        labels=["model_name", "state"])
        tier_hits = CounterMetricFamily("kvserve_prefix_cache_hit_tokens_by_tier", "Prompt tokens served from "
                                        "the prefix cache, by the tier they were found in (device pool or host "
                                        "memory).", labels=["model_name", "tier"])
        if stats is not None:
            host_blocks.add_metric(labels + ["cached"], stats.offload_blocks_cached)
            host_blocks.add_metric(labels + ["free"], stats.offload_num_blocks - stats.offload_blocks_cached)
            tier_hits.add_metric(labels + ["device"], stats.prefix_hit_tokens - stats.prefix_hit_tokens_host)
            tier_hits.add_metric(labels + ["host"], stats.prefix_hit_tokens_host)
        running = self.engine.is_running if stats is not None else None
        return [
            gauge("kvserve_kv_cache_usage_ratio", "Fraction of KV cache blocks used by requests (0-1).",
                  stats.usage if stats is not None else None),
            blocks,
            gauge("kvserve_kv_cache_capacity_blocks", "KV cache pool size in blocks.", stat("num_blocks")),
            gauge("kvserve_kv_cache_block_size_tokens", "Tokens per KV cache block.", stat("block_size")),
            gauge("kvserve_requests_running", "Requests scheduled in the running batch.", stat("num_running")),
            gauge("kvserve_requests_waiting", "Requests queued, waiting to be scheduled.", stat("num_waiting")),
            gauge("kvserve_engine_up", "1 while the engine process is alive, 0 after it died.",
                  None if running is None else float(bool(running))),
            counter("kvserve_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache.",
                    stat("prefix_query_tokens")),
            counter("kvserve_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.",
                    stat("prefix_hit_tokens")),
            tier_hits,
            gauge("kvserve_kv_offload_capacity_blocks", "Host-memory KV tier size in blocks (0: --kv-offload-memory "
                  "is off).", stat("offload_num_blocks")),
            host_blocks,
            gauge("kvserve_kv_offload_usage_ratio", "Fraction of host-memory KV tier blocks holding a cached "
                  "prefix block (0-1).", stats.offload_usage if stats is not None else None),
            counter("kvserve_kv_offload_stored_blocks", "Blocks copied from the device pool to the host tier "
                    "(evicted cached prefix blocks).", stat("offload_blocks_stored")),
            counter("kvserve_kv_offload_loaded_blocks", "Blocks copied back from the host tier into the device "
                    "pool (prefix hits in the host tier).", stat("offload_blocks_loaded")),
            counter("kvserve_preemptions", "Requests preempted (blocks freed, recomputed later).",
                    stat("num_preemptions")),
            counter("kvserve_prompt_tokens", "Prompt tokens computed (prefill work).", stat("prompt_tokens")),
            counter("kvserve_generation_tokens", "Tokens generated.", stat("generation_tokens")),
            counter("kvserve_engine_steps", "Engine steps run.", stat("num_steps")),
            counter("kvserve_kernel_late_compiles", "Kernels compiled after start-up (Triton attention variants, and "
                    "with --compile torch.compile graphs); each stalled every request while it compiled (0 expected: "
                    "start-up compiles every variant).",
                    stat("late_compiles")),
        ]


class BulkHistogram(Collector):
    """A histogram filled many values at a time (a finished request's inter-token gaps, one per token):
    one lock and a bisect per value, where prometheus_client's observe takes two locked increments.
    Exposed like a Histogram with a model_name label (no _created sample)."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], model_name: str):
        self.name, self.documentation, self.model_name = name, documentation, model_name
        self.bounds = sorted(buckets) + [float("inf")]
        self.counts = [0] * len(self.bounds)
        self.total = 0.0
        self._lock = threading.Lock()

    def observe_many(self, values: list[float]) -> None:
        where = [bisect.bisect_left(self.bounds, v) for v in values]   # the first bucket whose bound >= v
        total = sum(values)
        with self._lock:
            for i in where:
                self.counts[i] += 1
            self.total += total

    def collect(self):
        with self._lock:
            counts, total = list(self.counts), self.total
        family = HistogramMetricFamily(self.name, self.documentation, labels=["model_name"])
        cumulative, buckets = 0, []
        for bound, count in zip(self.bounds, counts):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        family.add_metric([self.model_name], buckets, total)
        yield family


class EngineMetrics:
    """All of kvserve's Prometheus metrics for one engine; ``render()`` gives the /metrics body."""

    def __init__(self, engine: AsyncEngine, model_name: str, registry: CollectorRegistry | None = None):
        self.engine = engine
        self.model_name = model_name
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        self._counted_failures: OrderedDict[str, None] = OrderedDict()
        self._log_stop: threading.Event | None = None
        self._log_thread: threading.Thread | None = None
        self._define(self.registry)
        self.registry.register(EngineStatsCollector(engine, model_name))
        engine.add_step_listener(self.on_step)
        engine.add_finish_listener(self.on_finish)

    def _define(self, registry: CollectorRegistry) -> None:
        self.success = Counter("kvserve_request_success", "Requests finished normally, by finish reason.",
                               ["model_name", "finish_reason"], registry=registry)
        self.failure = Counter("kvserve_request_failure", "Requests that failed, by reason.",
                               ["model_name", "reason"], registry=registry)
        for reason in SUCCESS_REASONS:
            self.success.labels(self.model_name, reason)
        for reason in FAILURE_REASONS:
            self.failure.labels(self.model_name, reason)

        def hist(name, doc, buckets):
            return Histogram(name, doc, ["model_name"], buckets=buckets, registry=registry).labels(self.model_name)

        self.ttft = hist("kvserve_time_to_first_token_seconds", "Arrival to first output token.", LATENCY_BUCKETS)
        self.itl = BulkHistogram("kvserve_inter_token_latency_seconds", "Time between consecutive output tokens.",
                                 ITL_BUCKETS, self.model_name)
        registry.register(self.itl)
        self.e2e = hist("kvserve_e2e_request_latency_seconds", "Arrival to finish, for requests that were not "
                        "aborted.", LATENCY_BUCKETS)
        self.queue_time = hist("kvserve_request_queue_time_seconds", "Arrival to first scheduled.",
                               LATENCY_BUCKETS)
        self.prompt_len = hist("kvserve_request_prompt_tokens", "Prompt length of finished requests.",
                               REQUEST_TOKEN_BUCKETS)
        self.output_len = hist("kvserve_request_generation_tokens", "Output length of finished requests.",
                               REQUEST_TOKEN_BUCKETS)
        self.step_tokens = hist("kvserve_step_tokens", "Tokens (prefill + decode) computed per engine step.",
                                STEP_TOKEN_BUCKETS)
        self.step_seqs = hist("kvserve_step_seqs", "Sequences in the batch per engine step.", STEP_TOKEN_BUCKETS)
        self.step_duration = hist("kvserve_step_duration_seconds", "Wall time of one engine step (with async "
                                  "scheduling: of its forward and sampling, on the forward thread).",
                                  STEP_SECONDS_BUCKETS)

    # the engine's reader thread
    def on_step(self, step: StepStats) -> None:
        self.step_tokens.observe(step.num_prefill_tokens + step.num_decode_tokens)
        self.step_seqs.observe(step.num_seqs)
        self.step_duration.observe(step.duration)

    def on_finish(self, out: RequestOutput) -> None:
        if out.error is not None:
            self._count_failure("engine_error", out.request_id)
        elif out.finish_reason == "abort":
            self._count_failure("aborted", out.request_id)
        else:
            self.success.labels(self.model_name, out.finish_reason or "unknown").inc()
        self.prompt_len.observe(len(out.prompt_token_ids))
        self.output_len.observe(out.num_output_tokens)
        self._observe_latencies(out)

    def _observe_latencies(self, out: RequestOutput) -> None:
        timing = out.metrics
        if timing is None:
            return
        if timing.first_scheduled_time is not None:
            self.queue_time.observe(max(0.0, timing.first_scheduled_time - timing.arrival_time))
        if timing.first_token_time is not None:
            self.ttft.observe(max(0.0, timing.first_token_time - timing.arrival_time))
        token_times = list(timing.token_times)
        if timing.first_token_time is not None and (not token_times or token_times[0] > timing.first_token_time):
            token_times.insert(0, timing.first_token_time)
        self.itl.observe_many([max(0.0, current - previous) for previous, current in zip(token_times, token_times[1:])])
        if timing.finished_time is not None and out.finish_reason != "abort" and out.error is None:
            self.e2e.observe(max(0.0, timing.finished_time - timing.arrival_time))

    # server
    def record_failure(self, reason: str, request_id: str | None = None) -> None:
        """Count a failed request. Pass the engine request id for requests the engine saw: an abort
        the engine also reports (finish_reason "abort") is then counted once, whichever comes first."""
        self._count_failure(reason, request_id)

    def _count_failure(self, reason: str, request_id: str | None) -> None:
        if request_id is not None:
            with self._lock:
                if request_id in self._counted_failures:
                    return
                self._counted_failures[request_id] = None
                if len(self._counted_failures) > _RECENT_FAILURES:
                    self._counted_failures.popitem(last=False)
        self.failure.labels(self.model_name, reason).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # periodic log line
    def start_log_loop(self, interval: float = 5.0) -> None:
        """Log throughput and cache state every ``interval`` seconds while the engine is busy (daemon thread)."""
        if self._log_thread is not None:
            return
        self._log_stop = threading.Event()
        self._log_thread = threading.Thread(target=self._log_loop, args=(interval, self._log_stop),
                                            name="kvserve-metrics-log", daemon=True)
        self._log_thread.start()

    def stop_log_loop(self) -> None:
        if self._log_thread is None:
            return
        self._log_stop.set()
        self._log_thread.join(timeout=5)
        self._log_thread = None

    def _log_loop(self, interval: float, stop: threading.Event) -> None:
        previous, previous_time, was_busy = self.engine.stats(), time.monotonic(), False
        while not stop.wait(interval):
            try:
                current, now = self.engine.stats(), time.monotonic()
            except Exception:  # noqa: BLE001 - a dead engine must not kill the logger thread
                logger.exception("engine.stats() failed")
                continue
            busy = current.num_running + current.num_waiting > 0 or current.num_steps != previous.num_steps
            if busy or was_busy:
                logger.info(format_log_line(previous, current, now - previous_time))
            previous, previous_time, was_busy = current, now, busy


def format_log_line(prev: EngineStats, cur: EngineStats, elapsed: float) -> str:
    """One line: throughput over the interval, queue, KV usage, prefix hit rate (interval and lifetime)."""
    elapsed = max(elapsed, 1e-9)
    queried = cur.prefix_query_tokens - prev.prefix_query_tokens
    hit = cur.prefix_hit_tokens - prev.prefix_hit_tokens
    interval_rate = 100.0 * hit / queried if queried else 0.0
    lifetime = 100.0 * cur.prefix_hit_tokens / cur.prefix_query_tokens if cur.prefix_query_tokens else 0.0
    return (f"prompt {(cur.prompt_tokens - prev.prompt_tokens) / elapsed:.1f} tok/s, "
            f"generation {(cur.generation_tokens - prev.generation_tokens) / elapsed:.1f} tok/s, "
            f"running {cur.num_running}, waiting {cur.num_waiting}, "
            f"KV usage {100.0 * cur.usage:.1f}% ({cur.blocks_used}/{cur.num_blocks} blocks, "
            f"{cur.blocks_cached} cached), prefix hit rate {interval_rate:.1f}% "
            f"(lifetime {lifetime:.1f}%), preemptions {cur.num_preemptions - prev.num_preemptions}")
