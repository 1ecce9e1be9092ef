"""Prometheus metrics of the operator, served on their own port (config.metrics_port)."""

from __future__ import annotations

from collections import Counter as Tally

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
STATUS_WRITES = Counter("waso_status_writes_total", "Status patches sent to the API server", ["kind"])

_published: set[tuple[str, str]] = set()


def publish_sessions(by_tenant_phase: Tally[tuple[str, str]]) -> None:
    """Set the per-tenant, per-phase gauge, dropping series that no longer exist."""
    for tenant, phase in _published - set(by_tenant_phase):
        SESSIONS.remove(tenant, phase)
    for (tenant, phase), count in by_tenant_phase.items():
        SESSIONS.labels(tenant, phase).set(count)
    _published.clear()
    _published.update(by_tenant_phase)
