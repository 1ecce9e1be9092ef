"""Prometheus metrics of the operator, served on their own port (config.metrics_port)."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import Counter, Gauge, Histogram

SESSIONS = Gauge("waso_sessions", "WhatsAppSessions by tenant (namespace) and phase", ["tenant", "phase"])
ADMITTED = Gauge("waso_sessions_admitted", "Sessions holding an admission slot in the cluster")
CAPACITY = Gauge("waso_sessions_capacity", "The global session cap (max_sessions)")
REFUSALS = Counter("waso_admission_refusals_total", "Admission refusals by tenant and reason", ["tenant", "reason"])
RECONCILE = Histogram(
    "waso_reconcile_duration_seconds",
    "Duration of one admission, placement and status pass over the whole cluster",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
PASSES = Counter(
    "waso_reconcile_passes_total",
    "Passes by scope: over the whole cluster (cluster), or over sessions created since, decided alone (new)",
    ["scope"],
)
LEADER = Gauge("waso_operator_leader", "1 while this replica holds the leader Lease and decides, else 0")
STATUS_WRITES = Counter("waso_status_writes_total", "Status writes sent to the API server", ["kind"])
REPAIRS = Counter("waso_repairs_total", "Repairs started, by tenant and reason (or Manual)", ["tenant", "reason"])
HEALTH_FAILURES = Gauge(
    "waso_sessions_unhealthy", "Sessions whose DeviceHealthy is False, by tenant and reason", ["tenant", "reason"]
)
DEVICE_NUMBERS = Gauge(
    "waso_sessions_by_device_number",
    "Connected sessions by the device number of their live JID (numbers above 10 are normal)",
    ["range"],
)
EVICTIONS = Counter(
    "waso_evictions_total", "Sessions evicted, by tenant and reason (CapacityPressure, QuotaPressure, Manual)",
    ["tenant", "reason"],
)  # fmt: skip
RESUMPTIONS = Counter(
    "waso_resumptions_total", "Evicted sessions admitted again, by tenant and the reason of their eviction",
    ["tenant", "reason"],
)  # fmt: skip
PARKED = Gauge(
    "waso_sessions_parked", "Sessions parked (Evicted or Suspended), by tenant and reason", ["tenant", "reason"]
)
PARKED_AGE = Gauge(
    "waso_sessions_parked_oldest_seconds", "How long the tenant's longest-parked session has been parked", ["tenant"]
)
DEVICE_RANGES = ((1, 10), (11, 20), (21, 50), (51, 100), (101, 9999))

_published: dict[Gauge, set[tuple[str, ...]]] = {}


def publish(gauge: Gauge, counts: Mapping[tuple[str, ...], float]) -> None:
    """Set a labelled gauge to this pass's counts, dropping series that no longer exist."""
    seen = _published.setdefault(gauge, set())
    for labels in seen - set(counts):
        gauge.remove(*labels)
    for labels, count in counts.items():
        gauge.labels(*labels).set(count)
    seen.clear()
    seen.update(counts)


def add(gauge: Gauge, labels: tuple[str, ...], amount: float = 1) -> None:
    """Count into a labelled gauge between two passes that ``publish`` it."""
    gauge.labels(*labels).inc(amount)
    _published.setdefault(gauge, set()).add(labels)


def device_range(device: int) -> str:
    for low, high in DEVICE_RANGES:
        if low <= device <= high:
            return f"{low}-{high}"
    return "0"
