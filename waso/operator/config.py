"""Operator configuration: a YAML file (Helm values render it) overridden by WASO_* variables.

Everything is validated when the operator starts; a bad value stops it with a message
naming the setting, before it touches the cluster.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from waso.api.base import Quantity
from waso.api.quota import TenantQuotaSpec

CONFIG_ENV = "WASO_CONFIG"


class OperatorConfig(BaseSettings):
    """Settings of one operator deployment."""

    model_config = SettingsConfigDict(
        env_prefix="WASO_", env_nested_delimiter="__", extra="forbid", frozen=True, validate_default=True
    )

    max_sessions: int = Field(default=35, ge=0, le=100_000)
    """Global capacity: sessions admitted at once in the whole cluster."""
    default_quota: TenantQuotaSpec = TenantQuotaSpec()
    """The quota of a namespace without a TenantQuota."""
    runtime_image: str = Field(default="waso:dev", min_length=1)
    """Container image of the session pods."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    transport: Literal["neonize", "simulator"] = "neonize"
    """How the session pods reach WhatsApp: the real service, or the waso simulator."""
    simulator_url: str | None = Field(default=None, pattern=r"^https?://")
    """Base URL of the WhatsApp simulator, required with transport=simulator."""
    redis_url: str | None = Field(default=None, pattern=r"^rediss?://")
    """Shared rate-limit store for tenants with more than one session pod."""
    max_device_id: int | None = Field(default=None, ge=1)
    """Opt-in policy: device numbers above it are reported unhealthy (the old gateway used 10)."""
    volume_size: Quantity = "1Gi"
    """Credential volume of each session pod."""
    storage_class: str | None = None
    metrics_port: int = Field(default=9090, ge=0, le=65535)
    """Prometheus metrics port of the operator; 0 disables it."""
    resync_seconds: float = Field(default=30.0, gt=0, le=3600)
    """Full admission pass at least this often, even without events."""
    cleanup_timeout_seconds: float = Field(default=300.0, gt=0, le=86400)
    """How long a deleted session waits for its runtime to unlink the device and erase its credentials."""
    write_concurrency: int = Field(default=16, ge=1, le=256)
    """Status writes in flight at once."""

    def model_post_init(self, context: object) -> None:
        if self.transport == "simulator" and not self.simulator_url:
            raise ValueError("simulator_url (WASO_SIMULATOR_URL) is required when transport is simulator")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = os.environ.get(CONFIG_ENV)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=Path(path)))
        return tuple(sources)


class ConfigError(ValueError):
    """The configuration is invalid; the message names each bad setting."""


def load_config() -> OperatorConfig:
    path = os.environ.get(CONFIG_ENV)
    if path and not Path(path).is_file():
        raise ConfigError(f"{CONFIG_ENV}={path}: no such file")
    try:
        return OperatorConfig()
    except ValidationError as error:
        problems = []
        for problem in error.errors():
            where = ".".join(str(p) for p in problem["loc"]) or "configuration"
            env = "WASO_" + "__".join(str(p) for p in problem["loc"]).upper() if problem["loc"] else ""
            source = f" (setting {where}, variable {env})" if env else ""
            problems.append(f"{where}: {problem['msg']}{source}")
        raise ConfigError("invalid operator configuration:\n  " + "\n  ".join(problems)) from None
    except ValueError as error:
        raise ConfigError(f"invalid operator configuration: {error}") from None
