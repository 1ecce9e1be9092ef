"""Prometheus metrics of a session runtime, served at /metrics of its HTTP API."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

SESSIONS = Gauge("waso_runtime_sessions", "Sessions on this runtime by runtime state", ["state"])
MESSAGES = Counter("waso_runtime_messages_sent_total", "Messages sent through the API", ["tenant"])
RATE_LIMITED = Counter("waso_runtime_messages_rate_limited_total", "Messages refused by the rate limit", ["tenant"])
MESSAGES_RECEIVED = Counter("waso_runtime_messages_received_total", "Messages received from WhatsApp", ["tenant"])
QR_STREAMS = Gauge("waso_runtime_qr_streams", "Open QR Server-Sent-Event streams")
QR_REFUSED = Counter("waso_runtime_qr_streams_refused_total", "QR streams refused by a cap", ["cap"])
STATUS_WRITES = Counter("waso_runtime_status_writes_total", "status.runtime server-side applies")
AUTH_REVIEWS = Counter(
    "waso_runtime_auth_reviews_total", "TokenReviews and SubjectAccessReviews asked of the API server", ["kind"]
)
AUTH_REFUSED = Counter("waso_runtime_auth_refused_total", "API requests refused, by status (401, 403)", ["status"])
EVENTS_DELIVERED = Counter(
    "waso_runtime_events_delivered_total", "Events a Webhook endpoint took", ["tenant", "webhook"]
)
EVENT_FAILURES = Counter(
    "waso_runtime_event_delivery_failures_total", "Failed delivery attempts (each is retried)", ["tenant", "webhook"]
)
EVENT_BACKLOG = Gauge("waso_runtime_event_backlog", "Events waiting for delivery", ["tenant", "webhook"])
EVENTS_DROPPED = Counter(
    "waso_runtime_events_dropped_total", "Events lost before the outbox (a full queue)", ["tenant", "reason"]
)
STORE_POOL_SIZE = Gauge("waso_runtime_store_pool_max_connections", "The message store's pool size (maxPoolSize)")
STORE_CONNECTIONS = Gauge(
    "waso_runtime_store_connections", "Message store connections, open and in use (checked out)", ["state"]
)
STORE_CHECKOUT_FAILURES = Counter(
    "waso_runtime_store_checkout_failures_total", "Waits for a pooled connection that failed", ["reason"]
)
REDIS_ERRORS = Counter(
    "waso_runtime_redis_errors_total",
    "Calls to the shared Redis that failed (unreachable, timed out), by use: ratelimit, qrstreams",
    ["tenant", "use"],
)
