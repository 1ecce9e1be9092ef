"""Prometheus metrics of a session runtime, served at /metrics of its HTTP API."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

SESSIONS = Gauge("waso_runtime_sessions", "Sessions on this runtime by runtime state", ["state"])
MESSAGES = Counter("waso_runtime_messages_sent_total", "Messages sent through the API", ["tenant"])
RATE_LIMITED = Counter("waso_runtime_messages_rate_limited_total", "Messages refused by the rate limit", ["tenant"])
QR_STREAMS = Gauge("waso_runtime_qr_streams", "Open QR Server-Sent-Event streams")
QR_REFUSED = Counter("waso_runtime_qr_streams_refused_total", "QR streams refused by a cap", ["cap"])
STATUS_WRITES = Counter("waso_runtime_status_writes_total", "status.runtime server-side applies")
AUTH_REVIEWS = Counter(
    "waso_runtime_auth_reviews_total", "TokenReviews and SubjectAccessReviews asked of the API server", ["kind"]
)
AUTH_REFUSED = Counter("waso_runtime_auth_refused_total", "API requests refused, by status (401, 403)", ["status"])
