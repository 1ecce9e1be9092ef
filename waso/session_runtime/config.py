"""Configuration of a session runtime (one per shard pod), from WASO_* variables set by the operator."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from waso.api.quota import TenantQuotaSpec


class RuntimeConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WASO_", extra="ignore", frozen=True)

    namespace: str = Field(min_length=1)
    """The tenant: the runtime serves sessions of this namespace only."""
    pod_name: str = Field(default_factory=lambda: os.uname().nodename)
    shard: int | None = Field(default=None, ge=0)
    """Defaults to the ordinal at the end of the pod name (waso-sessions-3 → 3)."""
    transport: Literal["neonize", "simulator"] = "neonize"
    simulator_url: str | None = None
    data_dir: Path = Path("/var/lib/waso")
    http_host: str = "0.0.0.0"
    http_port: int = Field(default=8080, ge=0, le=65535)
    redis_url: str | None = None
    """Shared rate limits when a tenant runs several shards; in-memory without it."""
    rate_limit_fail: Literal["open", "closed"] = "open"
    """When Redis is unreachable: let messages through (open) or refuse them with 503 (closed)."""
    lease_seconds: int = Field(default=15, ge=3, le=300)
    heartbeat_seconds: int = Field(default=10, ge=1, le=300)
    max_qr_streams: int = Field(default=20, ge=0, le=10000)
    """QR streams open at once on this pod, over all tenants' sessions."""
    qr_stream_timeout: float = Field(default=120.0, gt=0)
    keepalive_seconds: float = Field(default=15.0, gt=0)
    quota_refresh_seconds: float = Field(default=15.0, gt=0)
    """How often the namespace's TenantQuota is re-read."""
    default_quota: TenantQuotaSpec = TenantQuotaSpec()
    """Applies while the namespace has no TenantQuota (WASO_DEFAULT_QUOTA as JSON)."""
    executor_threads: int = Field(default=256, ge=8, le=4096)
    """neonize keeps one default-executor thread busy per live session, plus short calls."""
    pairing_workers: int = Field(default=4, ge=1, le=256)
    """Pairing child processes (neonize) at once on this pod; each holds about 70 MiB while it runs.
    Further unpaired sessions wait for a slot in state Connecting."""
    keep_backups: int = Field(default=3, ge=1, le=100)
    """Credential-store backups kept per session (the operator's repair.keepBackups)."""
    auth_audiences: tuple[str, ...] = Field(default=("waso",), min_length=1)
    """Audiences a caller's token must be valid for (TokenReview); WASO_AUTH_AUDIENCES as a JSON list."""
    cgroup_dir: Path = Path("/sys/fs/cgroup")
    """The container's cgroup v2 directory: its memory.current and memory.max are reported with the heartbeat."""
    mongo_url: str | None = None
    """The message store (MongoDB wire protocol): messages, and the events' durable outbox. Without it, events wait
    in a bounded in-memory queue and nothing is kept (docs/events.md)."""
    mongo_pool_size: int = Field(default=10, ge=1, le=1000)
    """Connections to the message store this pod opens at most."""
    event_buffer: int = Field(default=10000, ge=1, le=1_000_000)
    """Events accepted but not yet in the outbox, and (without a store) events waiting for delivery."""
    event_status_seconds: float = Field(default=10.0, gt=0)
    """How often each Webhook's status.deliveries entry of this shard is written (only when it changed)."""
    prune_seconds: float = Field(default=300.0, gt=0)
    """How often the tenant's messages are pruned to its retention and size cap."""
    log_format: Literal["text", "json"] = "text"
    """Text lines with tenant= and session= fields, or one JSON object per line (the operator's logFormat)."""
    device_name: str = "waso"
    instance: str = Field(default_factory=lambda: secrets.token_hex(4))
    """Distinguishes two processes with the same pod name in lease holder identities."""

    @model_validator(mode="after")
    def _shard_from_pod_name(self) -> RuntimeConfig:
        if self.shard is None:
            match = re.search(r"-(\d+)$", self.pod_name)
            if match is None:
                raise ValueError("WASO_SHARD is not set and the pod name does not end in an ordinal")
            object.__setattr__(self, "shard", int(match[1]))
        if self.transport == "simulator" and not self.simulator_url:
            raise ValueError("WASO_SIMULATOR_URL is required with WASO_TRANSPORT=simulator")
        return self

    @property
    def identity(self) -> str:
        return f"{self.pod_name}/{self.instance}"

    @property
    def shard_index(self) -> int:
        assert self.shard is not None
        return self.shard
