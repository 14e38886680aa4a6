"""Prometheus view of the master, computed from the state machine at scrape time.

The state machine keeps plain counters (so tests read exact values without a registry); this
collector turns them into Mooncake's metric names on every scrape. Each master gets its own
registry, so several masters in one process (tests) do not collide.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from store.master.service import BATCH_RPCS, RPC_NAMES, MasterService

_COUNTERS = {
    "successful_evictions": ("master_successful_evictions", "eviction rounds that evicted something"),
    "attempted_evictions": ("master_attempted_evictions", "eviction rounds that found nothing to evict"),
    "evicted_keys": ("master_evicted_key_count", "objects evicted"),
    "evicted_size_bytes": ("master_evicted_size_bytes", "bytes evicted (value size x replicas)"),
    "gc_removals": ("master_gc_removals", "objects removed by the GC (legacy or on-demand)"),
    "gc_queue_full": ("master_gc_queue_full", "reads whose GC task was dropped because the queue was full"),
    "clients_expired": ("master_clients_expired", "clients expired after client_ttl without a ping"),
    "zombie_puts_reclaimed": ("master_zombie_puts_reclaimed",
                              "puts in progress reclaimed when their writer expired"),
    "put_start_alloc_failures": ("master_put_start_alloc_failures", "PutStart calls that found no space"),
    "put_start_partial_allocations": ("master_put_start_partial_allocations",
                                      "PutStart calls that placed fewer replicas than asked"),
    "put_start_discards": ("master_put_start_discard_cnt", "stale puts discarded (writer unknown)"),
    "put_start_releases": ("master_put_start_release_cnt", "discarded puts whose space was released"),
}


class MasterCollector(Collector):
    def __init__(self, service: MasterService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        svc = self.service
        g = svc.gauges()
        c = svc.counters()
        segments = svc.inspect_segments()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield gauge("master_key_count", "objects in the store", g["key_count"])
        yield gauge("master_soft_pin_key_count", "objects currently soft-pinned", g["soft_pin_key_count"])
        yield gauge("master_processing_key_count", "objects whose put is in progress",
                    g["processing_key_count"])
        yield gauge("master_allocated_bytes", "bytes allocated to live replicas (requested sizes)",
                    g["allocated_bytes"])
        yield gauge("master_reserved_bytes", "bytes the allocators reserved (after size-class rounding)",
                    g["reserved_bytes"])
        yield gauge("master_total_capacity_bytes", "bytes of all mounted segments", g["total_capacity_bytes"])
        yield gauge("master_active_clients", "clients alive (pinged within client_ttl)", g["active_clients"])
        yield gauge("master_segment_count", "mounted segments", g["segment_count"])
        yield gauge("master_gc_pending", "GC tasks or reclaim candidates waiting", g["gc_pending"])
        seg_alloc = GaugeMetricFamily("segment_allocated_bytes", "bytes allocated per segment",
                                      labels=["segment", "segment_id"])
        seg_cap = GaugeMetricFamily("segment_total_capacity_bytes", "capacity per segment",
                                    labels=["segment", "segment_id"])
        for s in segments:
            seg_alloc.add_metric([s["name"], s["id"]], s["allocated_bytes"])
            seg_cap.add_metric([s["name"], s["id"]], s["size"])
        yield seg_alloc
        yield seg_cap
        for rpc in RPC_NAMES:
            yield CounterMetricFamily(f"master_{rpc}_requests", f"{rpc} calls", value=c[f"{rpc}_requests"])
            yield CounterMetricFamily(f"master_{rpc}_failures", f"{rpc} calls that failed",
                                      value=c[f"{rpc}_failures"])
        for rpc in BATCH_RPCS:
            yield CounterMetricFamily(f"master_{rpc}_items", f"keys in {rpc} calls", value=c[f"{rpc}_items"])
            yield CounterMetricFamily(f"master_{rpc}_failed_items", f"keys that failed in {rpc} calls",
                                      value=c[f"{rpc}_failed_items"])
            yield CounterMetricFamily(f"master_{rpc}_partial_successes", f"{rpc} calls that partly failed",
                                      value=c[f"{rpc}_partial_successes"])
        for key, (name, doc) in _COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=c[key])
        cumulative, buckets = 0, []
        for bound, n in g["value_size_buckets"]:
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
        yield HistogramMetricFamily("master_value_size_bytes", "value sizes at PutStart", buckets=buckets,
                                    sum_value=g["value_size_sum"])


def make_registry(service: MasterService) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MasterCollector(service))
    return registry


def summary_line(service: MasterService) -> str:
    """Mooncake's ``/metrics/summary`` in one line (also logged every 10 s)."""
    g = service.gauges()
    c = service.counters()
    cap = g["total_capacity_bytes"]
    pct = 100.0 * g["allocated_bytes"] / cap if cap else 0.0
    rpcs = " ".join(f"{n}={c[f'{n}_requests'] - c[f'{n}_failures']}/{c[f'{n}_requests']}"
                    for n in ("put_start", "put_end", "get_replica_list", "remove", "ping")
                    if c[f"{n}_requests"])
    return (f"Mem Storage: {g['allocated_bytes']} / {cap} B ({pct:.1f}%) | Keys: {g['key_count']} "
            f"(soft-pinned {g['soft_pin_key_count']}, in progress {g['processing_key_count']}) | "
            f"Clients: {g['active_clients']} | Requests (ok/total): {rpcs or '-'} | "
            f"Eviction: success/attempts={c['successful_evictions']}/"
            f"{c['successful_evictions'] + c['attempted_evictions']} keys={c['evicted_keys']} "
            f"size={c['evicted_size_bytes']} | GC removals: {c['gc_removals']}")
