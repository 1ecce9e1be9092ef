"""Operator configuration: a YAML file (Helm values render it) overridden by WASO_* variables.

``OperatorConfig`` is the single source of every setting: the Helm chart's values schema and
its documented defaults are generated from it (``waso.operator.chart_schema``). The file
spells settings in camelCase like the chart's values and the CRDs (``maxSessions``,
``defaultQuota.sessionsPerPod``; snake_case is accepted too); a variable spells them in
upper snake case (``WASO_MAX_SESSIONS``, ``WASO_DEFAULT_QUOTA__SESSIONS_PER_POD``).

Everything is validated when the operator starts; a bad value stops it with a message
naming the setting and its variable, before it touches the cluster.
"""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel, to_snake
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from waso.api.base import Quantity
from waso.api.quota import TenantQuotaSpec
from waso.api.tenancy import DEFAULT_MAX_SESSIONS

CONFIG_ENV = "WASO_CONFIG"


class RepairSettings(BaseModel):
    """Automatic repair of sessions with a broken device identity (back up, reset, re-pair)."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True, use_attribute_docstrings=True
    )

    enabled: bool = True
    """Repair broken identities automatically (manual repairs always run)."""
    max_in_flight: int = Field(default=3, ge=1, le=1000)
    """Repairs in flight at once across the cluster: no backup storm when many tenants break together."""
    cooldown_seconds: float = Field(default=600.0, ge=0, le=86400)
    """Least time between two repairs of one session."""
    loop_limit: int = Field(default=3, ge=1, le=19)
    """More repairs than this within loopWindowSeconds stop automatic repair of the session (Stalled)."""
    loop_window_seconds: float = Field(default=3600.0, gt=0, le=604800)
    """The window of the loop limit."""
    keep_backups: int = Field(default=3, ge=1, le=100)
    """Credential-store backups kept per session."""


class EvictionSettings(BaseModel):
    """Eviction of idle sessions when others wait for capacity or quota (credentials kept)."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True, use_attribute_docstrings=True
    )

    enabled: bool = True
    """Evict idle sessions for waiting ones (evictions a person asks for always run)."""
    min_idle_seconds: float = Field(default=900.0, ge=0, le=2_592_000)
    """A session active (message, connection, admission) more recently than this is never evicted."""
    order: Literal["PriorityThenLeastRecentlyActive", "LeastRecentlyActive"] = "PriorityThenLeastRecentlyActive"
    """Which idle session goes first; never one of higher priority than the session waiting."""
    memory_pressure_fraction: float = Field(default=0.9, gt=0, le=1)
    """A session pod using more than this fraction of its memory limit parks its least recently used idle
    sessions (min idle time respected) before the kernel kills the pod."""
    memory_resume_fraction: float = Field(default=0.75, gt=0, le=1)
    """Sessions parked for memory resume once their pod is back below this fraction."""
    memory_settle_seconds: float = Field(default=60.0, ge=0, le=3600)
    """After parking for memory, wait this long for a fresh report before parking more (freed memory
    reaches the kernel's count with a delay)."""
    flag_parked_after_seconds: float = Field(default=1_209_600.0, gt=0, le=31_536_000)
    """A session parked (evicted or suspended) longer than this is flagged: WhatsApp logs out a device
    whose phone went unused for 14 days and unlinks one offline for 30 days."""

    @model_validator(mode="after")
    def _resume_below_pressure(self) -> EvictionSettings:
        if self.memory_resume_fraction >= self.memory_pressure_fraction:
            raise ValueError(
                f"memoryResumeFraction ({self.memory_resume_fraction}) must be below memoryPressureFraction "
                f"({self.memory_pressure_fraction}), or parked sessions would bring the pressure straight back"
            )
        return self


class LeaderElectionSettings(BaseModel):
    """Several operator replicas: one decides and writes, the others stand by with their indexes filled."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True, use_attribute_docstrings=True
    )

    enabled: bool = True
    """Decide only while holding the Lease (a single replica holds it at once too)."""
    lease_name: str = Field(
        default="waso-operator", min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
    )
    """The Lease in the operator's namespace."""
    lease_seconds: int = Field(default=10, ge=3, le=300)
    """A standby takes over this long after the leader's last renewal; the leader renews every third of it."""


class OperatorConfig(BaseSettings):
    """Settings of one operator deployment."""

    model_config = SettingsConfigDict(
        env_prefix="WASO_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        validate_default=True,
        use_attribute_docstrings=True,
    )

    max_sessions: int = Field(default=DEFAULT_MAX_SESSIONS, ge=0, le=100_000)
    """Global capacity: sessions admitted at once in the whole cluster."""
    default_quota: TenantQuotaSpec = TenantQuotaSpec()
    """The quota of a namespace without a TenantQuota."""
    runtime_image: str = Field(default="waso:dev", min_length=1)
    """Container image of the session pods."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """Pull policy of the session pods' image."""
    transport: Literal["neonize", "simulator"] = "neonize"
    """How the session pods reach WhatsApp: the real service, or the waso simulator."""
    simulator_url: str | None = Field(default=None, pattern=r"^https?://")
    """Base URL of the WhatsApp simulator, required with transport=simulator."""
    redis_url: str | None = Field(default=None, pattern=r"^rediss?://")
    """Shared rate-limit store for tenants with more than one session pod."""
    mongo_url: str | None = Field(default=None, pattern=r"^mongodb(\+srv)?://")
    """The message store (MongoDB wire protocol, e.g. FerretDB): tenants' messages and the events' outbox. Unset:
    no messages are kept and events wait in memory only (docs/events.md)."""
    mongo_pool_size: int = Field(default=10, ge=1, le=1000)
    """Connections each session pod opens to the message store at most."""
    max_device_id: int | None = Field(default=None, ge=1)
    """Opt-in policy: device numbers above it are reported unhealthy (the old gateway used 10)."""
    volume_size: Quantity = "1Gi"
    """Credential volume of each session pod."""
    storage_class: str | None = None
    """StorageClass of the credential volumes; unset: the cluster's default class."""
    log_format: Literal["text", "json"] = "text"
    """Log lines of the operator and of the session pods: text (tenant=... session=... fields) or one JSON
    object per line with the same fields."""
    metrics_port: int = Field(default=9090, ge=0, le=65535)
    """Prometheus metrics port of the operator; 0 disables it."""
    resync_seconds: float = Field(default=60.0, gt=0, le=3600)
    """A pass at least this often, even without events (a runtime's heartbeat running out wakes one at once)."""
    cleanup_timeout_seconds: float = Field(default=300.0, gt=0, le=86400)
    """How long a deleted session waits for its runtime to unlink the device and erase its credentials."""
    write_concurrency: int = Field(default=16, ge=1, le=256)
    """Status writes in flight at once."""
    repair: RepairSettings = RepairSettings()
    """Automatic repair of broken device identities."""
    eviction: EvictionSettings = EvictionSettings()
    """Eviction of idle sessions under capacity or quota pressure."""
    leader_election: LeaderElectionSettings = LeaderElectionSettings()
    """Leader election among operator replicas (the chart's replicaCount)."""

    def model_post_init(self, context: object) -> None:
        if self.transport == "simulator" and not self.simulator_url:
            raise ValueError(
                "simulator_url (setting simulatorUrl, variable WASO_SIMULATOR_URL) is required with transport simulator"
            )

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
            sources.append(_YamlSource(settings_cls, yaml_file=Path(path)))
        return tuple(sources)


def setting_key(loc: tuple[int | str, ...]) -> str:
    """How a setting is spelt in the file and the chart's ``config`` values: ``defaultQuota.maxSessions``."""
    return ".".join(to_camel(str(part)) for part in loc)


def setting_variable(loc: tuple[int | str, ...]) -> str:
    """The variable that sets it: ``WASO_DEFAULT_QUOTA__MAX_SESSIONS``."""
    return "WASO_" + "__".join(to_snake(str(part)).upper() for part in loc)


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [m for m in map(_nested_model, typing.get_args(annotation)) if m is not None]
        return models[0] if len(models) == 1 else None
    return None


def _by_field_name(model: type[BaseModel], data: Any, where: str = "") -> Any:
    """The file's keys as field names, at every level: environment variables are merged in by field
    name, and a nested mapping holding both spellings of one key would be refused as an extra input."""
    if not isinstance(data, dict):
        return data
    spellings: dict[str, str] = {}
    for name, field in model.model_fields.items():
        for spelling in (name, to_camel(name), field.alias):
            if spelling:
                spellings[spelling] = name
    result: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for key, value in data.items():
        field_name = spellings.get(str(key), str(key))
        if field_name in seen:
            raise ValueError(f"{where}{seen[field_name]} and {where}{key} are the same setting: set it once")
        seen[field_name] = str(key)
        info = model.model_fields.get(field_name)
        nested = _nested_model(info.annotation) if info else None
        result[field_name] = _by_field_name(nested, value, f"{where}{to_camel(field_name)}.") if nested else value
    return result


class _YamlSource(YamlConfigSettingsSource):
    """The configuration file, with camelCase keys (as the chart writes them) or snake_case ones."""

    def __init__(self, settings_cls: type[BaseSettings], yaml_file: Path) -> None:
        self._model = settings_cls  # _read_file runs inside the base class's __init__
        super().__init__(settings_cls, yaml_file=yaml_file)

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        data = super()._read_file(file_path)
        if not isinstance(data, dict):
            raise ValueError(f"{file_path}: the configuration file must be a mapping of settings")
        result: dict[str, Any] = _by_field_name(self._model, data)
        return result


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
            loc = problem["loc"]
            where = ".".join(to_snake(str(p)) for p in loc) or "configuration"
            source = f" (setting {setting_key(loc)}, variable {setting_variable(loc)})" if loc else ""
            problems.append(f"{where}: {problem['msg']}{source}")
        raise ConfigError("invalid operator configuration:\n  " + "\n  ".join(problems)) from None
    except ValueError as error:
        raise ConfigError(f"invalid operator configuration: {error}") from None
