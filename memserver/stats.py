"""Request statistics: counted cheaply in workers, exported by the master.

Each session keeps plain integers on the per-request path (no locks, no
label lookups); a worker sums its sessions when the master asks, and the
master sums the snapshots of all workers and turns them into Prometheus
metric families with :class:`MemserverCollector`, registered on whatever
registry the caller gives.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from memserver.nbd import proto

# Upper bounds of the latency buckets, in nanoseconds: 5 us to 1 s.
LATENCY_BUCKETS_NS = (
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    100_000_000,
    1_000_000_000,
)

COMMANDS = ("read", "write", "flush", "trim", "write_zeroes", "cache")
_COMMAND_INDEX = {
    proto.CMD_READ: 0,
    proto.CMD_WRITE: 1,
    proto.CMD_FLUSH: 2,
    proto.CMD_TRIM: 3,
    proto.CMD_WRITE_ZEROES: 4,
    proto.CMD_CACHE: 5,
}

# Kinds of error, as counted.  Request errors are named after their errno;
# the rest end a connection or refuse one.
ERROR_NAMES = {
    proto.EPERM: "eperm",
    proto.EIO: "eio",
    proto.ENOMEM: "enomem",
    proto.EINVAL: "einval",
    proto.ENOSPC: "enospc",
    proto.EOVERFLOW: "eoverflow",
    proto.ENOTSUP: "enotsup",
    proto.ESHUTDOWN: "eshutdown",
}


class RequestStats:
    """Request counters of one session; only its own thread writes them."""

    def __init__(self) -> None:
        n = len(COMMANDS)
        self.ops = [0] * n
        self.bytes = [0] * n
        self.latency_sum_ns = [0] * n
        self.latency_buckets = [[0] * (len(LATENCY_BUCKETS_NS) + 1) for _ in range(n)]
        self.errors: dict[str, int] = {}

    def record(self, cmd: int, length: int, elapsed_ns: int) -> None:
        """Count one completed request of ``length`` bytes."""
        i = _COMMAND_INDEX[cmd]
        self.ops[i] += 1
        self.bytes[i] += length
        self.latency_sum_ns[i] += elapsed_ns
        self.latency_buckets[i][bisect.bisect_left(LATENCY_BUCKETS_NS, elapsed_ns)] += 1

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def request_error(self, error: int) -> None:
        self.error(ERROR_NAMES.get(error, f"errno_{error}"))

    def add(self, other: RequestStats) -> None:
        """Fold another session's or worker's counters into these."""
        for mine, theirs in (
            (self.ops, other.ops),
            (self.bytes, other.bytes),
            (self.latency_sum_ns, other.latency_sum_ns),
            *zip(self.latency_buckets, other.latency_buckets, strict=True),
        ):
            for i, value in enumerate(theirs):
                mine[i] += value
        for kind, count in other.errors.items():
            self.errors[kind] = self.errors.get(kind, 0) + count

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy of every counter."""
        return {
            "ops": list(self.ops),
            "bytes": list(self.bytes),
            "latency_sum_ns": list(self.latency_sum_ns),
            "latency_buckets": [list(b) for b in self.latency_buckets],
            "errors": dict(self.errors),
        }

    @classmethod
    def from_snapshot(cls, data: dict[str, Any]) -> RequestStats:
        stats = cls()
        stats.ops = list(data["ops"])
        stats.bytes = list(data["bytes"])
        stats.latency_sum_ns = list(data["latency_sum_ns"])
        stats.latency_buckets = [list(b) for b in data["latency_buckets"]]
        stats.errors = dict(data["errors"])
        return stats


def merge_snapshots(snapshots: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum the snapshots of several workers, connection counts included."""
    total = RequestStats()
    connections = accepted = 0
    for snap in snapshots:
        total.add(RequestStats.from_snapshot(snap))
        connections += snap["connections"]
        accepted += snap["connections_total"]
    merged = total.snapshot()
    merged["connections"] = connections
    merged["connections_total"] = accepted
    return merged


class MemserverCollector(Collector):
    """Prometheus view of a memserver.

    ``requests`` returns the merged request snapshot (see
    :func:`merge_snapshots`), ``pool`` a dict of pool gauges (``slab_size``,
    ``slabs_used``, ``slabs_free``, ``exports``, ``arena_bytes``,
    ``arena_locked``, ``workers``).  Both are called at scrape time; the
    snapshot is gathered by the caller beforehand, so ``collect`` never waits.
    """

    def __init__(
        self,
        requests: Callable[[], dict[str, Any]],
        pool: Callable[[], dict[str, int]],
    ) -> None:
        self._requests = requests
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        snap = self._requests()
        ops = CounterMetricFamily(
            "rampool_memserver_requests",
            "NBD requests completed, by command.",
            labels=["command"],
        )
        size = CounterMetricFamily(
            "rampool_memserver_request_bytes",
            "Bytes covered by completed NBD requests, by command.",
            labels=["command"],
        )
        latency = HistogramMetricFamily(
            "rampool_memserver_request_duration_seconds",
            "Time from a request's header to its reply, by command.",
            labels=["command"],
        )
        for i, command in enumerate(COMMANDS):
            ops.add_metric([command], snap["ops"][i])
            size.add_metric([command], snap["bytes"][i])
            cumulative = 0
            buckets = []
            for bound, count in zip(
                (*LATENCY_BUCKETS_NS, None), snap["latency_buckets"][i], strict=True
            ):
                cumulative += count
                le = "+Inf" if bound is None else repr(bound / 1e9)
                buckets.append((le, cumulative))
            latency.add_metric([command], buckets, snap["latency_sum_ns"][i] / 1e9)
        yield from (ops, size, latency)

        errors = CounterMetricFamily(
            "rampool_memserver_errors",
            "Refused requests (by errno) and dropped or refused connections.",
            labels=["kind"],
        )
        for kind, count in sorted(snap["errors"].items()):
            errors.add_metric([kind], count)
        yield errors
        yield GaugeMetricFamily(
            "rampool_memserver_connections",
            "NBD connections open now.",
            value=snap["connections"],
        )
        yield CounterMetricFamily(
            "rampool_memserver_connections_accepted",
            "NBD connections accepted since start.",
            value=snap["connections_total"],
        )

        pool = self._pool()
        slabs = GaugeMetricFamily(
            "rampool_memserver_slabs", "Slabs of the arena, by state.", labels=["state"]
        )
        slabs.add_metric(["used"], pool["slabs_used"])
        slabs.add_metric(["free"], pool["slabs_free"])
        yield slabs
        for name, key, help_text in (
            ("slab_size_bytes", "slab_size", "Size of one slab in bytes."),
            ("arena_bytes", "arena_bytes", "Size of the arena in bytes."),
            ("arena_locked", "arena_locked", "1 if the arena is locked in RAM."),
            ("exports", "exports", "Exports served now."),
            ("workers", "workers", "Worker processes alive."),
        ):
            yield GaugeMetricFamily(
                f"rampool_memserver_{name}", help_text, value=pool[key]
            )
